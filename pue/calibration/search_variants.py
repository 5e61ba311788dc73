"""What the INT8 search (`pue.calibration.int8_search`) tries before its sensitivity fallback: the ops whose inputs
carry token outliers, and the variants in the order they are tried, each taken only if the calibration check says it
is better."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

from pue.calibration.candidates import GPTQ, READERS, SPLIT, WIDE, fits, flags_of, ranges_rule
from pue.calibration.openvino_int8 import needs_openvino
from pue.precisions import ActivationScheme, BundleTarget, TokenOutliers
from pue.runtime.cpu import saturating_u8s8

if TYPE_CHECKING:
    from pue.calibration.search_graphs import PreparedGraphs

__all__ = [
    "TokenOutlierOps",
    "Variant",
    "initial_variants",
    "retried_with_8_bit_weights",
    "per_token_path",
    "stores_weights_unsigned",
    "token_outlier_ops",
    "widens_weights",
]


class TokenOutlierOps(NamedTuple):
    """The ops whose inputs carry token outliers, by what the precision tries for them (at most one is not empty)."""

    per_token: set[str]  # tried per token (`pue.calibration.per_token`)
    in_float: set[str]  # tried in float while the check fails, within the 80 % rule


class Variant(NamedTuple):
    """One way to quantize tried before the fallback."""

    float_nodes: set[str]  # ops kept float, besides the best's
    per_token: set[str]  # ops per token: the best's replaced, or added to the best's with float ops or a "best…" rule
    rule: str  # a ranges rule ("minmax", "mse": the best's flags added), or "best" + flags: the best's rule with those
    while_failing: bool  # tried only while the best so far fails the check


def token_outlier_ops(prepared: PreparedGraphs, options: Any, say: Callable[[str], None]) -> TokenOutlierOps:
    """Ops whose inputs carry token outliers (massive activations, high-norm ViT tokens): one per-tensor step starves
    every other token. The precision's entry (`PrecisionSpec.token_outliers`) says what is tried for them: per token
    (int8-dynamic, `pue.calibration.per_token`) or float (static INT8: standard ONNX and OpenVINO have no per-token
    int8 kernel; within the 80 % rule, while the check fails). The check set decides whether either is done."""
    from pue.calibration.per_token import TOKEN_OUTLIER_RATIO

    all_stats = prepared.stats
    massive = {
        op.node
        for op in prepared.ops
        if all_stats.get(op.activation) is not None and all_stats[op.activation].token_ratio >= TOKEN_OUTLIER_RATIO
    }
    token_mode = options.spec.token_outliers
    if token_mode == TokenOutliers.PER_TOKEN and not options.per_token:  # --no-per-token
        token_mode = None
    if token_mode == TokenOutliers.FLOAT and not options.fallback:  # --no-fallback: nothing is kept in float
        token_mode = None
    token_candidates = massive if token_mode == TokenOutliers.PER_TOKEN else set()
    massive_float = massive if token_mode == TokenOutliers.FLOAT else set()
    if massive:
        what = {TokenOutliers.PER_TOKEN: "tried per token", TokenOutliers.FLOAT: "tried in float if int8 fails"}
        say(f"token outliers: {len(massive)} ops read massive tokens: {what.get(token_mode, 'left as they are')}")
    return TokenOutlierOps(token_candidates, massive_float)


def initial_variants(
    prepared: PreparedGraphs,
    options: Any,
    token_ops: TokenOutlierOps,
    tokens: dict[str, int],
    own_ranges: bool,
    clips: dict[str, float],
) -> list[Variant]:
    """What is tried before the sensitivity fallback, in order, each taken only if the calibration check says it is
    better. `tokens`: rows per patch of each graph (the 80 % rule); `own_ranges` and `clips`: whether the activation
    ranges are pue's and the clip the error-chosen ones apply (`search_graphs.activation_ranges`)."""
    static = options.spec.calibrated
    all_ops = prepared.ops
    variants: list[Variant] = []
    if token_ops.per_token:
        variants.append(Variant(set(), set(token_ops.per_token), "minmax", False))
    # static INT8: the massive-token ops in float first, while the check fails. Before the error-chosen ranges: a clip
    # that happens to fit the check's rows cuts the massive tokens themselves, which the model uses (measured: on
    # `llava massive` for OpenVINO with 16 calibration patches, ranges first passed the check at min 0.9908 and
    # failed the held-out gate at 0.9013; the float reader first passes both)
    if static and options.fallback and token_ops.in_float and fits(all_ops, token_ops.in_float, tokens):
        variants.append(Variant(set(token_ops.in_float), set(), "best", True))
    # then the best so far with its int8 weights rounded by GPTQ (`gptq`: each op's output error on calibration tokens,
    # not each weight's own error, kept small; same grids, same kernels), taken if the check says better. After the
    # token-outlier variants: GPTQ fitted to the calibration rows can pass their check with a massive-token reader in
    # per-tensor int8 and fail the held-out gate (measured: `llava massive` static, 16 patches: check min 0.9926,
    # held-out 0.9683). Every later candidate is quantized with the rounding taken and, while the check fails, also
    # with the other one where it is not taken (`alternate` in `search_int8`): which rounding helps depends on the
    # float and per-token sets (measured: on `qwen3_vl gains-few` GPTQ raised the per-tensor candidate's minimum, and
    # every fallback step from it failed where the same steps with nearest rounding passed; on `llava_next gains-few`
    # int8-dynamic only per token + GPTQ passes)
    if options.gptq:
        variants.append(Variant(set(), set(), "best" + GPTQ, False))
    # then the writers' amplified residual columns in float (`channel_split`), where norm gains amplify channels
    if prepared.split_paths:
        variants.append(Variant(set(), set(), "best" + SPLIT, False))
    # then the readers' amplified input rows in float as well (`split_reader_rows`): measured in simulation it raised
    # `llava_next gains-few`'s minimum and lowered `llava gains-few`'s, so the check decides
    if prepared.reader_paths:
        variants.append(Variant(set(), set(), "best" + SPLIT + READERS, False))
    if options.spec.qdq.scheme == ActivationScheme.DYNAMIC and options.per_token:
        # every input per token: what helps when norm gains make errors compound (onnxruntime's dynamic INT8; OpenVINO's
        # run-time INT8 is per token already, and compiles pue's per-token rewrite into f32 kernels)
        variants.append(Variant(set(), {op.node for op in all_ops if op.op_type == "MatMul"}, "minmax", True))
    if own_ranges and options.error_ranges and any(clip < 1.0 for clip in clips.values()):
        variants.append(Variant(set(), set(), "mse", False))
    # the ops the SQNR ranking cannot score (Conv: the vision patch embedding, whose int8 input and weights cost the
    # ci-sized fixtures up to 0.009 of minimum cosine), in float while the check fails
    unscored = {op.node for op in all_ops if op.op_type != "MatMul"}
    if static and options.fallback and unscored and fits(all_ops, unscored, tokens):
        variants.append(Variant(set(unscored), set(), "best", True))
    # last, while the check fails: 8-bit weights where the precision keeps 7 bits (u8×s8 kernels saturate on 8-bit
    # weights on x86 CPUs without VNNI): for onnxruntime stored as uint8 so that its u8×u8 kernels compute them exactly
    # on every CPU (`weight_storage`); for OpenVINO, as int8 where this CPU does not saturate (`widens_weights`). Last
    # because onnxruntime's u8×u8 kernels are slower (BENCHMARKS.md); before the float fallback,
    # which costs more. Measured: `llava_next gains-few` seed 2 static INT8 for onnxruntime, held-out minimum 0.9357
    # with 7-bit weights, 0.9964 with 8-bit. Once taken, the variants it follows are tried again with 8-bit weights
    # (`retried_with_8_bit_weights`)
    if widens_weights(options):
        variants.append(Variant(set(), set(), "best" + WIDE, True))
    # then, static INT8 for onnxruntime and OpenVINO, while the check still fails: every weight MatMul per token on top
    # of the best, the ops that cannot go per token (Conv: the patch embedding) in float as int8-dynamic leaves them
    # (where the 80 % rule allows), alone and with the amplified-channel splits. onnxruntime runs pue's per-token
    # rewrite (`pue.calibration.per_token`, MatMulInteger u8×u8 with 8-bit weights) in its integer kernels; for OpenVINO
    # the ops get int8 weights alone (`weights_only`), whose activations OpenVINO quantizes per token and group at run
    # time (`per_token_path`). Either way the ops stay int8 where the fallback would keep them float; slower than the
    # static kernels, hence after every static variant. With the splits too: what a split is worth depends on the
    # activations' error, as it does on the weights'. Measured on `llava_next gains-few` seed 1, static for onnxruntime:
    # every static variant and 9 ops in float left the held-out minimum at 0.588; every op per token with the patch
    # embedding still static int8, check minimum 0.36-0.51 (with or without the splits); with it float 0.54, + the
    # writers' split 0.957, + the readers' 0.987, and the held-out gate passes at 0.9819 (92.7 % int8). Smoothing chosen
    # again for per-token rows instead of the static one changed the same candidates by < 0.0003 (measured, not
    # shipped). TensorRT (standard Q/DQ) has no such path
    if per_token_path(options):
        every = {op.node for op in all_ops if op.op_type == "MatMul"}
        rest = unscored if unscored and fits(all_ops, unscored, tokens) else set()
        splits = [SPLIT] * bool(prepared.split_paths) + [SPLIT + READERS] * bool(prepared.reader_paths)
        variants += [Variant(set(rest), every, "best" + flags, True) for flags in ["", *splits]]
    return variants


