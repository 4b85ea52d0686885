"""How often a polling loop asks Slurm: soon after a change, less and less often while nothing changes.

Every squeue or sacct is a request that slurmctld (or slurmdbd) serves between scheduling passes; a client that
asks every second for hours, as a deployment waiting in the queue or a long batch would, is load the cluster's
administrators notice. What the loops watch locally (the run directory's files) costs nothing and is still
read at every poll; only the Slurm questions back off.
"""

from __future__ import annotations

import time
import typing as tp

_UNSET = object()


class Backoff:
    """When to ask again: ``first`` seconds after the answer changed, doubling up to ``most`` while it stays
    the same; :meth:`hurry` asks at once and keeps the short interval for a while (someone saw trouble)."""

    def __init__(self, first: float = 1.0, most: float = 30.0,
                 clock: tp.Callable[[], float] = time.monotonic) -> None:
        self.first = first
        self.most = max(most, first)
        self.clock = clock
        self.interval = first
        self._asked_at = -float("inf")
        self._last: object = _UNSET
        self._hurry_until = -float("inf")

    def due(self) -> bool:
        """Whether the interval since the last question has passed."""
        return self.clock() - self._asked_at >= self.interval

    def note(self, answer: object, asked: bool) -> None:
        """Record what the loop sees now (``asked``: it asked Slurm for it). A change resets the interval to
        ``first``; the same answer to a new question doubles it, up to ``most``."""
        now = self.clock()
        if asked:
            self._asked_at = now
        if answer != self._last:
            self.interval = self.first
        elif asked and now >= self._hurry_until:
            self.interval = min(self.interval * 2, self.most)
        self._last = answer

    def hurry(self, seconds: float = 10.0) -> None:
        """Ask at the next poll, then every ``first`` seconds for ``seconds``."""
        self._asked_at = -float("inf")
        self.interval = self.first
        self._hurry_until = self.clock() + seconds
