"""The TensorRT backend: one engine per graph, device memory and streams through cuda-python.

Before anything is deserialized, each engine's metadata (`engines/<graph>.json`) is checked against the installed
TensorRT and the GPU (TensorRT's compatibility rules, `tensorrt_compat`), and the engine's bytes against the
manifest's size and sha256: an engine is an executable artifact (a version-compatible one carries host code).
The vision engine's output stays on the GPU and feeds the decoder engine; buffers are reused across calls and
only ever grow; batches larger than the profile's maximum are split, smaller than its minimum padded.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Collection, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from pue.bundle import FileEntry, Manifest, TensorSpec, resolve_inside
from pue.errors import BundleError, PueError
from pue.runtime.backends.base import (
    ATTENTION_MASK,
    IMAGE_FEATURES,
    INPUT_IDS,
    PIXEL_VALUES,
    SENTENCE_EMBEDDING,
    Backend,
    FeedValue,
    Runner,
    check_feed,
    decoder_feed,
    decoder_output_width,
    feature_inputs,
    parse_device,
    place_image_features,
)
from pue.runtime.backends.cuda_device import CudaDevice, DeviceBuffer, DeviceTensor, handle, import_cudart
from pue.runtime.backends.tensorrt_compat import EngineMetadata, check_engine_compatibility, profile_problem
from pue.runtime.backends.tensorrt_engine import (
    GRAPHS,
    import_tensorrt,
    load_metadata,
    make_logger,
    numpy_dtype,
    platform_info,
    read_engine_bytes,
    rebuild_hint,
    recorded_command,
)
from pue.runtime.backends.tensorrt_plan import pad_image_rows, pad_rows, row_runs, split_batch, tensor_bytes

log = logging.getLogger(__name__)


class TensorRTRunner(Runner):
    """One engine. `infer` takes and returns host arrays; `run` also takes and returns device tensors."""

    def __init__(
        self,
        name: str,
        bundle_dir: Path,
        entry: FileEntry,
        metadata: EngineMetadata,
        trt: ModuleType,
        device: CudaDevice,
        graph_inputs: list[TensorSpec],
        command: str,
    ) -> None:
        super().__init__(name)
        self.path = resolve_inside(bundle_dir, entry.path)
        self.entry = entry
        self.metadata = metadata
        self.trt = trt
        self.device = device
        self.command = command
        self.rebuild = f"rebuild the engines on this machine with `{command}`"
        self._dimension_names = {spec.name: spec.shape for spec in graph_inputs}
        self._buffers: dict[str, DeviceBuffer] = {}
        self._dtypes: dict[str, np.dtype] = {}
        self.runtime: Any = None
        self.engine: Any = None
        self.context: Any = None

    # --- lifecycle --------------------------------------------------------------------------------------
    def _activate(self) -> None:
        trt = self.trt
        plan = read_engine_bytes(self.path, self.entry)
        self._logger = make_logger(trt)
        self.runtime = trt.Runtime(self._logger)
        if self.metadata.build_flags.version_compatible:
            # the plan carries its own lean runtime; its bytes were checked against the manifest above
            self.runtime.engine_host_code_allowed = True
        self.engine = self.runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            detail = "; ".join(self._logger.errors[-3:]) or "no message from TensorRT"
            raise BundleError(f"TensorRT could not deserialize engine '{self.entry.path}' ({detail})", self.rebuild)
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise PueError(
                f"TensorRT could not create an execution context for '{self.entry.path}'",
                "the GPU is probably out of memory; free it or use a smaller engine profile",
            )
        self._describe_tensors()

    def _describe_tensors(self) -> None:
        trt, engine = self.trt, self.engine
        for index in range(engine.num_io_tensors):
            name = engine.get_tensor_name(index)
            dtype = numpy_dtype(trt, engine.get_tensor_dtype(name), f"engine '{self.entry.path}' tensor '{name}'")
            named = self._dimension_names.get(name, [])
            shape: list[int | str] = []
            for axis, dim in enumerate(engine.get_tensor_shape(name)):
                dynamic = named[axis] if axis < len(named) and isinstance(named[axis], str) else f"dim{axis}"
                shape.append(int(dim) if int(dim) >= 0 else dynamic)
            spec = TensorSpec(name, dtype.name, shape)
            self._dtypes[name] = dtype
            is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            (self._inputs if is_input else self._outputs).append(spec)
        missing = [spec.name for spec in self._inputs if spec.name not in self.metadata.profiles]
        if missing:
            raise BundleError(
                f"engine '{self.entry.path}' takes {missing}, which its metadata gives no profile", self.rebuild
            )

    def _deactivate(self) -> None:
        for buffer in self._buffers.values():
            buffer.release()
        self._buffers.clear()
        self.context = None
        self.engine = None
        self.runtime = None

    # --- description ------------------------------------------------------------------------------------
    def dtype(self, name: str) -> np.dtype:
        self._require_active()
        return self._dtypes[name]

    @property
    def max_batch(self) -> int:
        return self.metadata.max_batch()

    @property
    def min_batch(self) -> int:
        return self.metadata.min_batch()

    def check_shapes(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        """Refuse shapes outside the engine's profile with the limit and the flag that widens it."""
        for name, shape in shapes.items():
            problem = profile_problem(name, tuple(shape), self.metadata.profiles[name])
            if problem is not None:
                what, flag = problem
                hint = (
                    f"rebuild the engines with a larger {flag} (they were built with `{self.command}`)"
                    if flag
                    else self.rebuild
                )
                raise PueError(f"{self.name} engine: {what}", hint)

    # --- inference --------------------------------------------------------------------------------------
    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Host arrays in, host arrays out; batches are split to the profile's maximum and padded to its minimum."""
        batch = len(next(iter(feed.values())))
        parts: dict[str, list[np.ndarray]] = {spec.name: [] for spec in self._outputs}
        for start in range(0, batch, self.max_batch):
            rows = min(self.max_batch, batch - start)
            chunk = {name: pad_rows(value[start : start + rows], self.min_batch) for name, value in feed.items()}
            for name, value in self._execute(chunk, device_outputs=()).items():
                parts[name].append(value[:rows])
        return {name: np.concatenate(values) for name, values in parts.items()}

    def run(self, feed: Mapping[str, Any], device_outputs: Collection[str] = ()) -> dict[str, Any]:
        """Numpy inputs are uploaded, DeviceTensor inputs used where they lie; outputs named in `device_outputs`
        stay on the GPU as DeviceTensors (valid until this runner's next run). Checked and timed like `infer`."""
        self._require_active()
        check_feed(self.name, {name: FeedValue.of(value) for name, value in feed.items()}, self._inputs)
        start = time.perf_counter()
        outputs = self._execute(feed, device_outputs)
        self._record_time(time.perf_counter() - start)
        return outputs

    def _buffer(self, name: str) -> DeviceBuffer:
        if name not in self._buffers:
            self._buffers[name] = DeviceBuffer(self.device, f"{self.name}.{name}")
        return self._buffers[name]

    def _execute(self, feed: Mapping[str, Any], device_outputs: Collection[str]) -> dict[str, Any]:
        """Feed values are numpy arrays or DeviceTensors."""
        self.check_shapes({name: tuple(value.shape) for name, value in feed.items()})
        context, device = self.context, self.device
        keep_alive = []
        for name, value in feed.items():
            if not context.set_input_shape(name, tuple(int(d) for d in value.shape)):
                raise PueError(f"{self.name} engine refused shape {list(value.shape)} for input '{name}'", self.rebuild)
            if isinstance(value, DeviceTensor):
                address = value.ptr
            else:
                host = np.ascontiguousarray(value)
                keep_alive.append(host)
                address = self._buffer(name).reserve(host.nbytes)
                device.upload(address, host)
            context.set_tensor_address(name, address)
        outputs = {}
        for spec in self._outputs:
            shape = tuple(int(d) for d in context.get_tensor_shape(spec.name))
            if any(d < 0 for d in shape):
                raise PueError(f"{self.name} engine could not infer the shape of '{spec.name}' ({list(shape)})")
            address = self._buffer(spec.name).reserve(tensor_bytes(shape, self._dtypes[spec.name]))
            context.set_tensor_address(spec.name, address)
            outputs[spec.name] = DeviceTensor(address, shape, self._dtypes[spec.name])
        if not context.execute_async_v3(handle(device.stream)):
            detail = "; ".join(self._logger.errors[-3:]) or "no message from TensorRT"
            raise PueError(f"{self.name} engine failed to run ({detail})")
        results = {}
        for name, tensor in outputs.items():
            results[name] = tensor if name in device_outputs else device.download(tensor)
        device.synchronize()
        del keep_alive
        return results