def widens_weights(options: Any) -> bool:
    """Whether the search may try 8-bit weights where the precision keeps 7 bits, unless `--no-wide-weights`:
    onnxruntime INT8 (static or dynamic) stores them as uint8 around 128 (`stores_weights_unsigned`: its u8×u8 kernels
    are exact on every CPU); OpenVINO INT8 keeps them int8, so only where this CPU's int8 kernels do not saturate
    (VNNI, AMX, or not x86: `pue.runtime.cpu.saturating_u8s8`), and such a bundle is refused on a CPU whose kernels
    would (`pue.runtime.backends.cpu_int8.refuse_saturating_weights`). OpenVINO reads uint8 weights around 128 as
    compressed weights, not an int8 kernel (measured on an AVX-512 VNNI EPYC: an fp32 `FullyConnectedCompressed`,
    relative error 5.6e-3 against 8.9e-4 with the same levels stored as int8 in `brgemm_avx512_I8`)."""
    spec = options.spec
    if not (options.wide_weights and spec.qdq is not None and spec.qdq.reduced_weight_range):
        return False
    return stores_weights_unsigned(options) or (needs_openvino(spec) and not saturating_u8s8())


REWRITE = "rewrite"  # pue's per-token rewrite (`pue.calibration.per_token`), run by onnxruntime's integer kernels
GROUPED = "grouped"  # int8 weights alone (`pue.calibration.weights_only`): OpenVINO quantizes per token at run time


