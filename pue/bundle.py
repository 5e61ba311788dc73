"""The bundle: a directory of graphs and a typed `manifest.json` that names every file with its sha256.

Bundles are written atomically (built in a sibling temporary directory, then renamed into place; see
`pue.bundle_files`) and verified at load: every named file must lie inside the bundle directory and match its hash.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# the file helpers live in `pue.bundle_files`; named here too, as the bundle's public API always offered them
from pue.bundle_files import atomic_directory, check_output_path, resolve_inside, sha256_file
from pue.errors import BundleError

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "EngineBuildInfo",
    "ExportInfo",
    "FileEntry",
    "GraphSpec",
    "ImagePreprocessing",
    "Lineage",
    "Manifest",
    "Prompts",
    "QuantizationInfo",
    "SourceCheckpoint",
    "TensorSpec",
    "TokenizerInfo",
    "atomic_directory",
    "check_output_path",
    "file_entry",
    "manifest_sha256",
    "parse_format_version",
    "read_manifest",
    "resolve_inside",
    "sha256_file",
    "verify_files",
    "write_manifest",
]

log = logging.getLogger(__name__)

FORMAT = "pue-bundle"
# "MAJOR.MINOR": a reader accepts its own major and every minor of it (older minors are upgraded at read).
# 1.0 (written as the integer 1): `files` keyed by role names ("fidelity", "calibration", "fidelity_plot").
# 1.1: `files` keyed by the file's path inside the bundle ("fidelity.json"), one name for one file.
# 1.2: several images per row: `prompts.image_separator` says how k image placeholders join in a prompt; the
#      decoder's `image_features` carry a row's images one after another. Bundles of 1.0/1.1 run rows of 0 or
#      1 image and refuse rows of more (their separator is unknown: re-export them).
# 1.3: Qwen-VL bundles: `preprocessing.kind` "patches" (vision.onnx takes [batch, patches, patch_dim]);
#      `export.vision_input` (the vision graph's input layout) and `export.positions` (how the decoder graph
#      positions tokens: "1d", or "mrope" computed in the graph) recorded. LLaVA graphs and feeds unchanged.
# 1.4: graphs may carry per-image tensors beyond `image_features`, each [batch, tokens, levels, hidden] and placed
#      per row like it (Qwen3-VL's `deepstack_features`; `export.deepstack` records the levels); `embedding_dim`
#      may be below `hidden_size` where the recipe allows Matryoshka truncation (`recipe.matryoshka`): the runtime
#      truncates and renormalises. 1.3 manifests read unchanged (no extra tensors, embedding_dim = hidden_size).
FORMAT_VERSION = "1.4"
MANIFEST_NAME = "manifest.json"


def parse_format_version(version: object) -> tuple[int, int]:
    """(major, minor) of a manifest's format_version: 1 (the first bundles) is 1.0; "1.1" is 1.1."""
    if isinstance(version, bool):
        raise ValueError(version)
    if isinstance(version, int):
        return version, 0
    if isinstance(version, str):
        major, _, minor = version.partition(".")
        return int(major), int(minor or 0)
    raise ValueError(version)


@dataclass
class TensorSpec:
    name: str
    dtype: str
    shape: list[int | str]


@dataclass
class FileEntry:
    """A file of the bundle: relative path, sha256 and size in bytes."""

    path: str
    sha256: str
    size: int


@dataclass
class GraphSpec:
    file: FileEntry
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    external_data: list[FileEntry] = field(default_factory=list)


@dataclass
class ImagePreprocessing:
    """What the runtime needs to reproduce the checkpoint's (slow, PIL) image processor at `tile_size`.

    `kind` is "anyres" (LLaVA-NeXT: base crop plus a grid of crops) or "single" (LLaVA: one image).
    """

    kind: str
    tile_size: int
    crop_size: int
    num_crops: int
    image_mean: list[float]
    image_std: list[float]
    rescale_factor: float
    resample: int
    processor_config: dict[str, Any] = field(default_factory=dict)


@dataclass
class Prompts:
    """Fully rendered prompt templates: `{text}` and the image placeholder are left in.

    `image_separator` is what the checkpoint's chat template puts between consecutive image parts of one user
    turn: a row of k images renders its one placeholder as k placeholders joined by it. None where it is unknown
    (bundles before format 1.2, or a chat template that cannot render several image parts): such a bundle runs
    rows of one image only.
    """

    image: str
    text: str
    composed: str
    image_placeholder: str
    image_separator: str | None = None


@dataclass
class TokenizerInfo:
    file: FileEntry
    pad_token_id: int
    padding_side: str = "right"


@dataclass
class SourceCheckpoint:
    name: str
    sha256: str
    model_type: str


@dataclass
class Lineage:
    parent_sha256: str | None = None
    parent_precision: str | None = None
    calibration: str | None = None


