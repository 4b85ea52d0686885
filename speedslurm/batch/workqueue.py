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
from .results import INVALID_INPUT, REPLICA_DIED, SUSPECTED_CRASH, error_line
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
            if self.stopping or self.fatal is not None or getattr(rep, "draining", False) or \
                    getattr(rep, "probing", False):
                return None
            ready = self._take_pending(rep)
            if ready is not None:
                return ready
            if self.delayed and self.delayed[0][0] <= time.monotonic():
                ready = heapq.heappop(self.delayed)[2]
                if self._may_send(ready, rep):
                    return ready
                self.pending.append(ready)  # due, but this replica has a suspicious request in flight already
                continue
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
                if item.custom_id in self.prev_suspected:
                    s.suspected.append(item.custom_id)  # its SUSPECTED_CRASH line stays its last line
                    s.suspected_skipped += 1
                    continue
                if not self._may_send(item, rep):
                    self.pending.append(item)
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

    # -- requests in flight on replicas that died ------------------------------------------------
    def _suspicious(self, cid: str) -> bool:
        """In flight on a replica that died, or that became unreachable while it was (it may have crashed it)."""
        return self.deaths.get(cid, 0) > 0 or cid in self.broken or any(cid in r.lost for r in self.replicas.values())

    def _may_send(self, item: Request, rep: tp.Any) -> bool:
        """Not in the first ``settle`` seconds after a replica it was in flight on became unreachable (did it crash
        it? its source may soon say so); and a suspicious request goes only to a replica that has no other one in
        flight: should one of them crash it, the others are not blamed for it."""
        if rep is None or not self._suspicious(item.custom_id):
            return True
        cid = item.custom_id
        now = time.monotonic()
        if any(r.probing and cid in r.lost and now < r.down_since + self.opts.settle for r in self.replicas.values()):
            return False
        return not any(r is rep and self._suspicious(c) for c, (r, _) in self.sending.items())

    def _take_pending(self, rep: tp.Any) -> Request | None:
        if not self.pending:
            return None
        if self._may_send(self.pending[0], rep):
            return self.pending.popleft()
        for i in range(1, len(self.pending)):
            if self._may_send(self.pending[i], rep):
                item = self.pending[i]
                del self.pending[i]
                return item
        return None

    def _suspect(self, item: Request) -> None:
        """``item`` was in flight on SUSPECT_AFTER replicas that died: its error line, and it is not sent again
        (one in flight on another replica gets its line when that attempt fails; its answer, if it comes, wins)."""
        cid = item.custom_id
        self.suspects.add(cid)
        if cid in self.sending:
            return
        at = next((i for i, queued in enumerate(self.pending) if queued is item), None)
        if at is not None:
            del self.pending[at]
        else:
            queued = [d for d in self.delayed if d[2] is not item]
            if len(queued) != len(self.delayed):
                self.delayed[:] = queued
                heapq.heapify(self.delayed)
        self._write_suspect(item)
        self._wake()  # it may have been the last one left

    def _died_text(self, cid: str) -> str:
        n = self.deaths.get(cid, 0)
        parts = list(self.died_on.get(cid, ()))
        earlier = n - len(parts)
        if earlier > 0:
            parts.append(f"{earlier} in an earlier run")
        return f"in flight on {n} replica{'s' if n != 1 else ''} that died ({'; '.join(parts)})"

    def _write_suspect(self, item: Request) -> None:
        self.summary.suspected.append(item.custom_id)
        self.say(f"request {item.custom_id} is suspected of crashing its server: {self._died_text(item.custom_id)}; "
                 "it is not sent again in this run")
        self._write_error(item, SUSPECTED_CRASH, f"{self._died_text(item.custom_id)}: suspected of crashing its "
                          "server, not sent again (to send it anyway, run the same command again with "
                          "--retry-suspected)")

    def _write_deaths_left(self) -> None:
        """At the end of a run that did not send them again: a REPLICA_DIED line for each request that a replica
        died with in flight in this run, so that the next run counts the death too."""
        for item in [*self.pending, *(d[2] for d in self.delayed)]:
            cid = item.custom_id
            if self.died_on.get(cid) and cid not in self.suspects:
                self.results.write(error_line(cid, REPLICA_DIED, f"{self._died_text(cid)}; the run ended before "
                                              "it was sent again: the next run sends it", item.fingerprint))

    def _requeue(self, item: Request) -> None:
        if item.custom_id in self.suspects:
            self._write_suspect(item)
            return
        self.pending.append(item)
        self.changed.set()

    def _retry(self, item: Request, code: str, message: str, retry_after: float | None = None) -> None:
        if item.custom_id in self.suspects:
            self._write_suspect(item)
            return
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

    def _charge(self, item: Request, code: str, message: str) -> None:
        """One attempt more for ``item``, queued again already (it went back without a charge); past --retries
        it leaves the queue with its error line."""
        if item.custom_id in self.suspects or item.custom_id in self.sending:
            return
        item.attempts += 1
        self.broken.add(item.custom_id)  # sent alone from now on: another one may be what broke it
        if item.attempts <= self.opts.retries:
            return
        at = next((i for i, queued in enumerate(self.pending) if queued is item), None)
        if at is None:
            return  # not queued (written meanwhile): nothing to charge
        del self.pending[at]
        tries = item.attempts
        self._write_error(item, code, f"{message} (gave up after {tries} attempt{'s' if tries > 1 else ''})")

    def _write_error(self, item: Request, code: str, message: str) -> None:
        self.results.write(error_line(item.custom_id, code, message, item.fingerprint))
        self._forget(item.custom_id)
        s = self.summary
        s.failed += 1
        s.errors[code] = s.errors.get(code, 0) + 1

    def _forget(self, cid: str) -> None:
        """``cid`` has its line: a replica that dies later died without it."""
        self.broken.discard(cid)
        for r in self.replicas.values():
            if r.lost:
                r.lost.pop(cid, None)
