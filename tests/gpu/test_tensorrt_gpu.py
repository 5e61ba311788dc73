"""Real TensorRT on a real GPU: engines built from a tiny FP32 bundle, gated, loaded and compared with the parent.

Skipped (with the reason) where TensorRT, cuda-python or a CUDA GPU is missing.
"""

from __future__ import annotations

import numpy as np
import pytest
import tiny_bundle

pytest.importorskip("tensorrt", reason='TensorRT is not installed (pip install "pue[tensorrt]")')
pytest.importorskip("cuda.bindings", reason='cuda-python is not installed (pip install "pue[tensorrt]")')


def _gpu_count() -> int:
    from cuda.bindings import runtime

    error, count = runtime.cudaGetDeviceCount()
    return int(count) if error == runtime.cudaError_t.cudaSuccess else 0


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_gpu_count() == 0, reason="no CUDA GPU is visible")]


@pytest.fixture(scope="module")
def engines(fp32_bundle, tmp_path_factory):
    from pue.export.tensorrt.build import TrtOptions, build_engine_bundle
    from pue.export.tensorrt.profiles import parse_batch

    out = tmp_path_factory.mktemp("gpu-engines")
    result = build_engine_bundle(
        fp32_bundle(), out / "engines", TrtOptions(batch=parse_batch("1:4:4")), gate_set=tiny_bundle.small_gate_set(8)
    )
    return fp32_bundle(), result


def test_engines_pass_the_gate_and_record_this_machine(engines):
    from pue.runtime.backends.cuda_device import CudaDevice, import_cudart
    from pue.runtime.backends.tensorrt_compat import check_engine_compatibility
    from pue.runtime.backends.tensorrt_engine import import_tensorrt, platform_info

    _, result = engines
    assert result.gate.passed, result.gate.failures()
    device = CudaDevice(import_cudart(), 0)
    here = platform_info(import_tensorrt(), device)
    device.close()
    for meta in result.engines.values():
        assert meta.built_on.compute_capability == here.compute_capability
        assert check_engine_compatibility(meta, here, "rebuild") == []


def test_engines_match_the_parent_on_mixed_and_split_batches(engines):
    from pue.errors import PueError
    from pue.runtime import Embedder, Query

    parent_dir, result = engines
    parent = Embedder.load(parent_dir)
    engine = Embedder.load(result.bundle, device="cuda")
    images = tiny_bundle.heldout_patches(6)
    queries = [
        Query(text="stroma"),
        Query(image=images[0]),
        Query(image=images[1], text="as IHC"),
        Query(text=""),
        Query(image=images[2]),
        Query(image=images[3]),
        Query(text="necrosis"),
    ]
    want = parent.embed(queries, batch_size=7)
    got = engine.embed(queries, batch_size=7)  # 7 rows > profile max 4: split on the GPU side
    cosine = np.sum(got * want, axis=1)
    assert cosine.min() > 0.999, cosine
    # longer than the decoder profile (image prompt + 512, default) but within the model's max_seq_len
    with pytest.raises(PueError, match="--max-seq"):
        engine.embed_texts(["stroma " * 1200])
    engine.backend.close()