def _field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _split_known(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """`data` as keyword arguments of dataclass `cls`: its fields, the other keys gathered in `extra`."""
    names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
    known = {key: value for key, value in data.items() if key in names}
    known["extra"] = {key: value for key, value in data.items() if key not in names}
    return known


def _plain(record: Any) -> dict[str, Any]:
    """A record's fields in order (None and empty mappings left out, nested records as dicts), then its `extra`."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(record):
        value = getattr(record, f.name)
        if f.name == "extra" or value is None or (isinstance(value, dict) and not value):
            continue
        out[f.name] = value.to_dict() if hasattr(value, "to_dict") else copy.deepcopy(value)
    out.update(copy.deepcopy(record.extra))
    return out


@dataclass
class QuantizationInfo:
    """How `pue-export quantize` made the graphs (`export.quantization`)."""

    precision: str
    target: str
    method: str
    activations: str
    weights: str
    attention: dict[str, Any] = field(default_factory=dict)  # {"mode": fused|standard, "graphs": {...}}
    pue: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantizationInfo:
        return cls(**_split_known(cls, data))

    def to_dict(self) -> dict[str, Any]:
        return _plain(self)


@dataclass
class EngineBuildInfo:
    """How `pue-export trt` built the engines (`export.tensorrt`)."""

    parent_bundle: str
    batch: str
    max_seq: int
    build_flags: dict[str, Any] = field(default_factory=dict)
    built_on: dict[str, Any] = field(default_factory=dict)
    build_seconds: dict[str, float] = field(default_factory=dict)
    rebuild_command: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EngineBuildInfo:
        return cls(**_split_known(cls, data))

    def to_dict(self) -> dict[str, Any]:
        return _plain(self)


@dataclass
class ExportInfo:
    """How the bundle's graphs were made (the manifest's `export`): exporter settings, the vision geometry and
    attention layouts `pue-export onnx` recorded, and for derived bundles the quantization or the engine build.

    Every field is optional (None: not recorded); keys this pue does not know are kept in `extra` and written back.
    """

    exporter: str | None = None
    opset: int | None = None
    dtype: str | None = None
    num_crops: int | None = None
    crop_size: int | None = None
    patch_size: int | None = None  # the vision tower's patch size in pixels
    attention: dict[str, dict[str, Any]] = field(default_factory=dict)  # per graph: kind, heads, head_dim, ...
    decoder_last_layer: str | None = None
    vision_input: dict[str, Any] = field(default_factory=dict)  # 1.3: layout ("anyres", "single", "patches"), shape
    positions: dict[str, Any] = field(default_factory=dict)  # 1.3: how the decoder positions tokens ("1d", "mrope")
    deepstack: dict[str, Any] = field(default_factory=dict)  # 1.4: DeepStack levels, vision blocks, decoder layers
    timings: dict[str, float] = field(default_factory=dict)
    quantization: QuantizationInfo | None = None
    tensorrt: EngineBuildInfo | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> ExportInfo:
        data = dict(data or {})
        # Engine bundles written before this type nested their parent's export under "parent_export".
        parent = data.pop("parent_export", None)
        if isinstance(parent, dict):
            data = {**parent, **data}
        known = _split_known(cls, data)
        if known.get("quantization") is not None:
            known["quantization"] = QuantizationInfo.from_dict(known["quantization"])
        if known.get("tensorrt") is not None:
            known["tensorrt"] = EngineBuildInfo.from_dict(known["tensorrt"])
        return cls(**known)

    def to_dict(self) -> dict[str, Any]:
        return _plain(self)


@dataclass
class Manifest:
    architecture: str
    precision: str
    target: str
    backend: str
    graphs: dict[str, GraphSpec]
    tile_size: int
    preprocessing: ImagePreprocessing
    recipe: dict[str, Any]
    prompts: Prompts
    pooling: Any
    tokenizer: TokenizerInfo
    image_token_id: int
    tokens_per_image: int
    embedding_dim: int
    hidden_size: int
    max_seq_len: int
    default_batch_size: int
    source_checkpoint: SourceCheckpoint
    lineage: Lineage = field(default_factory=Lineage)
    files: dict[str, FileEntry] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    fidelity: dict[str, Any] = field(default_factory=dict)
    export: ExportInfo = field(default_factory=ExportInfo)
    format: str = FORMAT
    format_version: str = FORMAT_VERSION

    def __post_init__(self) -> None:
        if isinstance(self.export, dict):  # the free dict of format 1.0/1.1 code
            self.export = ExportInfo.from_dict(self.export)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["export"] = self.export.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        try:
            graphs = {
                name: GraphSpec(
                    file=FileEntry(**g["file"]),
                    inputs=[TensorSpec(**t) for t in g["inputs"]],
                    outputs=[TensorSpec(**t) for t in g["outputs"]],
                    external_data=[FileEntry(**e) for e in g.get("external_data", [])],
                )
                for name, g in data["graphs"].items()
            }
            tokenizer = dict(data["tokenizer"])
            tokenizer["file"] = FileEntry(**tokenizer["file"])
            plain = {k: v for k, v in data.items() if k in {f.name for f in dataclasses.fields(cls)}}
            plain.update(
                graphs=graphs,
                preprocessing=ImagePreprocessing(**data["preprocessing"]),
                # a newer minor may add prompt fields: read the ones this pue knows
                prompts=Prompts(**{k: v for k, v in data["prompts"].items() if k in _field_names(Prompts)}),
                tokenizer=TokenizerInfo(**tokenizer),
                source_checkpoint=SourceCheckpoint(**data["source_checkpoint"]),
                lineage=Lineage(**data.get("lineage", {})),
                export=ExportInfo.from_dict(data.get("export")),
                # One name per file: keyed by its path (format 1.0 keyed some by role; upgraded here).
                files={v["path"]: FileEntry(**v) for v in data.get("files", {}).values()},
                format_version=FORMAT_VERSION,
            )
            return cls(**plain)
        except (KeyError, TypeError) as exc:
            raise BundleError(f"manifest is malformed: {exc}", "rebuild the bundle with pue-export") from exc

    def all_files(self) -> list[FileEntry]:
        """Every file the manifest names (graphs, their external data, tokenizer, extras)."""
        entries: list[FileEntry] = []
        for graph in self.graphs.values():
            entries.append(graph.file)
            entries.extend(graph.external_data)
        entries.append(self.tokenizer.file)
        entries.extend(self.files.values())
        return entries


def file_entry(bundle_dir: str | os.PathLike[str], relative: str) -> FileEntry:
    """Describe a file already written inside `bundle_dir`."""
    path = Path(bundle_dir) / relative
    return FileEntry(path=relative, sha256=sha256_file(path), size=path.stat().st_size)


def read_manifest(bundle_dir: str | os.PathLike[str]) -> Manifest:
    root = Path(bundle_dir)
    if not root.exists():
        raise BundleError(f"bundle '{root}' does not exist")
    if not root.is_dir():
        raise BundleError(f"bundle '{root}' is not a directory", "a bundle is the directory pue-export writes")
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise BundleError(f"'{root}' has no {MANIFEST_NAME}; it is not a pue bundle", "build one with pue-export onnx")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise BundleError(
            f"{path} is not a pue bundle manifest (format is {data.get('format')!r}, expected {FORMAT!r})"
        )
    version = data.get("format_version")
    ours = parse_format_version(FORMAT_VERSION)
    try:
        theirs = parse_format_version(version)
    except ValueError:
        theirs = None
    if theirs is None or theirs[0] != ours[0]:
        raise BundleError(
            f"bundle format_version is {version}, this pue reads versions {ours[0]}.x (up to {FORMAT_VERSION})",
            "rebuild the bundle with this version of pue-export, or install the pue that wrote it",
        )
    if theirs[1] > ours[1]:
        log.info("bundle format %s is newer than this pue's %s; reading the fields it knows", version, FORMAT_VERSION)
    return Manifest.from_dict(data)


def verify_files(bundle_dir: str | os.PathLike[str], manifest: Manifest, check_hashes: bool = True) -> None:
    """Check every named file lies inside the bundle, exists, and (unless opted out) matches its sha256."""
    for entry in manifest.all_files():
        path = resolve_inside(bundle_dir, entry.path)
        if not path.is_file():
            raise BundleError(f"bundle file '{entry.path}' is missing", "the bundle is incomplete; rebuild it")
        if path.stat().st_size != entry.size:
            raise BundleError(
                f"bundle file '{entry.path}' has {path.stat().st_size} bytes, the manifest records {entry.size}",
                "the file was truncated or replaced; rebuild the bundle",
            )
        if check_hashes:
            actual = sha256_file(path)
            if actual != entry.sha256:
                raise BundleError(
                    f"bundle file '{entry.path}' does not match its sha256 (expected {entry.sha256[:16]}…, "
                    f"found {actual[:16]}…)",
                    "the file was modified or corrupted; rebuild the bundle",
                )
    if not check_hashes:
        log.warning("sha256 verification of %s skipped at the caller's request", bundle_dir)


def manifest_sha256(bundle_dir: str | os.PathLike[str]) -> str:
    """Identity of a bundle: the sha256 of its manifest (which holds every file's sha256)."""
    return sha256_file(Path(bundle_dir) / MANIFEST_NAME)


def write_manifest(bundle_dir: str | os.PathLike[str], manifest: Manifest) -> None:
    path = Path(bundle_dir) / MANIFEST_NAME
    path.write_text(json.dumps(manifest.to_dict(), indent=2, sort_keys=False) + "\n")
