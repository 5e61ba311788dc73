"""Local checkpoint directories: validation, identity (sha256 of the weights), loading with clear errors."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pue.bundle import sha256_file
from pue.errors import CheckpointError

WEIGHT_SUFFIXES = (".safetensors", ".bin")


@dataclass
class CheckpointInfo:
    path: Path
    model_type: str
    config: dict[str, Any]
    weight_files: list[Path]

    @property
    def name(self) -> str:
        return self.path.name


def inspect_checkpoint(path: str | Path) -> CheckpointInfo:
    """Check that `path` is a local HF checkpoint directory of a supported architecture (no hub, no remote code)."""
    from pue.export.architectures import get_architecture

    root = Path(path)
    if not root.exists():
        raise CheckpointError(f"checkpoint '{root}' does not exist", "pass a local checkpoint directory")
    if not root.is_dir():
        raise CheckpointError(f"checkpoint '{root}' is not a directory", "pass the directory save_pretrained wrote")
    config_path = root / "config.json"
    if not config_path.is_file():
        raise CheckpointError(
            f"'{root}' has no config.json; it is not a transformers checkpoint",
            "pass the directory save_pretrained wrote (config.json, weights, tokenizer, processor)",
        )
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{config_path} is not valid JSON: {exc}") from exc
    model_type = config.get("model_type")
    if not model_type:
        raise CheckpointError(f"{config_path} names no model_type")
    get_architecture(model_type)
    weights = sorted(p for p in root.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    if not weights:
        raise CheckpointError(f"'{root}' holds no weights (*.safetensors or *.bin)", "the checkpoint is incomplete")
    return CheckpointInfo(root, model_type, config, weights)


def checkpoint_sha256(info: CheckpointInfo) -> str:
    """Identity of a checkpoint: sha256 over its weight files' names and sha256s (order-independent of disk)."""
    digest = hashlib.sha256()
    for path in info.weight_files:
        digest.update(path.name.encode())
        digest.update(sha256_file(path).encode())
    return digest.hexdigest()


def load_processor(info: CheckpointInfo, processor_path: str | Path | None = None) -> Any:
    """The checkpoint's processor with the slow (PIL) image processor, so pixels don't depend on torchvision.

    `processor_path` reads it from another folder (`--processor`: checkpoints that take their processor from the
    base model's repository); an architecture may load its own (`Architecture.load_processor`).
    """
    from transformers import AutoProcessor

    from pue.export.architectures import get_architecture

    source = Path(processor_path) if processor_path is not None else info.path
    if not source.is_dir():
        raise CheckpointError(f"processor folder '{source}' does not exist", "pass the folder that holds the processor")
    _quiet_transformers()
    try:
        own = get_architecture(info.model_type).load_processor(source)
        if own is not None:
            return own
        try:
            return AutoProcessor.from_pretrained(source, backend="pil", local_files_only=True)
        except TypeError:  # transformers releases before the `backend` argument
            return AutoProcessor.from_pretrained(source, use_fast=False, local_files_only=True)
    except CheckpointError:
        raise
    except Exception as exc:  # transformers raises many types for a broken processor
        raise CheckpointError(
            f"cannot load the processor of '{source}': {exc}",
            "the checkpoint needs its tokenizer and image processor files (save_pretrained of the processor)",
        ) from exc


def load_model(info: CheckpointInfo, dtype: str = "float32", device: str = "cpu") -> Any:
    import torch

    from pue.export.architectures import get_architecture

    architecture = get_architecture(info.model_type)
    _quiet_transformers()
    torch_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    try:
        model = architecture.model_class().from_pretrained(
            info.path, dtype=torch_dtype, local_files_only=True, trust_remote_code=False
        )
    except Exception as exc:
        raise CheckpointError(
            f"cannot load the weights of '{info.path}': {type(exc).__name__}: {str(exc).splitlines()[0][:300]}",
            "the weights are corrupt or do not match config.json",
        ) from exc
    return model.to(device).eval()


def _quiet_transformers() -> None:
    """transformers' own progress bars and advice would drown pue's progress; pue reports what matters."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
