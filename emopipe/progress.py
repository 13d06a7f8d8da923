"""Progress of the long loops (OCR, feature extraction, training epochs, ingest): a bar with percentage
and time left (tqdm) while `emopipe run` writes to a terminal, otherwise a plain line through the step's
log every PLAIN_EVERY_SECONDS and one when done, so a log file or the Dagster UI gets a few readable lines
instead of a redrawn bar."""

from __future__ import annotations

import time
from typing import Callable, TextIO

PLAIN_EVERY_SECONDS = 15.0

_bar_stream: TextIO | None = None  # the terminal bars are drawn on, when show_bars() was called


def show_bars(stream: TextIO | None) -> None:
    """Draw bars on `stream` from now on in this process (None: plain lines again)."""
    global _bar_stream
    _bar_stream = stream


def bars_shown() -> bool:
    return _bar_stream is not None


def format_duration(seconds: float) -> str:
    """'0.4 s', '12 s', '6 min 12 s', '1 h 02 min'."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    return f"{minutes} min {secs} s" if minutes else f"{secs} s"


class Progress:
    """`with Progress("text_scores: OCR", 800, "images", log) as p: ... p.advance()`."""

    def __init__(self, what: str, total: int, unit: str, log: Callable[[str], object]):
        self.what, self.total, self.unit, self.log = what, total, unit, log
        self.done = 0
        self.start = self.last_line = time.perf_counter()
        self.bar = None
        if _bar_stream is not None and total > 0:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=what, unit=f" {unit}", file=_bar_stream, dynamic_ncols=True, leave=False,
                            mininterval=0.5, bar_format="{desc}: {percentage:3.0f}% |{bar}| {n}/{total}{unit} "
                                                        "[{elapsed} elapsed, {remaining} left, {rate_fmt}]")

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.perf_counter()
        if 0 < self.done < self.total and now - self.last_line >= PLAIN_EVERY_SECONDS:
            self.last_line = now
            rate = self.done / (now - self.start)
            left = (self.total - self.done) / rate if rate else float("inf")
            self.log(f"{self.what}: {self.done}/{self.total} {self.unit} ({100 * self.done / self.total:.0f} %), "
                     f"{rate:.1f} {self.unit}/s, about {format_duration(left)} left")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.total:
            elapsed = time.perf_counter() - self.start
            self.log(f"{self.what}: {self.done}/{self.total} {self.unit} in {format_duration(elapsed)}")

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
