"""`pue-export quantize --precision int8-dynamic --target openvino`: int8 weights alone (`weights_only`), whose
activations OpenVINO quantizes per token and per group of channels at run time; gated by running OpenVINO with the
group size pinned as the runtime pins it."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from pue.bundle import read_manifest, verify_files
from pue.calibration.simulate import qdq_grouped
from pue.calibration.weights_only import quantize_weights_only
from pue.data import patch_set
from pue.precisions import OPENVINO_GROUP_SIZE, ActivationScheme, bundle_spec
from pue.runtime import Embedder
from pue.runtime.backends import openvino as ov_backend
from pue.runtime.backends.cpu_int8 import refuse_saturating_weights

if os.environ.get("PUE_REQUIRE_OPENVINO") == "1":  # .ci/run installs the `openvino` extra: missing, these fail
    import openvino  # noqa: F401
else:
    pytest.importorskip("openvino")


def _two_weight_ops(rng: np.random.Generator) -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    """x·W1 (MatMul, W1 [16, 8]) then Gemm(h, W2ᵀ) (transB, W2 [4, 8]), and a third op reading W1 left out."""
    w1 = rng.standard_normal((16, 8)).astype(np.float32)
    w2 = rng.standard_normal((4, 8)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="first"),
        helper.make_node("Gemm", ["h", "w2"], ["y"], name="second", transB=1),
        helper.make_node("MatMul", ["x", "w1"], ["z"], name="left_out"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 16])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 4]),
            helper.make_tensor_value_info("z", TensorProto.FLOAT, [3, 8]),
        ],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), w1, w2


def test_weights_only_rewrites_the_chosen_ops_per_output_channel():
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    model, w1, w2 = _two_weight_ops(rng)
    x = rng.standard_normal((3, 16)).astype(np.float32)
    done = quantize_weights_only(model, ["first", "second"])
    assert done == ["first", "second"]
    onnx.checker.check_model(model)
    inits = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    # the MatMul's [K, N] weight under onnxruntime's names (GPTQ re-rounds those), one scale per output column
    assert inits["w1_quantized"].dtype == np.int8 and inits["w1_scale"].shape == (8,)
    assert int(np.abs(inits["w1_quantized"]).max()) == 127  # full 8-bit levels
    assert inits["w2_quantized_t"].shape == (4, 8) and inits["w2_scale_t"].shape == (4,)  # Gemm transB: per row
    assert "w1" in inits and "w2" not in inits  # `left_out` still reads the float weight; w2 has no reader left
    left_out = next(node for node in model.graph.node if node.name == "left_out")
    assert left_out.input[1] == "w1"
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    y, z = session.run(None, {"x": x})
    np.testing.assert_allclose(z, x @ w1, rtol=1e-5, atol=1e-5)
    expected = (x @ w1) @ w2.T
    assert np.abs(y - expected).max() <= 0.02 * np.abs(expected).max()
    assert np.abs(y - expected).max() > 0  # int8 weights: not the float function


def test_grouped_simulation_keeps_an_outlier_channel_inside_its_group():
    """One channel at 1000× the others sets the step of its own group of 32 only (a per-tensor step would round
    every other channel of the row to zero)."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 96)).astype(np.float32)
    x[:, 5] *= 1000.0
    q = qdq_grouped(x)
    other_groups = slice(32, 96)
    relative = np.abs(q[:, other_groups] - x[:, other_groups]).max() / np.abs(x[:, other_groups]).max()
    assert relative < 1 / 127
    assert np.abs(q[:, 5] - x[:, 5]).max() <= np.abs(x[:, 5]).max() / 254 + 1e-3
    others = q[:, :32][:, np.arange(32) != 5]
    assert np.count_nonzero(others) < 0.25 * others.size  # the outlier's own group is starved


def test_the_precisions_pin_openvinos_group_size_where_int8_weights_may_stand_alone():
    spec = bundle_spec("int8-dynamic", "openvino")
    assert spec.qdq is not None and spec.qdq.scheme == ActivationScheme.GROUPED and spec.backend == "openvino"
    assert spec.dynamic_group == OPENVINO_GROUP_SIZE and spec.qdq.weight_qmax == 127
    assert ov_backend.compile_config(spec, 2, None)["DYNAMIC_QUANTIZATION_GROUP_SIZE"] == str(OPENVINO_GROUP_SIZE)
    for precision, target in (("fp32", "any"), ("bf16", "openvino"), ("fp16", "any")):
        config = ov_backend.compile_config(bundle_spec(precision, target), 2, None)
        assert config["DYNAMIC_QUANTIZATION_GROUP_SIZE"] == "0"
    # static INT8 for OpenVINO: pinned too, for the int8-weight ops its search may leave to run-time quantization
    config = ov_backend.compile_config(bundle_spec("int8", "openvino"), 2, None)
    assert config["DYNAMIC_QUANTIZATION_GROUP_SIZE"] == str(OPENVINO_GROUP_SIZE)


def test_full_range_weights_are_not_refused_on_a_saturating_cpu(monkeypatch):
    """OpenVINO chooses the kernels of its own run-time quantization (or computes the weights in float): no pair of
    pue's asks for a u8×s8 kernel, so the saturation refusal of static OpenVINO INT8 does not apply."""
    from pue.runtime.backends import cpu_int8

    monkeypatch.setattr(cpu_int8, "saturating_u8s8", lambda: True)
    refuse_saturating_weights(bundle_spec("int8-dynamic", "openvino"))  # does not raise
    with pytest.raises(Exception, match="saturate"):
        refuse_saturating_weights(bundle_spec("int8", "tensorrt"))


