"""The work queue of a batch run: prompts read ahead from the spool, requests put back, retries with backoff."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import random
import time
import typing as tp

from ..errors import SpeedslurmError
from .inputs import InvalidLine, Request, iter_prompts
from .results import INVALID_INPUT, error_line
from .runstate import RunState

READ_CHUNK = 256  # prompt lines read per trip to the reader thread
READ_AHEAD = 2048  # prompt lines read ahead of the senders, at most


def _take(items: tp.Iterator[Request | InvalidLine], n: int) -> list[Request | InvalidLine]:
    return list(itertools.islice(items, n))


class WorkQueue(RunState):
    # -- reading the prompts ---------------------------------------------------------------------
    async def _read_prompts(self) -> None:
        """Fill ``fresh`` from the spool, ``READ_CHUNK`` lines at a time, in a worker thread: reading and parsing
        never block the event loop (Ctrl-C, replica polling and results keep going on a slow file system)."""
        stream = self.prepared.reader()
        items = iter_prompts(stream, self.opts.defaults(), self.prepared.scan.fingerprints)
        try:
            while not (self.stopping or self.fatal is not None or self.finished.is_set()):
                if len(self.fresh) >= READ_AHEAD:
                    self.want_more.clear()
                    await self.want_more.wait()
                    continue
                chunk = await asyncio.to_thread(_take, items, READ_CHUNK)
                self.fresh.extend(chunk)
                if len(chunk) < READ_CHUNK:
                    self.exhausted = True
                self.changed.set()
                if self.exhausted:
                    self._check_done()
                    return
        except (OSError, ValueError) as exc:  # the spool could not be read (an I/O error)
            self._set_fatal(SpeedslurmError(f"cannot read the prompts of {self.prepared.display}: {exc}",
                                            fix="run the same command again to resume"))
        finally:
            stream.close()

    # -- work queue ------------------------------------------------------------------------------
    async def _next_item(self, rep: tp.Any = None) -> Request | None:
        """The next request to send (None: stop); ``rep``, the asking worker's replica, gets none once it drains."""
        s = self.summary
        while True:
            if self.stopping or self.fatal is not None or getattr(rep, "draining", False):
                return None
            if self.pending:
                return self.pending.popleft()
            if self.delayed and self.delayed[0][0] <= time.monotonic():
                return heapq.heappop(self.delayed)[2]
            if self.fresh:
                item = self.fresh.popleft()
                if len(self.fresh) <= READ_AHEAD // 2:
                    self.want_more.set()
                if item.custom_id in self.prev_done:
                    if isinstance(item, Request):
                        s.skipped += 1
                    continue
                if isinstance(item, InvalidLine):
                    s.invalid += 1
                    if self.prev_failed.get(item.custom_id) != INVALID_INPUT:  # logged by an earlier run already
                        self.results.write(error_line(item.custom_id, INVALID_INPUT,
                                                      f"{self.prepared.display}:{item.line}: {item.message}"))
                    continue
                return item
            if self.exhausted:
                self._check_done()  # nothing left to read: done once nothing is in flight or waiting
            if self.finished.is_set():
                return None
            timeout = max(0.0, self.delayed[0][0] - time.monotonic()) if self.delayed else None
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), timeout)
            except asyncio.TimeoutError:
                pass

    def _requeue(self, item: Request) -> None:
        self.pending.append(item)
        self.changed.set()

    def _retry(self, item: Request, code: str, message: str, retry_after: float | None = None) -> None:
        item.attempts += 1
        if item.attempts > self.opts.retries:
            tries = item.attempts
            self._write_error(item, code, f"{message} (gave up after {tries} attempt{'s' if tries > 1 else ''})")
            return
        self.summary.retries += 1
        delay = min(self.opts.backoff_max, self.opts.backoff_base * 2 ** (item.attempts - 1))
        delay *= 0.5 + random.random() / 2  # jitter: retries of a burst do not arrive together
        if retry_after is not None:
            delay = min(self.opts.backoff_max, max(delay, retry_after))
        self.seq += 1
        heapq.heappush(self.delayed, (time.monotonic() + delay, self.seq, item))
        self.changed.set()

    def _write_error(self, item: Request, code: str, message: str) -> None:
        self.results.write(error_line(item.custom_id, code, message, item.fingerprint))
        s = self.summary
        s.failed += 1
        s.errors[code] = s.errors.get(code, 0) + 1
