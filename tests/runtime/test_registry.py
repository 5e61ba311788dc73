"""The backend registry: a registered backend is chosen, refusals name the backends that could run a bundle and
their extras, options pass through, and `close()` / `with` release what a backend holds."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import tiny_bundle

from pue.bundle import TensorSpec, read_manifest, write_manifest
from pue.choices import BundleTarget, DeviceKind, Precision
from pue.errors import MissingDependencyError, PueError
from pue.runtime import Embedder
from pue.runtime.backends import Backend, BackendSpec, Runner, register, registered, unregister
from pue.runtime.backends.onnxruntime import OnnxRuntimeBackend
from pue.runtime.backends.registry import NoBackendInstalled, backend_spec


class FakeRunner(Runner):
    def __init__(self, name: str, inputs: list[TensorSpec], outputs: list[TensorSpec]) -> None:
        super().__init__(name)
        self._inputs, self._outputs = inputs, outputs

    def _activate(self) -> None:
        pass

    def _deactivate(self) -> None:
        pass

    def input_metadata(self) -> list[TensorSpec]:
        return self._inputs

    def output_metadata(self) -> list[TensorSpec]:
        return self._outputs

    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch = len(next(iter(feed.values())))
        if self.name == "vision":
            return {"image_features": np.ones((batch, *self._outputs[0].shape[1:]), np.float32)}
        vectors = np.zeros((batch, self._outputs[0].shape[-1]), np.float32)
        vectors[:, 0] = 1.0
        return {"sentence_embedding": vectors}


class FakeBackend(Backend):
    """Runs nothing real: records how it was made and whether it was closed."""

    name = "fake"
    made: list[FakeBackend] = []

    def __init__(self, bundle_dir: Path, manifest, device: str = "cpu", **options) -> None:
        super().__init__(manifest)
        self.device, self.options, self.closes = device, options, 0
        graphs = manifest.graphs
        self.vision = FakeRunner("vision", graphs["vision"].inputs, graphs["vision"].outputs)
        self.decoder = FakeRunner("decoder", graphs["decoder"].inputs, graphs["decoder"].outputs)
        self.vision.activate()
        self.decoder.activate()
        FakeBackend.made.append(self)

    def close(self) -> None:
        self.closes += 1
        super().close()


def fake_spec(name: str = "fake", factory=FakeBackend, **changes) -> BackendSpec:
    fields = dict(
        name=name,
        factory=factory,
        reads=("onnxruntime",),
        holds="ONNX graphs",
        precisions=(Precision.FP32,),
        targets=(BundleTarget.ANY,),
        devices=(DeviceKind.CPU,),
        extras={DeviceKind.CPU: name},
        options=("knob", "threads"),
    )
    fields.update(changes)
    return BackendSpec(**fields)


@pytest.fixture
def registry():
    """Register backends for one test; they are removed afterwards."""
    names = []

    def add(spec: BackendSpec) -> BackendSpec:
        names.append(spec.name)
        return register(spec)

    FakeBackend.made.clear()
    yield add
    for name in names:
        unregister(name)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return tiny_bundle.make_tiny_bundle(tmp_path_factory.mktemp("registry") / "fp32")


def test_builtin_backends_and_names():
    assert [b.name for b in registered()][:2] == ["onnxruntime", "tensorrt"]
    with pytest.raises(PueError, match="unknown backend 'nope'.*choose one of: auto, onnxruntime, tensorrt"):
        backend_spec("nope")
    with pytest.raises(PueError, match="not a backend name"):
        register(fake_spec("auto"))
    with pytest.raises(PueError, match="already registered"):
        register(fake_spec("onnxruntime"))


def test_a_registered_backend_is_chosen_with_its_options(registry, bundle):
    registry(fake_spec())
    with Embedder.load(bundle, backend="fake", options={"knob": 3}, threads=2) as embedder:
        backend = embedder.backend
        assert isinstance(backend, FakeBackend) and embedder.backend_name == "fake"
        assert backend.options == {"knob": 3, "threads": 2} and backend.device == "cpu"
        vectors = embedder.embed_texts(["tumour", "stroma"])
        assert vectors.shape == (2, embedder.dimension) and np.allclose(vectors[:, 0], 1.0)
    assert backend.closes == 1 and not backend.vision.is_active and embedder.closed
    embedder.close()  # a second close does nothing
    assert backend.closes == 1
    with pytest.raises(PueError, match="was closed"):
        embedder.embed_texts(["tumour"])
    # auto prefers the backend of the bundle's own kind, then the registration order
    with Embedder.load(bundle) as auto:
        assert auto.backend_name == "onnxruntime" and isinstance(auto.backend, OnnxRuntimeBackend)
    with pytest.raises(PueError, match="backend 'fake' takes no option 'session_options'.*its options: knob, threads"):
        Embedder.load(bundle, backend="fake", options={"session_options": {}})


def test_a_bundle_of_a_new_kind_goes_to_the_backend_that_reads_it(registry, bundle, tmp_path):
    import shutil

    registry(fake_spec(reads=("fakekind",), holds="fake plans"))
    own = tmp_path / "own"
    shutil.copytree(bundle, own)
    manifest = read_manifest(own)
    manifest.backend = "fakekind"
    write_manifest(own, manifest)
    with Embedder.load(own) as embedder:
        assert embedder.backend_name == "fake"
    with pytest.raises(PueError) as refused:
        Embedder.load(own, backend="onnxruntime")
    assert "holds fake plans, not ONNX graphs" in str(refused.value)
    assert 'backends that run it on cpu: fake (pip install "pue[fake]")' in str(refused.value)
    manifest.backend = "unheard-of"
    write_manifest(own, manifest)
    with pytest.raises(PueError, match="'unheard-of' bundle, which no registered backend reads"):
        Embedder.load(own)


def test_refusals_name_the_backends_that_could_and_their_extras(registry, bundle, tmp_path):
    with pytest.raises(PueError) as refused:
        Embedder.load(bundle, backend="tensorrt", device="cuda")
    message = str(refused.value)
    assert "holds ONNX graphs, not TensorRT engines" in message and "build engines with: pue-export trt" in message
    assert 'backends that run it on cuda:0: onnxruntime (pip install "pue[gpu]")' in message
    registry(fake_spec(precisions=(Precision.INT8,), targets=(BundleTarget.TENSORRT,)))
    with pytest.raises(PueError) as refused:
        Embedder.load(bundle, backend="fake")
    assert "backend 'fake' does not run fp32 bundles (it runs int8)" in str(refused.value)
    assert 'onnxruntime (pip install "pue[cpu]")' in str(refused.value)
    int8 = tiny_bundle.make_tiny_bundle(tmp_path / "int8", precision="int8", target="onnxruntime")
    with pytest.raises(PueError, match="quantized for onnxruntime on CPU; on a GPU, INT8 runs through TensorRT"):
        Embedder.load(int8, device="cuda")  # the table's advice, before any backend is tried
    with pytest.raises(PueError, match="does not run graphs made for target 'onnxruntime'"):
        Embedder.load(int8, backend="fake")


def test_a_bundle_no_installed_backend_can_run(registry, bundle, monkeypatch):
    def not_installed(*args, **kwargs):
        raise MissingDependencyError("fakeinfer", "fake", "the fake backend")

    registry(fake_spec(factory=not_installed))
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    monkeypatch.setitem(sys.modules, "openvino", None)
    with pytest.raises(NoBackendInstalled) as missing:
        Embedder.load(bundle)
    message = str(missing.value)
    assert "no backend that runs this bundle on cpu is installed" in message
    assert (
        'pip install "pue[cpu]" (onnxruntime) or pip install "pue[openvino]" (openvino) or pip install "pue[fake]" '
        "(fake)" in message
    )
    assert isinstance(missing.value, MissingDependencyError) and missing.value.extra == "cpu"
    with pytest.raises(MissingDependencyError, match=r'pip install "pue\[fake\]"') as one:
        Embedder.load(bundle, backend="fake")  # named: its own error, nothing else tried
    assert not isinstance(one.value, NoBackendInstalled)


def test_auto_moves_on_to_an_installed_backend(registry, bundle, monkeypatch):
    registry(fake_spec())
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    monkeypatch.setitem(sys.modules, "openvino", None)
    with Embedder.load(bundle) as embedder:
        assert embedder.backend_name == "fake"


def test_onnxruntime_session_options_pass_through(bundle, tmp_path):
    options = {
        "session_options": {"intra_op_num_threads": 1, "enable_mem_pattern": False},
        "session_config": {"session.intra_op.allow_spinning": "0"},
        "profile_dir": tmp_path / "profiles",
    }
    with Embedder.load(bundle, backend="onnxruntime", options=options) as embedder:
        backend = embedder.backend
        for runner in (backend.vision, backend.decoder):
            assert runner.session_options.intra_op_num_threads == 1
            assert runner.session_options.enable_mem_pattern is False
            assert runner.session_options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
            assert runner.session_options.get_session_config_entry("session.force_spinning_stop") == "1"  # pue's
        embedder.embed_texts(["tumour"])
        files = backend.end_profiling()
    assert sorted(files) == ["decoder", "vision"]
    assert all(path.parent == tmp_path / "profiles" and path.stem.startswith(name) for name, path in files.items())
    assert all(path.stat().st_size > 0 for path in files.values())
    assert backend.vision.session is None and backend.decoder.session is None  # released on leaving `with`
    with pytest.raises(PueError, match="SessionOptions has no setting 'turbo'"):
        Embedder.load(bundle, options={"session_options": {"turbo": True}})
    with Embedder.load(bundle, threads=1) as plain, pytest.raises(PueError, match="profiler is off"):
        plain.backend.end_profiling()
