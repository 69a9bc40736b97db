"""Progress lines for log files: throttled, always the last item, time left from this process's pace."""

from __future__ import annotations

import federimed.progress as progress
from federimed.progress import ProgressLines, duration


def test_lines_are_throttled_and_estimate_the_time_left(capsys, monkeypatch) -> None:
    clock = iter([0.0, 10.0, 20.0, 50.0, 60.0, 70.0])  # creation, then one reading per call
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    lines = ProgressLines("answered", start=2, every=30)
    for done in (3, 4, 5, 6):
        lines(done, 8, "federated")
    printed = capsys.readouterr().out.splitlines()
    assert printed == ["answered 5/8 · federated · 16.7 s each · about 50 s left"]  # 50 s for 3 items; 3 to go
    lines(8, 8)
    assert capsys.readouterr().out.splitlines() == ["answered 8/8 · 11.7 s each · about 0 s left"]


def test_durations_read_as_minutes_and_seconds() -> None:
    assert (duration(42), duration(185), duration(3600)) == ("42 s", "3 min 05 s", "60 min 00 s")
