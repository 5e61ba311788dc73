"""The TensorRT backend on CPU, through fake `tensorrt` and cuda-python modules (tests/tensorrt_fakes.py) whose
engines run the parent's ONNX graphs: same numbers as onnxruntime, device-resident features, grow-only buffers,
batch splitting and padding, and every refusal before an engine is deserialized."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import tensorrt_fakes as fakes
import tiny_bundle

from pue.bundle import file_entry, read_manifest, write_manifest
from pue.errors import BundleError, MissingDependencyError, PueError
from pue.export.tensorrt.build import TrtOptions, build_engine_bundle
from pue.export.tensorrt.profiles import parse_batch
from pue.runtime import Embedder, Query
from pue.runtime.backends.tensorrt import TensorRTBackend

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

TEXTS = ["benign tissue", "", "necrotic debris with thin fibrous septa " * 4, "stroma"]


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """A tiny parent bundle and engine bundles built from it with the fakes (default, small, padded profiles)."""
    root = tmp_path_factory.mktemp("tensorrt")
    parent = tiny_bundle.make_tiny_bundle(root / "parent")
    built = {"parent": parent}
    with pytest.MonkeyPatch.context() as patch:
        fakes.install(patch)
        for name, options in {
            "engines": TrtOptions(),
            "small": TrtOptions(batch=parse_batch("1:2:3"), max_seq=80),
            "padded": TrtOptions(batch=parse_batch("2:2:4")),
            "portable": TrtOptions(version_compatible=True),
        }.items():
            built[name] = build_engine_bundle(
                parent, root / name, options, gate_set=tiny_bundle.small_gate_set(4)
            ).bundle
    return built


@pytest.fixture
def cuda(monkeypatch):
    trt, cudart = fakes.install(monkeypatch)
    return cudart


@pytest.fixture(scope="module")
def images():
    return tiny_bundle.heldout_patches(7)


@pytest.fixture(scope="module")
def expected(bundles, images):
    parent = Embedder.load(bundles["parent"])
    return {
        "images": parent.embed_images(images),
        "texts": parent.embed_texts(TEXTS),
        "composed": parent.embed_composed(images[:3], TEXTS[:3]),
        "mixed": parent.embed(
            [
                Query(text="stroma"),
                Query(image=images[1]),
                Query(image=images[2], text="as H&E"),
                Query(text=""),
                Query(image=images[3]),
            ],
            batch_size=5,
        ),
        "features": parent.image_features(images),
    }


def embed_all(embedder, images):
    return {
        "images": embedder.embed_images(images),
        "texts": embedder.embed_texts(TEXTS),
        "composed": embedder.embed_composed(images[:3], TEXTS[:3]),
        "mixed": embedder.embed(
            [
                Query(text="stroma"),
                Query(image=images[1]),
                Query(image=images[2], text="as H&E"),
                Query(text=""),
                Query(image=images[3]),
            ],
            batch_size=5,
        ),
        "features": embedder.image_features(images),
    }


@pytest.mark.parametrize("bundle", ["engines", "small", "padded", "portable"])
def test_engines_match_the_parent(cuda, bundles, images, expected, bundle):
    embedder = Embedder.load(bundles[bundle], device="cuda")
    assert isinstance(embedder.backend, TensorRTBackend)
    got = embed_all(embedder, images)
    for kind, want in expected.items():
        assert got[kind].shape == want.shape, kind
        np.testing.assert_allclose(got[kind], want, atol=2e-5, err_msg=kind)
    embedder.backend.close()


def test_vision_output_stays_on_the_device(cuda, bundles, images):
    embedder = Embedder.load(bundles["engines"], device="cuda")
    cuda.copies.clear()
    embedder.embed_images(images[:4])
    to_host = [size for kind, size in cuda.copies if kind == "cudaMemcpyDeviceToHost"]
    assert to_host == [4 * tiny_bundle.DIM * 4]  # only the sentence embeddings come back
    assert not [kind for kind, _ in cuda.copies if kind == "cudaMemcpyDeviceToDevice"]
    cuda.copies.clear()
    # rows sorted by length: image (5 tokens), image (5), text (6), composed (8): image rows 0, 1 and 3
    embedder.embed(
        [
            Query(image=images[0], text="with denser stroma"),
            Query(text="benign tissue with glands"),
            Query(image=images[1]),
            Query(image=images[2]),
        ],
        batch_size=4,
    )
    # a mixed batch: features placed on their rows on the device, one copy per run of image rows
    placed = [size for kind, size in cuda.copies if kind == "cudaMemcpyDeviceToDevice"]
    assert sorted(placed) == sorted(
        [1 * tiny_bundle.TOKENS * tiny_bundle.HIDDEN * 4, 2 * tiny_bundle.TOKENS * tiny_bundle.HIDDEN * 4]
    )
    assert [size for kind, size in cuda.copies if kind == "cudaMemcpyDeviceToHost"] == [4 * tiny_bundle.DIM * 4]


def test_buffers_are_reused_across_calls(cuda, bundles, images):
    embedder = Embedder.load(bundles["engines"], device="cuda")
    embedder.embed_images(images[:4])
    embedder.embed_texts(TEXTS)
    allocations = cuda.malloc_count
    embedder.embed_images(images[:3])
    embedder.embed_texts(TEXTS[:2])
    assert cuda.malloc_count == allocations
    embedder.backend.close()
    assert cuda.allocations == {}  # everything freed


def test_batches_beyond_the_profile_are_split(cuda, bundles, images):
    embedder = Embedder.load(bundles["small"], device="cuda")
    assert embedder.backend.max_batch == 3
    before = embedder.backend.decoder.inference_count
    embedder.embed_images(images, batch_size=7)
    assert embedder.backend.decoder.inference_count - before == 3  # 3 + 3 + 1 rows


def test_a_sequence_beyond_the_profile_names_the_limit_and_the_flag(cuda, bundles):
    embedder = Embedder.load(bundles["small"], device="cuda")
    with pytest.raises(PueError) as error:
        embedder.embed_texts(["benign tissue " * 40])
    message = str(error.value)
    assert "sequence length (tokens per row) is 82, the engine's profile allows 1..80" in message
    assert "rebuild the engines with a larger --max-seq N (they were built with `pue-export trt" in message


def test_device_cpu_is_refused(cuda, bundles):
    with pytest.raises(PueError, match="run on CUDA GPUs only; device 'cpu' was asked for"):
        Embedder.load(bundles["engines"])  # Embedder's default device is cpu


def test_missing_tensorrt_or_cuda_python_names_the_extra(monkeypatch, bundles):
    fakes.install(monkeypatch)
    fakes.hide(monkeypatch, "tensorrt")
    with pytest.raises(MissingDependencyError, match=r'pip install "pue\[tensorrt\]"'):
        Embedder.load(bundles["engines"], device="cuda")
    fakes.install(monkeypatch)
    fakes.hide(monkeypatch, "cuda.bindings", "cuda")
    with pytest.raises(MissingDependencyError, match="cuda-python"):
        Embedder.load(bundles["engines"], device="cuda")


def test_no_gpu_is_a_clear_error(monkeypatch, bundles):
    fakes.install(monkeypatch, fakes.FakeCudart(gpus=0))
    with pytest.raises(PueError, match="no CUDA GPU is usable here.*cudaErrorNoDevice.*nvidia-smi"):
        Embedder.load(bundles["engines"], device="cuda")
    fakes.install(monkeypatch, fakes.FakeCudart(gpus=1))
    with pytest.raises(PueError, match=r"cuda:3 was asked for, this machine has 1 GPU"):
        Embedder.load(bundles["engines"], device="cuda:3")


@pytest.mark.parametrize(
    ("version", "capability", "needle"),
    [
        ("11.4.0.3", (9, 0), "this machine has TensorRT 11.4.0 on sm_90"),
        ("10.14.1.48", (8, 9), "this machine has TensorRT 10.14.1 on sm_89"),
    ],
)
def test_foreign_engines_are_refused_before_deserializing(monkeypatch, bundles, version, capability, needle):
    trt, cudart = fakes.install(monkeypatch, fakes.FakeCudart(capability=capability), version=version)
    with pytest.raises(BundleError) as error:
        Embedder.load(bundles["engines"], device="cuda")
    message = str(error.value)
    assert "was built for TensorRT 10.14.1 on sm_90 (NVIDIA H100 80GB HBM3)" in message
    assert needle in message
    assert f"pue-export trt {bundles['parent'].resolve()} -o {bundles['engines'].resolve()}" in message
    assert trt.record["host_code_allowed"] == []  # nothing was deserialized
    assert cudart.allocations == {}


def test_version_compatible_engines_load_on_a_later_tensorrt_with_host_code_allowed(monkeypatch, bundles):
    trt, _ = fakes.install(monkeypatch, version="10.16.0.2")
    Embedder.load(bundles["portable"], device="cuda").embed_texts(["stroma"])
    assert trt.record["host_code_allowed"] == [True, True]
    with pytest.raises(BundleError, match="different TensorRT version"):
        Embedder.load(bundles["engines"], device="cuda")


def copy_bundle(source, target):
    shutil.copytree(source, target)
    return target


def test_tampered_engines_are_refused_even_without_hash_checks(cuda, bundles, tmp_path):
    bundle = copy_bundle(bundles["engines"], tmp_path / "tampered")
    plan = bundle / "engines" / "vision.plan"
    data = bytearray(plan.read_bytes())
    data[-2] ^= 0xFF
    plan.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="'engines/vision.plan' does not match its sha256"):
        Embedder.load(bundle, device="cuda")
    with pytest.raises(BundleError, match="engines are executable, so it is not loaded"):
        Embedder.load(bundle, device="cuda", verify_hashes=False)


def test_a_truncated_engine_names_the_file(cuda, bundles, tmp_path):
    bundle = copy_bundle(bundles["engines"], tmp_path / "truncated")
    plan = bundle / "engines" / "decoder.plan"
    plan.write_bytes(plan.read_bytes()[:-10])
    for verify in (True, False):
        with pytest.raises(BundleError, match=r"'engines/decoder.plan' has \d+ bytes, the manifest records"):
            Embedder.load(bundle, device="cuda", verify_hashes=verify)


def test_an_engine_tensorrt_cannot_read_names_the_file_and_the_reason(cuda, bundles, tmp_path):
    bundle = copy_bundle(bundles["engines"], tmp_path / "garbage")
    (bundle / "engines" / "vision.plan").write_bytes(b"not an engine at all")
    manifest = read_manifest(bundle)
    manifest.graphs["vision"].file = file_entry(bundle, "engines/vision.plan")
    write_manifest(bundle, manifest)
    with pytest.raises(BundleError, match="could not deserialize engine 'engines/vision.plan' .*magic tag"):
        Embedder.load(bundle, device="cuda")


def test_engine_metadata_must_be_listed_and_consistent(cuda, bundles, tmp_path):
    bundle = copy_bundle(bundles["engines"], tmp_path / "unlisted")
    manifest = read_manifest(bundle)
    del manifest.files["engines/decoder.json"]
    write_manifest(bundle, manifest)
    with pytest.raises(BundleError, match="lists no metadata 'engines/decoder.json'"):
        Embedder.load(bundle, device="cuda")
    bundle = copy_bundle(bundles["engines"], tmp_path / "swapped")
    meta = json.loads((bundle / "engines" / "vision.json").read_text())
    meta["engine"] = "engines/decoder.plan"
    (bundle / "engines" / "vision.json").write_text(json.dumps(meta))
    manifest = read_manifest(bundle)
    manifest.files["engines/vision.json"] = file_entry(bundle, "engines/vision.json")
    write_manifest(bundle, manifest)
    with pytest.raises(BundleError, match="describes vision engine 'engines/decoder.plan'"):
        Embedder.load(bundle, device="cuda")


def test_onnx_bundles_are_not_tensorrt_bundles(cuda, bundles):
    with pytest.raises(BundleError, match="holds ONNX graphs, not TensorRT engines"):
        TensorRTBackend(bundles["parent"], read_manifest(bundles["parent"]), device="cuda")


def test_runner_contract(cuda, bundles):
    with Embedder.load(bundles["small"], device="cuda").backend as backend:
        vision = backend.vision
        (spec,) = vision.input_metadata()
        assert (spec.name, spec.dtype, spec.shape) == ("pixel_values", "float32", ["batch", 3, 8, 8])
        assert [s.name for s in backend.decoder.input_metadata()] == ["input_ids", "attention_mask", "image_features"]
        with pytest.raises(PueError, match="has dtype float64"):
            vision.infer({"pixel_values": np.zeros((1, 3, 8, 8))})
        out = vision.infer({"pixel_values": np.zeros((5, 3, 8, 8), np.float32)})  # 5 > max batch 3: split
        assert out["image_features"].shape == (5, tiny_bundle.TOKENS, tiny_bundle.HIDDEN)
        assert vision.inference_count == 1 and vision.last_inference_time > 0
    assert not vision.is_active


def test_batches_below_the_profile_minimum_are_padded(cuda, bundles, images, expected):
    embedder = Embedder.load(bundles["padded"], device="cuda")
    assert embedder.backend.decoder.min_batch == 2
    np.testing.assert_allclose(embedder.embed_images(images[:1]), expected["images"][:1], atol=2e-5)
    np.testing.assert_allclose(embedder.embed_texts(TEXTS[3:]), expected["texts"][3:], atol=2e-5)
    mixed = embedder.embed([Query(text="stroma"), Query(image=images[1])], batch_size=2)
    np.testing.assert_allclose(mixed, expected["mixed"][:2], atol=2e-5)


def test_features_of_another_dtype_go_through_the_host(monkeypatch, tmp_path, images):
    parent = tiny_bundle.make_tiny_bundle(tmp_path / "parent", half_features=True)
    _, cudart = fakes.install(monkeypatch)
    engines = build_engine_bundle(parent, tmp_path / "engines", gate_set=tiny_bundle.small_gate_set(4)).bundle
    want = Embedder.load(parent).embed([Query(image=images[0]), Query(text="stroma"), Query(image=images[1])])
    embedder = Embedder.load(engines, device="cuda")
    assert embedder.backend.vision.dtype("image_features") == np.float16
    assert embedder.backend.decoder.dtype("image_features") == np.float32
    got = embedder.embed([Query(image=images[0]), Query(text="stroma"), Query(image=images[1])])
    np.testing.assert_allclose(got, want, atol=2e-5)


def test_rows_of_several_images_need_engines_built_for_them(cuda, bundles, images, tmp_path):
    """Issue 16: default engines take one image per row and refuse more with the flag; engines built with
    --max-images 4 run rows of 2 and 4 images beside texts and single images, as the parent does."""
    queries = [
        Query(text="stroma"),
        Query(images=images[:2]),
        Query(image=images[2]),
        Query(images=images[3:7], text="as H&E"),
        Query(text=""),
    ]
    want = Embedder.load(bundles["parent"]).embed(queries, batch_size=5)
    with pytest.raises(PueError, match=r"row 1 holds 2 images; these engines take at most 1 per row.*--max-images 2"):
        Embedder.load(bundles["engines"], device="cuda").embed(queries[:2])
    with pytest.MonkeyPatch.context() as patch:
        fakes.install(patch)
        options = TrtOptions(batch=parse_batch("2:2:4"), max_images=4)
        result = build_engine_bundle(
            bundles["parent"], tmp_path / "multi", options, gate_set=tiny_bundle.small_gate_set(6)
        )
    assert result.gate.per_kind["image_sets"]["count"] == 2  # the gate's sets of 2 and 4 images
    assert "--max-images 4" in (tmp_path / "multi" / "manifest.json").read_text()  # the rebuild command
    profile = result.engines["decoder"].profiles["image_features"]
    assert profile.max[1] == 4 * read_manifest(tmp_path / "multi").tokens_per_image
    assert result.engines["vision"].profiles["pixel_values"].max[0] == 4 * 4
    embedder = Embedder.load(tmp_path / "multi", device="cuda")
    np.testing.assert_allclose(embedder.embed(queries, batch_size=5), want, atol=2e-5)
    # a batch below the profile's minimum whose last row holds several images is padded with copies of that row
    np.testing.assert_allclose(embedder.embed(queries[3:4]), want[3:4], atol=2e-5)
