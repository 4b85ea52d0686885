"""Batches that are long or short by construction, for tests that stop a batch on real servers.

A test that needs a batch still running when something happens (a fault, a signal, a requeue) sends LONG
prompts whose answers are TOKENS tokens each (``ignore_eos``: never shorter): 6.4 M tokens, far more than any
machine answers in the minutes a test runs, so the batch outlasts the event by construction, not by the speed
of the machine. TOKENS and a prompt fit the context of one of a deployment's default slots (2048 over 16). The test waits for the event itself (lines in the results file, a message on stderr), with a
guard timeout only against a hang, and then stops the batch as a user would (Ctrl-C) or lets the fault end it.

The resume that follows is short by construction too: :func:`keep_answered` cuts the prompts file after the
last line that has a result, so that the same command sends only the few prompts before it that were still
in flight (a results line whose prompt is no longer in the file is left alone).
"""

from __future__ import annotations

import json
import threading
import time
import typing as tp
from pathlib import Path

LONG = 100_000
TOKENS = 64
GUARD_S = 300.0  # against a hang only: every wait below ends on an event long before


def long_fields() -> dict[str, tp.Any]:
    """The request fields that make every answer TOKENS tokens long."""
    return {"max_tokens": TOKENS, "ignore_eos": True}


def keep_answered(prompts: Path, ids: tp.Sequence[str], done: tp.Iterable[str]) -> list[str]:
    """Cut ``prompts`` (whose lines carry the custom_ids ``ids``, in order) after the last line whose id is in
    ``done``; the ids of the lines kept."""
    at = {cid: i for i, cid in enumerate(ids)}
    keep = max((at[c] for c in done), default=-1) + 1
    with open(prompts, "rb") as fh:
        lines = [fh.readline() for _ in range(keep)]
    prompts.write_bytes(b"".join(lines))
    return list(ids[:keep])


def count_lines(path: Path) -> int:
    try:
        with open(path, "rb") as fh:
            return sum(1 for _ in fh)
    except FileNotFoundError:
        return 0


def wait_until(what: str, cond: tp.Callable[[], tp.Any], guard: float = GUARD_S, every: float = 0.1) -> tp.Any:
    """``cond()`` once it is true; fails after ``guard`` seconds (a hang)."""
    deadline = time.monotonic() + guard
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} after {guard:.0f}s")
        time.sleep(every)


class Output:
    """A child's stdout and stderr, read line by line as it writes them (so that a test can wait for a line)."""

    def __init__(self, proc: tp.Any) -> None:
        self.proc = proc
        self.out: list[str] = []
        self.err: list[str] = []
        self._threads = [threading.Thread(target=self._read, args=(proc.stdout, self.out), daemon=True),
                         threading.Thread(target=self._read, args=(proc.stderr, self.err), daemon=True)]
        for t in self._threads:
            t.start()

    @staticmethod
    def _read(stream: tp.IO[str] | None, into: list[str]) -> None:
        if stream is not None:
            into.extend(iter(stream.readline, ""))

    @property
    def stdout(self) -> str:
        return "".join(self.out)

    @property
    def stderr(self) -> str:
        return "".join(self.err)

    def said(self, needle: str) -> bool:
        """Whether stderr holds ``needle`` (line breaks of wrapped messages undone)."""
        return needle in " ".join(self.stderr.split())

    def wait_said(self, needle: str, guard: float = GUARD_S) -> None:
        """Until stderr holds ``needle``; fails if the child ends first without it, or after ``guard``."""
        def seen() -> bool:
            if self.said(needle):
                return True
            if self.proc.poll() is not None:
                self._threads[1].join(10)
                assert self.said(needle), f"ended (exit {self.proc.returncode}) without {needle!r}:\n{self.stderr}"
            return False

        wait_until(f"{needle!r} on stderr", seen, guard)

    def wait(self, guard: float = GUARD_S) -> int:
        """The child's exit status once it and its output ended."""
        rc = int(self.proc.wait(guard))
        for t in self._threads:
            t.join(30)
        return rc


def dump_lines(path: Path, lines: tp.Iterable[dict[str, tp.Any]]) -> None:
    with open(path, "w") as fh:
        for line in lines:
            fh.write(json.dumps(line) + "\n")
