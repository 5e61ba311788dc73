"""The runtime never imports torch, transformers or onnx: checked in a fresh interpreter."""

from __future__ import annotations

import subprocess
import sys

FORBIDDEN = ("torch", "transformers", "onnx", "pue.export", "pue.calibration", "pue.benchmarks")


def test_runtime_embeds_without_heavy_imports(fp32_bundle):
    bundle = fp32_bundle()
    code = f"""
import sys
from pue.runtime import Embedder
from pue.data import patch_set
emb = Embedder.load({str(bundle)!r})
images = patch_set("heldout")[:2]
out = emb.embed_images(images)
out = emb.embed_texts(["glands", ""])
out = emb.embed_composed(images[:1], ["more stroma"])
loaded = [m for m in {FORBIDDEN!r} if m in sys.modules]
assert not loaded, loaded
print("ok", out.shape)
"""
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr
    assert "ok" in completed.stdout