class TensorRTBackend(Backend):
    """The engine bundle's vision and decoder engines on one GPU, checked and activated at construction."""

    name = "tensorrt"

    def __init__(self, bundle_dir: str | os.PathLike[str], manifest: Manifest, device: str = "cuda") -> None:
        super().__init__(manifest)
        self.bundle_dir = Path(bundle_dir)
        self.device_spec = parse_device(device)
        if not self.device_spec.is_cuda:
            raise PueError(
                f"bundle {self.bundle_dir} holds TensorRT engines, which run on CUDA GPUs only; "
                f"device {device!r} was asked for",
                "use device='cuda' (or 'cuda:N'), or load the parent ONNX bundle with backend='onnxruntime' on CPU",
            )
        if manifest.backend != self.name:
            raise BundleError(
                f"bundle {self.bundle_dir} holds ONNX graphs, not TensorRT engines",
                f"build engines with: pue-export trt {self.bundle_dir} -o ENGINE_BUNDLE",
            )
        missing = [name for name in GRAPHS if name not in manifest.graphs]
        if missing:
            raise BundleError(f"the manifest names no {' or '.join(missing)} engine", "rebuild with pue-export trt")
        trt = import_tensorrt()
        self.cuda = CudaDevice(import_cudart(), self.device_spec.index or 0)
        try:
            self._open(trt)
        except BaseException:
            self.close()
            raise
        self.max_batch = min(self.vision.max_batch, self.decoder.max_batch)

    def _open(self, trt: ModuleType) -> None:
        """Check every engine's metadata against this machine, then deserialize both (nothing before the checks)."""
        here = platform_info(trt, self.cuda)
        command = recorded_command(self.manifest)
        rebuild = rebuild_hint(self.manifest)
        runners = {}
        for name in GRAPHS:
            metadata = load_metadata(self.bundle_dir, self.manifest, name)
            for warning in check_engine_compatibility(metadata, here, rebuild):
                log.warning(warning)
            graph = self.manifest.graphs[name]
            runners[name] = TensorRTRunner(
                name, self.bundle_dir, graph.file, metadata, trt, self.cuda, graph.inputs, command
            )
        self.vision = runners["vision"]
        self.decoder = runners["decoder"]
        self._placed = DeviceBuffer(self.cuda, "placed_image_features")
        self.vision.activate()
        self.decoder.activate()

    def close(self) -> None:
        super().close()
        placed = getattr(self, "_placed", None)
        if placed is not None:
            placed.release()
        cuda = getattr(self, "cuda", None)
        if cuda is not None:
            cuda.close()

    def _run_checked(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, pixel_values: np.ndarray | None, image_rows: np.ndarray
    ) -> np.ndarray:
        # the sequence limit first: it is a property of the whole batch, and its error names --max-seq
        probe = (self.decoder.min_batch, input_ids.shape[1])
        self.decoder.check_shapes({INPUT_IDS: probe, ATTENTION_MASK: probe})
        self._check_images_per_row(image_rows)
        output = np.empty((input_ids.shape[0], decoder_output_width(self.manifest)), np.float32)
        for chunk in split_batch(input_ids.shape[0], image_rows, self.max_batch):
            pixels = None if pixel_values is None else pixel_values[chunk.pixel_start : chunk.pixel_stop]
            output[chunk.start : chunk.stop] = self._run_chunk(
                input_ids[chunk.start : chunk.stop], attention_mask[chunk.start : chunk.stop], pixels, chunk.image_rows
            )
        return output

    def _check_images_per_row(self, image_rows: np.ndarray) -> None:
        """Rows of more images than the decoder profile's image-token range are refused with the build flag."""
        if len(image_rows) == 0:
            return
        most = int(np.bincount(image_rows).max())
        allowed = self.decoder.metadata.profiles[IMAGE_FEATURES].max[1] // self.manifest.tokens_per_image
        if most > allowed:
            row = int(np.argmax(np.bincount(image_rows)))
            raise PueError(
                f"row {row} holds {most} images; these engines take at most {allowed} per row",
                f"rebuild them with --max-images {most} (they were built with `{self.decoder.command}`)",
            )

    def _run_chunk(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, pixel_values: np.ndarray | None, image_rows: np.ndarray
    ) -> np.ndarray:
        rows = len(input_ids)
        padded = max(rows, self.decoder.min_batch)
        if padded > rows:
            image_rows = pad_image_rows(image_rows, rows, padded)
            if pixel_values is not None and len(image_rows) > len(pixel_values):
                pixel_values = pad_rows(pixel_values, len(image_rows))
            input_ids, attention_mask = pad_rows(input_ids, padded), pad_rows(attention_mask, padded)
        # int64 by the graph contract; cast in case a TensorRT version imported them as int32
        input_ids = input_ids.astype(self.decoder.dtype(INPUT_IDS), copy=False)
        attention_mask = attention_mask.astype(self.decoder.dtype(ATTENTION_MASK), copy=False)
        if len(feature_inputs(self.decoder.input_metadata())) > 1:
            # more per-image inputs than image_features (DeepStack): every one placed on the host by the shared feed
            result = self.decoder.run(self._host_feed(input_ids, attention_mask, pixel_values, image_rows))
            return np.asarray(result[SENTENCE_EMBEDDING][:rows], dtype=np.float32)
        features = self._image_features(pixel_values, image_rows, padded)
        result = self.decoder.run({INPUT_IDS: input_ids, ATTENTION_MASK: attention_mask, IMAGE_FEATURES: features})
        return np.asarray(result[SENTENCE_EMBEDDING][:rows], dtype=np.float32)

    def _host_feed(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, pixel_values: np.ndarray | None, image_rows: np.ndarray
    ) -> dict[str, np.ndarray]:
        outputs = None
        if len(image_rows):
            images = len(image_rows)
            pixels = pad_rows(pixel_values.astype(self.vision.dtype(PIXEL_VALUES), copy=False), self.vision.min_batch)
            outputs = {name: value[:images] for name, value in self.vision.run({PIXEL_VALUES: pixels}).items()}
        return decoder_feed(
            self.decoder.input_metadata(), input_ids, attention_mask, outputs, image_rows, self.hidden_size()
        )

    def _image_features(
        self, pixel_values: np.ndarray | None, image_rows: np.ndarray, batch: int
    ) -> np.ndarray | DeviceTensor:
        wanted = self.decoder.dtype(IMAGE_FEATURES)
        if len(image_rows) == 0:
            # all-text batch: the image-token dimension is dynamic (1..tokens_per_image) and text rows ignore it
            return np.zeros((batch, 1, self.hidden_size()), dtype=wanted)
        images = len(image_rows)
        pixels = pad_rows(pixel_values.astype(self.vision.dtype(PIXEL_VALUES), copy=False), self.vision.min_batch)
        produced = self.vision.run({PIXEL_VALUES: pixels}, device_outputs=[IMAGE_FEATURES])[IMAGE_FEATURES]
        produced = produced.first_rows(images)
        one_per_row = bool(np.all(np.diff(image_rows) > 0))
        if produced.dtype != wanted or not one_per_row:
            # no cast kernel without torch, and rows of several images are placed on the host (the device copies
            # below move one image per row)
            return place_image_features(self.cuda.download(produced), image_rows, batch, np.dtype(wanted))
        if images == batch:
            return produced
        row_bytes = produced.nbytes // images
        placed = self._placed.reserve(row_bytes * batch)
        self.cuda.zero(placed, row_bytes * batch)
        for destination, source, count in row_runs(image_rows):
            self.cuda.copy(placed + destination * row_bytes, produced.ptr + source * row_bytes, count * row_bytes)
        return DeviceTensor(placed, (batch, *produced.shape[1:]), produced.dtype)