def per_token_path(options: Any) -> str | None:
    """How static INT8 quantizes ops per token where its target has a way (`REWRITE` for onnxruntime, `GROUPED` for
    OpenVINO), None for TensorRT (standard Q/DQ) and with `--no-per-token`."""
    spec = options.spec
    if not (spec.calibrated and options.per_token):
        return None
    if needs_openvino(spec):
        return GROUPED
    return REWRITE if spec.target == BundleTarget.ONNXRUNTIME and not spec.backend else None


def stores_weights_unsigned(options: Any) -> bool:
    """Whether 8-bit weights are stored as uint8 around 128 (`pue.calibration.weight_storage`): for onnxruntime (the
    precision names no other backend)."""
    return not options.spec.backend


def retried_with_8_bit_weights(
    tried: list[Variant], float_nodes: set[str], per_token: set[str], rule: str
) -> list[Variant]:
    """Once 8-bit weights are taken (`WIDE` in the best's `rule`), the variants tried before them whose change the best
    does not carry, again in their order, while the check fails: each was judged with 7-bit weights, and what a
    variant is worth depends on the weights' error (measured: `llava_next gains-few` seed 2 for onnxruntime, GPTQ and
    the readers' split were rejected with 7 bits; with 8 bits from the first attempt the same search passes the
    held-out gate at min 0.9964, with 8 bits added last it fails at 0.9512). `float_nodes`, `per_token`, `rule`: the
    best candidate's."""
    best_flags = set(flags_of(rule))
    retried: list[Variant] = []
    for variant in tried:
        carried = variant.float_nodes <= float_nodes and (
            set(flags_of(variant.rule)) <= best_flags
            if variant.rule.startswith("best")
            else ranges_rule(variant.rule) == ranges_rule(rule) and variant.per_token <= per_token
        )
        if not carried and variant not in retried:
            retried.append(variant._replace(while_failing=True))
    return retried
