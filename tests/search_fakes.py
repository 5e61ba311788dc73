"""A stand-in for the gate's verdict, for INT8 search tests with fake judges."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Verdict:
    passed: bool
    overall: dict = field(default_factory=dict)

    def failures(self) -> list[str]:
        return [] if self.passed else ["min cosine"]

    def to_dict(self) -> dict:
        return {"passed": self.passed, "overall": self.overall}
