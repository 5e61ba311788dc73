"""Engine metadata and TensorRT's compatibility rules, with made-up TensorRT versions and GPUs (no TensorRT here)."""

from __future__ import annotations

import json

import pytest

from pue.errors import BundleError
from pue.runtime.backends.tensorrt_compat import (
    BuildFlags,
    EngineMetadata,
    PlatformInfo,
    ShapeRange,
    check_engine_compatibility,
    metadata_path,
    profile_problem,
    sm_name,
    version_tuple,
)

HINT = "rebuild the engines on this machine with `pue-export trt /data/parent -o /data/engines`"
L40S = PlatformInfo("10.14.1.48", "NVIDIA L40S", (8, 9), "12.8", "13.0", "linux-x86_64")


def metadata(built_on: PlatformInfo = L40S, **flags) -> EngineMetadata:
    return EngineMetadata(
        graph="vision",
        engine="engines/vision.plan",
        precision="fp16",
        source_onnx="vision.onnx",
        source_onnx_sha256="ab" * 32,
        built_on=built_on,
        profiles={"pixel_values": ShapeRange((1, 3, 3, 336, 336), (8, 3, 3, 336, 336), (32, 3, 3, 336, 336))},
        build_flags=BuildFlags(**flags),
        build_seconds=12.5,
        pue_version="0.1.0",
        engine_bytes=1234,
    )


def machine(version: str = "10.14.1.48", name: str = "NVIDIA L40S", capability=(8, 9), os="linux-x86_64"):
    return PlatformInfo(version, name, capability, "12.8", "13.0", os)


def test_version_tuple_and_names():
    assert version_tuple("10.14.1.48") == (10, 14, 1, 48)
    assert version_tuple("11.4.0rc1") == (11, 4, 0)
    assert sm_name((8, 9)) == "sm_89"
    assert metadata_path("engines/decoder.plan") == "engines/decoder.json"
    with pytest.raises(BundleError, match="cannot read the version"):
        version_tuple("dev")


@pytest.mark.parametrize(
    ("flags", "here", "ok"),
    [
        ({}, machine(), True),
        ({}, machine("10.14.1.49"), False),  # the standard runtime wants the same build
        ({}, machine("10.15.0.1"), False),
        ({}, machine(capability=(9, 0), name="NVIDIA H100"), False),
        ({}, machine(os="windows-amd64"), False),
        ({"version_compatible": True}, machine("10.16.0.5"), True),
        ({"version_compatible": True}, machine("11.4.0.3"), True),  # TensorRT 10 VC engines run on 11
        ({"version_compatible": True}, machine("10.13.0.1"), False),  # never backwards
        ({"version_compatible": True}, machine("12.0.0.1"), False),
        ({"hardware_compat": "ampere_plus"}, machine(capability=(9, 0), name="NVIDIA H100"), True),
        ({"hardware_compat": "ampere_plus"}, machine(capability=(8, 0), name="NVIDIA A100"), True),
        ({"hardware_compat": "ampere_plus"}, machine(capability=(7, 5), name="Tesla T4"), False),
        ({"hardware_compat": "same_compute_capability"}, machine(name="NVIDIA RTX 6000 Ada"), True),
        ({"hardware_compat": "same_compute_capability"}, machine(capability=(8, 6), name="RTX A6000"), False),
        ({"hardware_compat": "ampere_plus"}, machine("10.15.0.1", capability=(9, 0)), False),  # version still binds
        ({"version_compatible": True, "hardware_compat": "ampere_plus"}, machine("11.4.0.3", capability=(12, 0)), True),
    ],
)
def test_compatibility_rules(flags, here, ok):
    meta = metadata(**flags)
    if ok:
        check_engine_compatibility(meta, here, HINT)
    else:
        with pytest.raises(BundleError) as error:
            check_engine_compatibility(meta, here, HINT)
        message = str(error.value)
        assert "engine 'engines/vision.plan' was built for TensorRT 10.14.1 on sm_89 (NVIDIA L40S)" in message
        assert (
            f"this machine has TensorRT {'.'.join(here.tensorrt_version.split('.')[:3])} on "
            f"{sm_name(here.compute_capability)}" in message
        )
        assert "`pue-export trt /data/parent -o /data/engines`" in message


