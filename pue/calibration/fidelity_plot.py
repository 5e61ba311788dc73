"""fidelity.png: the gate's cosine histogram with its headline numbers (matplotlib, the `bench` extra)."""

from __future__ import annotations

from pathlib import Path


def treatment_line(report: dict) -> str:
    """What the INT8 search did to the op groups, in one line ("" for precisions without one)."""
    if report.get("int8_flop_share") is None:
        return ""
    smoothed = report.get("smoothed", [])
    folds = sum(1 for group in smoothed if group.get("fold", "mul") != "mul")
    ranges = report.get("ranges") or {}
    parts = [
        f"{len(report.get('float_nodes', []))} ops float",
        f"{len(report.get('per_token_nodes', []))} per token",
        f"{len(smoothed)} groups smoothed ({folds} folded exactly)",
        *([f"ranges {ranges['rule']} ({len(ranges['clipped'])} clipped)"] if ranges else []),
        *(["GPTQ weights"] if (report.get("weights") or {}).get("rounding") == "gptq" else []),
        *(["amplified writer columns float"] if (report.get("channel_split") or {}).get("taken") else []),
        *(["amplified reader rows float"] if (report.get("channel_split") or {}).get("readers_taken") else []),
        *(["vision outputs bias-corrected"] if report.get("output_bias") else []),
        "rotated" if (report.get("rotation") or {}).get("applied") else "not rotated",
    ]
    return "; ".join(parts)


def plot_fidelity(report: dict, path: Path) -> bool:
    from pue.extras import have_extra

    if not have_extra("bench", path.name):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cosines = report["gate"]["cosines"]
    overall = report["gate"]["overall"]
    figure, axis = plt.subplots(figsize=(7, 4))
    axis.hist(cosines, bins=40, color="#3b6ea8")
    axis.axvline(report["gate"]["thresholds"]["min_cosine"], color="#b33", linestyle="--", label="min threshold")
    axis.set_xlabel("cosine to the FP32 parent's embedding (held-out items)")
    axis.set_ylabel("items")
    share = report.get("int8_flop_share")
    axis.set_title(
        f"{report['precision']} ({report['target']}): mean {overall['mean_cosine']:.4f}, top-1 {overall['top1']:.3f}, "
        f"top-5 {overall['top5']:.3f}" + (f", int8 FLOPs {share:.0%}" if share is not None else ""),
        fontsize=9,
    )
    treatment = treatment_line(report)
    if treatment:
        axis.text(0.01, 0.97, treatment, transform=axis.transAxes, fontsize=7, va="top", color="#333")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True
