"""Progress of long work where output goes to a log file, not a terminal: a line every so often."""

from __future__ import annotations

import time

EVERY_S = 30.0
"""How often a line is printed."""


class ProgressLines:
    """Prints `label done/total · extra · about T left` at most every `every` seconds, and at the last item
    (`done == total`, or `last`).

    `start` is where this process took over (a resumed schedule): the time left is estimated from the
    pace of the items done here.
    """

    def __init__(self, label: str, start: int = 0, every: float | None = None) -> None:
        self.label, self.start, self.every = label, start, EVERY_S if every is None else every
        self.began = self.last = time.perf_counter()

    def __call__(self, done: int, total: int, extra: str = "", last: bool = False) -> None:
        now = time.perf_counter()
        if now - self.last < self.every and done < total and not last or done <= self.start:
            return
        self.last = now
        pace = (now - self.began) / (done - self.start)
        parts = [f"{self.label} {done}/{total}", extra, f"{pace:.1f} s each", f"about {duration(pace * (total - done))} left"]
        print(" · ".join(p for p in parts if p), flush=True)


def duration(seconds: float) -> str:
    """'3 min 05 s' or '42 s'."""
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"
