"""The INT8 search's rule grammar (ranges, then the split and GPTQ flags in one order) and its step comparison."""

from __future__ import annotations

from search_fakes import Verdict

from pue.calibration.candidates import GPTQ, SPLIT, better, other_rounding, ranges_rule, with_flags


def test_rules_keep_one_flag_order_and_flip_only_the_rounding():
    assert with_flags("mse", GPTQ, SPLIT) == with_flags("mse" + GPTQ, SPLIT) == "mse+split+gptq"
    assert with_flags("minmax+split", "") == "minmax+split"  # a bare "best" variant keeps the best's flags
    assert ranges_rule("mse+split+gptq") == "mse"
    assert other_rounding("minmax+split") == "minmax+split+gptq"
    assert other_rounding("minmax+split+gptq") == "minmax+split"


def test_a_step_is_taken_when_it_passes_or_raises_the_minimum_without_lowering_the_mean():
    def verdict(passed: bool, mean: float, minimum: float) -> Verdict:
        return Verdict(passed, {"mean_cosine": mean, "min_cosine": minimum, "top1": 1.0})

    assert better(verdict(True, 0.99, 0.5), verdict(False, 0.999, 0.99))
    assert better(verdict(False, 0.99, 0.96), verdict(False, 0.99, 0.95))
    assert not better(verdict(False, 0.98, 0.96), verdict(False, 0.99, 0.95))  # the mean fell
    assert not better(verdict(False, 0.999, 0.94), verdict(False, 0.99, 0.95))  # the minimum fell