@pytest.fixture(scope="module")
def openvino_dynamic(fp32_bundle, quantized_bundle):
    return fp32_bundle("llava_next", "ci"), *quantized_bundle("int8-dynamic", "openvino")


def test_bundle_holds_int8_weights_alone_and_passes_the_gate_run_in_openvino(openvino_dynamic):
    _, out, result = openvino_dynamic
    assert result.fidelity.passed
    manifest = read_manifest(out)
    verify_files(out, manifest)
    assert (manifest.precision, manifest.target, manifest.backend) == ("int8-dynamic", "openvino", "openvino")
    assert "per token" in manifest.export.quantization.activations
    report = json.loads((out / "fidelity.json").read_text())
    assert f"groups of {OPENVINO_GROUP_SIZE}" in report["gate_device"]
    assert result.int8_flop_share is not None and result.int8_flop_share >= 0.8
    for graph in ("vision", "decoder"):
        model = onnx.load(str(out / f"{graph}.onnx"), load_external_data=False)
        ops = {node.op_type for node in model.graph.node}
        # no activation Q/DQ, no onnxruntime-only ops: DequantizeLinear on weights only
        assert "DequantizeLinear" in ops and not ops & {"QuantizeLinear", "DynamicQuantizeLinear", "MatMulInteger"}
        dequantized = {node.input[0] for node in model.graph.node if node.op_type == "DequantizeLinear"}
        initializers = {init.name for init in model.graph.initializer}
        assert dequantized <= initializers


def test_runtime_compiles_it_with_the_gated_group_size_and_matches_the_gate(openvino_dynamic, tmp_path, monkeypatch):
    parent, out, _ = openvino_dynamic
    monkeypatch.setenv(ov_backend.CACHE_ENV, str(tmp_path / "ov-cache"))
    images = patch_set("heldout")[:4]
    with Embedder.load(parent) as fp32:
        expected = fp32.embed_images(images)
    with Embedder.load(out) as dynamic:
        assert dynamic.backend_name == "openvino"
        compiled = dynamic.backend.vision.compiled
        assert str(compiled.get_property("DYNAMIC_QUANTIZATION_GROUP_SIZE")) == str(OPENVINO_GROUP_SIZE)
        got = dynamic.embed_images(images)
    cosines = np.sum(expected * got, axis=1)
    assert cosines.min() >= 0.98, cosines
    assert cosines.min() < 1 - 1e-7  # int8 weights: not the FP32 function


@pytest.mark.skipif(not ov_backend.cpu_bf16_support(), reason="int8-dynamic-bf16 is gated only on a CPU with bf16")
def test_the_bf16_variant_is_made_and_gated_in_bf16_on_a_cpu_with_bf16(fp32_bundle, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from pue.cli.export_app import app

    monkeypatch.setenv(ov_backend.CACHE_ENV, str(tmp_path / "ov-cache"))
    out = tmp_path / "mixed"
    bundle = fp32_bundle("llava_next", "ci")
    result = CliRunner().invoke(
        app,
        ["quantize", str(bundle), "-o", str(out), "--precision", "int8-dynamic-bf16", "--target", "openvino"]
        + ["--num-patches", "16"],
    )
    assert result.exit_code == 0, result.output
    manifest = read_manifest(out)
    assert (manifest.precision, manifest.target, manifest.backend) == ("int8-dynamic-bf16", "openvino", "openvino")
    assert json.loads((out / "fidelity.json").read_text())["gate"]["passed"]
    with Embedder.load(out) as mixed:
        assert mixed.backend.inference_precision == "bf16"
        compiled = mixed.backend.decoder.compiled
        assert str(compiled.get_property("DYNAMIC_QUANTIZATION_GROUP_SIZE")) == str(OPENVINO_GROUP_SIZE)
        assert mixed.embed_images(patch_set("heldout")[:2]).shape[0] == 2


def test_the_search_tries_no_per_token_rewrite_for_openvinos_run_time_int8():
    """onnxruntime's int8-dynamic tries every input per token (pue's MatMulInteger rewrite); OpenVINO's run-time INT8 is
    per token already, and OpenVINO would compile that rewrite into f32 kernels."""
    from types import SimpleNamespace

    from pue.calibration.graph_ops import WeightOp
    from pue.calibration.quantize_bundle import QuantizeOptions
    from pue.calibration.search_variants import TokenOutlierOps, initial_variants

    ops = [WeightOp("decoder", f"mm{i}", "MatMul", f"x{i}", f"w{i}", (8, 8), 128) for i in range(3)]
    prepared = SimpleNamespace(ops=ops, split_paths={}, reader_paths={})
    none = TokenOutlierOps(set(), set())

    def per_token_variants(target: str) -> list:
        options = QuantizeOptions(precision="int8-dynamic", target=target)
        variants = initial_variants(prepared, options, none, {"decoder": 4}, False, {})
        return [v for v in variants if v.per_token]

    assert [v.per_token for v in per_token_variants("onnxruntime")] == [{"mm0", "mm1", "mm2"}]
    assert per_token_variants("openvino") == []
