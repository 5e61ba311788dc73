"""pue-embed's progress display: slides and tiles bars with counts, tiles/s and an ETA; failed slides printed."""

from __future__ import annotations

import io
import time
from pathlib import Path

from rich.console import Console

from pue.cli.embed_run import RichProgress
from pue.embed.inputs import SlideInput
from pue.embed.records import SlideRecord


def test_bars_show_counts_rate_and_failures() -> None:
    buffer = io.StringIO()
    out = Console(file=buffer, force_terminal=True, width=120, color_system=None)
    with RichProgress(out, total_slides=2) as progress:
        progress.slide_started(SlideInput("s1", Path("s1.svs")), 10)
        progress.tiles_done(4)
        time.sleep(0.3)
        progress.tiles_done(4)
        progress.progress.refresh()
        shown = buffer.getvalue()
        assert "tiles of s1" in shown and "8/10" in shown and "tiles/s" in shown
        assert "slides" in shown and "0/2" in shown
        progress.slide_finished(SlideRecord("s1", "s1.svs", "done", tiles=10))
        progress.slide_finished(SlideRecord("s2", "s2.svs", "failed", error="truncated file"))
        progress.progress.refresh()
    shown = buffer.getvalue()
    assert "2/2" in shown and "s2: failed: truncated file" in shown and "s1: done" not in shown
