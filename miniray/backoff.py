"""How long to wait before trying a lost server again: capped exponential backoff with jitter."""

from __future__ import annotations

import random

__all__ = ["Backoff"]


class Backoff:
    """Delays between tries to reach a lost server: doubling from 0.1 s up to 5 s, each
    drawn between half and all of that (workers that lost one server do not all come back
    at the same instant)."""

    def __init__(self, first: float = 0.1, cap: float = 5.0):
        self.first, self.cap, self.tries = first, cap, 0

    def next(self) -> float:
        d = min(self.cap, self.first * 2 ** min(self.tries, 32))
        self.tries += 1
        return d * random.uniform(0.5, 1.0)