def test_mismatch_message_names_both_sides_and_the_rebuild_command():
    with pytest.raises(BundleError) as error:
        check_engine_compatibility(metadata(), machine("11.4.0.3", "NVIDIA H100 80GB HBM3", (9, 0)), HINT)
    assert str(error.value) == (
        "engine 'engines/vision.plan' was built for TensorRT 10.14.1 on sm_89 (NVIDIA L40S); this machine has "
        "TensorRT 11.4.0 on sm_90 (NVIDIA H100 80GB HBM3), which is a different TensorRT version; a GPU of another "
        f"compute capability ({HINT})"
    )


def test_other_gpu_model_of_the_same_capability_only_warns():
    warnings = check_engine_compatibility(metadata(), machine(name="NVIDIA RTX 6000 Ada"), HINT)
    assert len(warnings) == 1 and "tuned for the other GPU" in warnings[0]
    assert (
        check_engine_compatibility(
            metadata(hardware_compat="same_compute_capability"), machine(name="NVIDIA RTX 6000 Ada"), HINT
        )
        == []
    )


def test_metadata_round_trips_through_json(tmp_path):
    meta = metadata(version_compatible=True, workspace_bytes=4 << 30, timing_cache="/tmp/cache")
    meta.write(tmp_path / "vision.json")
    data = json.loads((tmp_path / "vision.json").read_text())
    assert data["built_on"]["compute_capability"] == [8, 9]
    assert data["profiles"]["pixel_values"]["max"] == [32, 3, 3, 336, 336]
    assert data["build_flags"] == {
        "strongly_typed": True,
        "version_compatible": True,
        "hardware_compat": "none",
        "workspace_bytes": 4 << 30,
        "timing_cache": "/tmp/cache",
    }
    again = EngineMetadata.read(tmp_path / "vision.json")
    assert again == meta
    assert again.max_batch() == 32 and again.min_batch() == 1


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda d: d.update(schema_version=7), "schema_version is 7"),
        (lambda d: d.pop("built_on"), "malformed"),
        (lambda d: d["build_flags"].update(hardware_compat="turing_plus"), "malformed"),
        (lambda d: d["profiles"]["pixel_values"].update(min=[64, 3, 3, 336, 336]), "malformed"),
    ],
)
def test_bad_metadata_is_refused(tmp_path, edit, needle):
    data = metadata().to_dict()
    edit(data)
    (tmp_path / "vision.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match=needle):
        EngineMetadata.read(tmp_path / "vision.json")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(BundleError, match="cannot read engine metadata"):
        EngineMetadata.read(tmp_path / "broken.json")


def test_profile_problems_name_the_limit_and_the_flag():
    sequence = ShapeRange((1, 1), (8, 1240), (32, 1728))
    assert profile_problem("input_ids", (4, 1728), sequence) is None
    what, flag = profile_problem("input_ids", (4, 2000), sequence)
    assert what == "input 'input_ids' sequence length (tokens per row) is 2000, the engine's profile allows 1..1728"
    assert flag == "--max-seq N"
    what, flag = profile_problem("attention_mask", (33, 10), sequence)
    assert "batch is 33" in what and flag == "--batch MIN:OPT:MAX"
    what, flag = profile_problem("input_ids", (4,), sequence)
    assert "rank 1" in what and flag == ""


def test_shape_range_must_be_ordered():
    with pytest.raises(ValueError, match="min <= opt <= max"):
        ShapeRange((1, 8), (1, 4), (1, 16))
    with pytest.raises(ValueError, match="rank"):
        ShapeRange((1,), (1, 4), (1, 16))
