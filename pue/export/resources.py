"""Resource plan from the config alone: weights per dtype, peak RAM of the export, whether the gate fits here."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from pue.runtime.cpu import GiB, available_memory_bytes

BYTES_PER_DTYPE = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass
class ResourcePlan:
    model_type: str
    parameters: int  # everything the checkpoint loads
    exported_parameters: int  # what the two graphs carry (no LM head: embeddings come from hidden states)
    dtype: str
    device: str
    checkpoint_bytes: dict[str, int]  # weights on disk per dtype
    bundle_bytes: int  # graphs on disk in the export dtype
    peak_host_bytes: int
    peak_device_bytes: int
    available_host_bytes: int | None
    fits: bool
    notes: list[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def lines(self) -> list[str]:
        def gb(n: int | None) -> str:
            return "unknown" if n is None else f"{n / GiB:.2f} GB"

        out = [
            f"parameters: {self.parameters / 1e6:,.3g} M ({self.exported_parameters / 1e6:,.3g} M exported)",
            "weights: " + ", ".join(f"{k} {gb(v)}" for k, v in self.checkpoint_bytes.items()),
            f"bundle ({self.dtype}): {gb(self.bundle_bytes)}",
            f"peak host RAM: {gb(self.peak_host_bytes)} of {gb(self.available_host_bytes)} available",
        ]
        if self.device.startswith("cuda"):
            out.append(f"peak GPU memory (reference and gate): {gb(self.peak_device_bytes)}")
        out.append("fits this machine: " + ("yes" if self.fits else "NO"))
        return out + self.notes


def count_parameters(config: Any, model_class: type) -> tuple[int, int]:
    """(all parameters, parameters outside the LM head), counted on the meta device: no memory, no weights."""
    import torch

    with torch.device("meta"):
        model = model_class(config)
    total = sum(p.numel() for p in model.parameters())
    head = model.get_output_embeddings()
    head_count = 0 if head is None else sum(p.numel() for p in head.parameters())
    tied = getattr(config, "tie_word_embeddings", False) or getattr(
        getattr(config, "text_config", None), "tie_word_embeddings", False
    )
    return int(total), int(total - (0 if tied else head_count))


def plan_export(
    config: Any, model_class: type, dtype: str = "float32", device: str = "cpu", available: int | None = None
) -> ResourcePlan:
    """Peak host memory of `pue-export onnx`, phase by phase.

    1. reference: torch holds the weights (W) on `device`, plus activations;
    2. export: the exporter keeps a second copy in the ONNX protobuf (W) beside torch's (W) on the host;
    3. gate: torch is freed before onnxruntime loads the graphs (about W, plus its arena).
    Peak host = 2 W (+10 %) on CPU; with --device cuda the reference and gate use the GPU, the export host.
    """
    total, exported = count_parameters(config, model_class)
    width = BYTES_PER_DTYPE[dtype]
    weights = total * width
    graphs = exported * width
    margin = 1.1
    peak_host = int((weights + graphs) * margin)
    peak_device = int(weights * 1.2) if device.startswith("cuda") else 0
    available = available_memory_bytes() if available is None else available
    notes = []
    fits = available is None or peak_host <= available
    if not fits:
        notes.append(
            "this export needs more RAM than is available: use --dtype float16"
            + (" --device cuda" if device == "cpu" else "")
            + ", or a larger machine"
        )
    if dtype == "float32" and total > 2e9:
        notes.append("an FP32 root of this size is large: --dtype float16 --device cuda halves it")
    return ResourcePlan(
        model_type=getattr(config, "model_type", "?"),
        parameters=total,
        exported_parameters=exported,
        dtype=dtype,
        device=device,
        checkpoint_bytes={name: total * size for name, size in BYTES_PER_DTYPE.items() if name != "bfloat16"},
        bundle_bytes=graphs,
        peak_host_bytes=peak_host,
        peak_device_bytes=peak_device,
        available_host_bytes=available,
        fits=fits,
        notes=notes,
    )
