"""The calibration items the INT8 search decides on: captions from a captions file, for the fit and (the lines the
fit did not read) for the check; a missing or empty file refused."""

from __future__ import annotations

import pytest

from pue.calibration.check_items import calibration_captions, check_captions
from pue.calibration.quantize_bundle import QuantizeOptions
from pue.errors import PueError


def test_a_captions_file_gives_the_fit_its_first_lines_and_the_check_the_others(tmp_path):
    captions = tmp_path / "captions.txt"
    captions.write_text("glands\n\n  stroma  \nnecrosis\nmucin\n")
    options = QuantizeOptions(precision="int8", captions_file=str(captions), num_captions=2)
    fitted = calibration_captions(options)
    assert fitted == ["glands", "stroma"]
    assert check_captions(options, fitted) == ["necrosis", "mucin"]
    assert check_captions(options, ["glands", "stroma", "necrosis", "mucin"]) == [
        "glands",
        "stroma",
        "necrosis",
        "mucin",
    ]


@pytest.mark.parametrize("text", [None, "\n  \n"])
def test_a_missing_or_empty_captions_file_is_refused(tmp_path, text):
    captions = tmp_path / "captions.txt"
    if text is not None:
        captions.write_text(text)
    with pytest.raises(PueError, match="does not exist" if text is None else "holds no text"):
        calibration_captions(QuantizeOptions(precision="int8", captions_file=str(captions)))
