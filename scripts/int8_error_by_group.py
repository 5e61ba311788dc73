"""Where an INT8 bundle's embedding error comes from, op group by op group (issue 14, item 1 of the plan: diagnose).

    python scripts/int8_error_by_group.py FP32_BUNDLE [--rotate on|off] [--smooth on|off] [--patches 16]
        [--captions 8] [--modes u8,s8,dynamic] [--split on|off] [--groups on|off] [--json out.json]

The bundle's FP32 graphs, prepared as `pue-export quantize` prepares them (the decoder's residual stream rotated with
`--rotate on`; SmoothQuant migration per activation scheme with `--smooth on`), are quantized in simulation
(`pue.calibration.fake_quant`: Q/DQ in float, 7-bit weights for the u8 flavours, 8-bit for s8) one way at a time:

- `all`: every weight MatMul int8 (MinMax ranges from the calibration rows for the static schemes);
- `float:G`: all int8 but group G kept float; `only:G`: group G alone int8;
- `token:G`: all int8, group G's activations quantized per token (per row, dynamic) instead of per tensor;
- `all-token`: every activation per token;
- `all, amplified writer columns float` (`--split on`, where some norm gain is ≥ 20× its median): `all` with the
  decoder's residual-stream writers computing those channels in float (`pue.calibration.channel_split`).

Each is measured end to end (vision → decoder → pooled unit vector) against the FP32 graphs on the calibration rows
(shipped patches, captions, composed rows, image sets): mean and minimum cosine. Then, per group input, where the
range goes: channel ratio (max / median channel |x|), token ratio (max / median token |x|), the worst token
positions. Not run by CI.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

import numpy as np

GROUPS = {
    "vision q/k/v": r"tower/.*self_attn/(q|k|v)_proj",
    "vision out_proj": r"tower/.*out_proj",
    "vision fc1": r"tower/.*fc1",
    "vision fc2": r"tower/.*fc2",
    "projector linear_1": r"projector/linear_1",
    "projector linear_2": r"projector/linear_2",
    "decoder q/k/v": r"(language_model|last_layer)/.*(q|k|v)_proj",
    "decoder o_proj": r"o_proj",
    "decoder gate/up": r"(gate|up)_proj",
    "decoder down_proj": r"down_proj",
}
QMAX = {"u8": 64, "dynamic": 64, "s8": 127}


def group_of(node: str) -> str | None:
    return next((name for name, pattern in GROUPS.items() if re.search(pattern, node)), None)


class Rows:
    """The calibration rows, and end-to-end embedding of them with any pair of (vision, decoder) sessions."""

    def __init__(self, bundle: Path, patches: int, captions: int) -> None:
        from pue.calibration.readers import DecoderFeeds, VisionFeeds, default_captions, make_plan
        from pue.calibration.sampling import sample_patches
        from pue.calibration.sources import open_sources
        from pue.runtime import Embedder

        self.embedder = Embedder.load(bundle)
        chosen, _ = sample_patches(open_sources(None, patch_size=self.embedder.manifest.tile_size), patches)
        self.plan = make_plan(chosen, default_captions(captions))
        self.vision_feeds = list(VisionFeeds(self.embedder, self.plan.patches))
        self.decoder_feeds = list(DecoderFeeds(self.embedder, self.plan))
        self.rows = DecoderFeeds(self.embedder, self.plan).rows
        self.pixels = {id(p): self.embedder.pixel_values([p.load()]) for p in self.plan.patches}
        for _, group, _ in self.rows:
            for p in group:
                self.pixels.setdefault(id(p), self.embedder.pixel_values([p.load()]))

    def embed(self, vision: Any, decoder: Any) -> np.ndarray:
        from pue.runtime.backends.base import decoder_feed

        prompts, manifest = self.embedder.prompts, self.embedder.manifest
        names = [output.name for output in vision.get_outputs()]
        outputs_of = {
            key: dict(zip(names, vision.run(None, {"pixel_values": pixels}), strict=True))
            for key, pixels in self.pixels.items()
        }
        out = []
        for index, (kind, patches, text) in enumerate(self.rows):
            ids, _ = prompts.encode(kind, text, index=index, truncate=True, images=max(1, len(patches)))
            input_ids, mask = prompts.pad([ids])
            outputs = None
            if patches:  # the row's images, one vision output row each
                outputs = {name: np.concatenate([outputs_of[id(p)][name] for p in patches]) for name in names}
            rows = np.zeros(len(patches), np.int64)
            feed = decoder_feed(manifest.graphs["decoder"].inputs, input_ids, mask, outputs, rows, manifest.hidden_size)
            out.append(decoder.run(None, feed)[0])
        return np.concatenate(out)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def ranges(model: Any, ops: list[Any], feeds: list[dict]) -> dict[str, dict[str, Any]]:
    """Per activation: min, max over all rows; channel and token ratios and the worst token positions."""
    from pue.calibration.stats import activation_session

    names = sorted({op.activation for op in ops})
    session = activation_session(model, names)
    out: dict[str, dict[str, Any]] = {}
    for feed in feeds:
        for name, value in zip(names, session.run(names, feed), strict=True):
            flat = value.reshape(-1, value.shape[-1])
            token_absmax = np.abs(flat).max(axis=1)
            channel_absmax = np.abs(flat).max(axis=0)
            entry = out.setdefault(name, {"lo": 0.0, "hi": 0.0, "channel": np.zeros(flat.shape[1]), "token": []})
            entry["lo"], entry["hi"] = min(entry["lo"], float(flat.min())), max(entry["hi"], float(flat.max()))
            entry["channel"] = np.maximum(entry["channel"], channel_absmax)
            worst = np.argsort(token_absmax)[::-1][:3]
            entry["token"].append(
                {
                    "ratio": float(token_absmax.max() / max(np.median(token_absmax), 1e-12)),
                    "positions": [int(i) for i in worst],
                }
            )
    return out


def prepare(
    bundle: Path, rotate: bool, smooth: bool, scheme: str, rows: Rows, split: bool = False
) -> tuple[dict, dict, dict]:
    """The bundle's FP32 graphs as `pue-export quantize` prepares them; `split`: the decoder's residual-stream
    writers also compute the columns that norm gains amplify in float (`channel_split`, after smoothing)."""
    import onnx

    from pue.calibration.channel_split import amplified_channels, split_writer_columns
    from pue.calibration.graph_ops import weight_ops
    from pue.calibration.rotation import rotate_decoder
    from pue.calibration.smoothing import smooth_model
    from pue.calibration.stats import collect_channel_stats

    models = {name: onnx.load(str(bundle / f"{name}.onnx")) for name in ("vision", "decoder")}
    if rotate:
        rotate_decoder(models["decoder"])
    feeds = {"vision": rows.vision_feeds, "decoder": rows.decoder_feeds}
    ops = {}
    for name, model in models.items():
        amplified = amplified_channels(model)  # before smoothing folds its scales into the gains
        ops[name] = [op for op in weight_ops(model, name) if op.op_type == "MatMul"]
        if smooth:
            stats = collect_channel_stats(model, ops[name], feeds[name])
            ops[name], _, _ = smooth_model(model, ops[name], stats, scheme)
        if split:
            split_writer_columns(model, amplified)  # its side products are Constants: left float below
    stats = {name: ranges(models[name], ops[name], feeds[name]) for name in models}
    return models, ops, stats


def simulate(prepared: tuple[dict, dict, dict], chosen: set[str], token: set[str], scheme: str) -> tuple[Any, Any]:
    """(vision, decoder) sessions with the `chosen` groups simulated int8 (`token` groups per token)."""
    from pue.calibration.fake_quant import ActivationQuant, fake_quantize, float_session

    models, ops, stats = prepared
    sessions = {}
    for name, model in models.items():
        picked = [op for op in ops[name] if group_of(op.node) in chosen]
        plans = {}
        for op in picked:
            entry = stats[name][op.activation]
            if group_of(op.node) in token:
                plans[op.activation] = ActivationQuant("token")
            elif scheme == "dynamic":
                plans[op.activation] = ActivationQuant("dynamic")
            else:
                plans[op.activation] = ActivationQuant("static", scheme, entry["lo"], entry["hi"])
        sessions[name] = float_session(fake_quantize(model, picked, plans, QMAX[scheme]))
    return sessions["vision"], sessions["decoder"]


def main() -> None:
    from pue.calibration.channel_split import amplified_channels
    from pue.calibration.fake_quant import float_session

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--rotate", default="on")
    parser.add_argument("--smooth", default="on")
    parser.add_argument("--patches", type=int, default=16)
    parser.add_argument("--captions", type=int, default=8)
    parser.add_argument("--modes", default="u8,s8,dynamic")
    parser.add_argument("--groups", default="on", help="off: `all` (and its split) only, no per-group cases")
    parser.add_argument("--split", default="on", help="also measure `all` with the writers' amplified columns float")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = Rows(args.bundle, args.patches, args.captions)
    import onnx

    parent = {name: float_session(onnx.load(str(args.bundle / f"{name}.onnx"))) for name in ("vision", "decoder")}
    reference = rows.embed(parent["vision"], parent["decoder"])
    results: list[dict] = []
    facts: dict[str, Any] = {}
    for scheme in args.modes.split(","):
        prepared = prepare(args.bundle, args.rotate == "on", args.smooth == "on", scheme, rows)
        models, ops, stats = prepared

        def measure(
            label: str,
            chosen: set[str],
            token: set[str] = frozenset(),
            scheme: str = scheme,
            prepared: tuple = prepared,
        ) -> None:
            cos = cosines(rows.embed(*simulate(prepared, chosen, token, scheme)), reference)
            row = {"scheme": scheme, "case": label, "mean_cosine": float(cos.mean()), "min_cosine": float(cos.min())}
            results.append(row)
            print(json.dumps(row), flush=True)

        everything = set(GROUPS)
        measure("all", everything)
        if args.split == "on" and amplified_channels(onnx.load(str(args.bundle / "decoder.onnx")))[0]:
            split = prepare(args.bundle, args.rotate == "on", args.smooth == "on", scheme, rows, split=True)
            measure("all, amplified writer columns float", everything, prepared=split)
        for group in GROUPS if args.groups == "on" else []:
            if group == next(iter(GROUPS)):
                measure("all-token", everything, everything)
            measure(f"float:{group}", everything - {group})
            measure(f"only:{group}", {group})
            measure(f"token:{group}", everything, {group})
        for name in models:
            for op in ops[name]:
                group = group_of(op.node)
                entry = stats[name][op.activation]
                channel = entry["channel"]
                worst_token = max(entry["token"], key=lambda t: t["ratio"])
                facts.setdefault(scheme, {})[f"{group} | {op.node}"] = {
                    "range": [round(entry["lo"], 3), round(entry["hi"], 3)],
                    "channel_ratio": float(channel.max() / max(np.median(channel), 1e-12)),
                    "worst_channels": [int(i) for i in np.argsort(channel)[::-1][:3]],
                    "token_ratio": worst_token["ratio"],
                    "worst_token_positions": worst_token["positions"],
                }
    if args.json:
        args.json.write_text(json.dumps({"bundle": str(args.bundle), "results": results, "facts": facts}, indent=2))
    print("| scheme | case | mean cos | min cos |\n|---|---|---|---|")
    for r in results:
        print(f"| {r['scheme']} | {r['case']} | {r['mean_cosine']:.5f} | {r['min_cosine']:.5f} |")
    first = next(iter(facts.values()))
    print("\n| group | op input | range | channel ratio | token ratio | worst tokens |\n|---|---|---|---|---|---|")
    for key, f in first.items():
        group, node = key.split(" | ")
        print(
            f"| {group} | {node} | {f['range']} | {f['channel_ratio']:.1f} | {f['token_ratio']:.1f} | "
            f"{f['worst_token_positions']} |"
        )


if __name__ == "__main__":
    main()
