"""Where a decoder's int8 error comes from, with and without the residual-stream rotation (issue 14, item 2).

    python scripts/rotation_error_by_group.py FP32_BUNDLE [--rows 12] [--json out.json]

The bundle's FP32 decoder, and the same decoder rotated (`pue.calibration.rotation.rotate_decoder`), each quantized
int8-dynamic (per-channel weights, per-tensor activations per batch; no smoothing, no fallback) on one op group
at a time: the readers of the normed stream (q/k/v, gate/up), the attention output (o_proj), the MLP output
(down_proj), then all of them. Cosine of the decoder's embedding against the unrotated FP32 decoder over the
first calibration rows (shipped patches, captions, composed prompts). Not run by CI.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
from pathlib import Path

import numpy as np

GROUPS = {
    "readers (q/k/v, gate/up)": ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"),
    "o_proj": ("o_proj",),
    "down_proj": ("down_proj",),
    "all": ("",),
}


def decoder_rows(bundle: Path, count: int) -> list[dict[str, np.ndarray]]:
    from pue.calibration.readers import DecoderFeeds, default_captions, make_plan
    from pue.calibration.sampling import sample_patches
    from pue.calibration.sources import open_sources
    from pue.runtime import Embedder

    with Embedder.load(bundle) as embedder:
        patches, _ = sample_patches(open_sources(None, patch_size=embedder.manifest.tile_size), count)
        return list(DecoderFeeds(embedder, make_plan(patches, default_captions(count)), count))


def embed(model_path: Path, rows: list[dict[str, np.ndarray]]) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, row)[0] for row in rows])


def main() -> None:
    import onnx

    from pue.calibration.graph_ops import weight_ops
    from pue.calibration.int8 import quantize_dynamic_graph
    from pue.calibration.rotation import rotate_decoder

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--rows", type=int, default=12)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = decoder_rows(args.bundle, args.rows)
    base = onnx.load(str(args.bundle / "decoder.onnx"))
    rotated = copy.deepcopy(base)
    rotate_decoder(rotated)
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        reference = embed(args.bundle / "decoder.onnx", rows)
        for rotate, model in (("off", base), ("on", rotated)):
            source = work / f"{rotate}.onnx"
            onnx.save(model, str(source))
            for group, names in GROUPS.items():
                nodes = [
                    op.node
                    for op in weight_ops(model, "decoder")
                    if op.op_type == "MatMul" and any(n in op.node for n in names)
                ]
                quantized = work / f"{rotate}.int8.onnx"
                quantize_dynamic_graph(source, quantized, nodes)
                out = embed(quantized, rows)
                cosine = (out * reference).sum(1) / np.linalg.norm(out, axis=1) / np.linalg.norm(reference, axis=1)
                row = {"rotate": rotate, "group": group, "ops": len(nodes)}
                row |= {"mean_cosine": float(cosine.mean()), "min_cosine": float(cosine.min())}
                results.append(row)
                print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"bundle": str(args.bundle), "rows": len(rows), "results": results}, indent=2))
    print("| rotate | int8 ops | mean cos | min cos |\n|---|---|---|---|")
    for r in results:
        print(f"| {r['rotate']} | {r['group']} ({r['ops']}) | {r['mean_cosine']:.5f} | {r['min_cosine']:.5f} |")


if __name__ == "__main__":
    main()
