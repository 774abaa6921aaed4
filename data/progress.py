"""A progress line on stderr every few seconds for the long data jobs (ingest, verify, inspect): items done, the
rate and, once the share of the input done is known, an ETA."""
from __future__ import annotations

import sys
import time
from typing import Optional


class Progress:
    def __init__(self, verb: str, unit: str = "samples", every_s: float = 5.0):
        self.verb, self.unit, self.every_s = verb, unit, every_s
        self.started = self.last = time.monotonic()
        self.fraction: Optional[float] = None  # of the input done, set by whoever reads the input and knows its size

    def eta_s(self, now: float) -> Optional[float]:
        if not self.fraction:
            return None
        return (now - self.started) * (1 - self.fraction) / self.fraction

    def update(self, done: int, note: str = "", force: bool = False) -> None:
        now = time.monotonic()
        if now - self.last < self.every_s and not force:
            return
        self.last = now
        rate = done / max(now - self.started, 1e-9)
        share = f" ({100 * self.fraction:.0f}%)" if self.fraction else ""
        eta = self.eta_s(now)
        print(f"{self.verb}: {done} {self.unit}{share}{f', {note}' if note else ''}, {rate:.1f} {self.unit}/s"
              f"{f', ETA {_duration(eta)}' if eta is not None else ''}", file=sys.stderr, flush=True)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"
