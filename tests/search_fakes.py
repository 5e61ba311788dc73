"""A stand-in for the gate's verdict, for INT8 search tests with fake judges."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Verdict:
    passed: bool
    overall: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)  # `GateReport.extra`: where a check was read (fitted, unseen)

    def failures(self) -> list[str]:
        return [] if self.passed else ["min cosine"]

    def to_dict(self) -> dict:
        return {"passed": self.passed, "overall": self.overall}


def search_decoder(model, rows, work, options, check, gate):
    """`search_int8` on one graph named decoder, with `rows` as its calibration feeds and fake judges."""
    from pue.calibration.int8_search import Judges, search_int8

    return search_int8(
        {"decoder": model},
        {"decoder": lambda limit=None: rows[:limit]},
        {"decoder": 1},
        work,
        options,
        Judges(check=check, gate=gate),
        lambda message: None,
        {},
    )
