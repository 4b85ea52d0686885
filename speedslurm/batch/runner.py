"""The batch runner: validate, then send every prompt to every ready replica's slots and append each result.

Use :func:`prepare_batch` (validates the prompts and opens the results file; everything that can be wrong with
the user's input fails here, before a job is queued or a request sent), then :func:`run_batch` with an
:class:`~speedslurm.batch.sources.EndpointSource`::

    prepared = prepare_batch(Path("prompts.jsonl"), None, options)
    try:
        summary = run_batch(source, prepared, options, console)
    finally:
        prepared.close()

Behaviour:

* concurrency is the sum of the ready replicas' ``parallel`` slots (or ``options.concurrency`` in total); a
  replica is used from the poll that first sees it READY;
* a transient error (no connection, timeout, 408/409/429, 5xx) is retried with bounded exponential backoff, on
  any replica, at most ``options.retries`` times; any other 4xx (e.g. a prompt longer than the context) gets its
  error line at once; a 401 stops the run (wrong API key: every request would fail);
* a replica with ``down_after`` connection errors in a row is unreachable: it gets no new requests and is probed
  (``/health``) at once, then with backoff (``probe_base`` doubling to ``probe_max`` seconds); it serves again
  once it answers. Only its source's word (failed.json, its job ended) or ``outage`` seconds without an answer
  (run.outage_s) fail it; a failed replica's in-flight requests go back to the queue for the others, without
  costing a retry;
* a request in flight on ``SUSPECT_AFTER`` (2) replicas that died (failed, not moved by a requeue) is suspected
  of crashing its server: it gets a ``suspected_crash`` error line and is not sent again; resuming the results
  file names it and skips it unless ``options.retry_suspected``. Until it is cleared, such a request is sent only
  to a replica with no other suspicious request in flight. A run that ends before it resent a request a replica
  died with writes a ``replica_died`` line for it, so that the next run counts that death;
* when every replica has failed and none can come, :class:`BatchFailed` (exit 1) names each replica and why;
* Ctrl-C (SIGINT), SIGTERM and SIGHUP: nothing new is sent, in-flight requests get ``options.grace`` seconds to finish and be written
  (a second Ctrl-C cancels them at once), the file is flushed, and :class:`BatchInterrupted` (exit 130) says how
  to resume: run the same command again.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
import time

from rich.console import Console
from rich.text import Text

from ..errors import SpeedslurmError
from .prepare import BatchOptions, PreparedBatch, prepare_batch
from .replicas import ReplicaPool
from .sources import EndpointSource
from .summary import Summary, deployments_of

__all__ = ["BatchFailed", "BatchInterrupted", "BatchOptions", "PreparedBatch", "prepare_batch", "run_batch",
           "run_batch_async"]


class BatchInterrupted(SpeedslurmError):
    """The user stopped the run; the results file is complete up to here (exit 130)."""

    exit_code = 130

    def __init__(self, message: str, summary: Summary, fix: str | None = None) -> None:
        super().__init__(message, fix)
        self.summary = summary


class BatchFailed(SpeedslurmError):
    """The run could not go on (every replica failed, key rejected, disk full); the results file stays valid."""

    def __init__(self, message: str, summary: Summary, fix: str | None = None) -> None:
        super().__init__(message, fix)
        self.summary = summary


class _Runner(ReplicaPool):
    """One run: the work queue and the replicas (the classes it extends), Ctrl-C, the start and the end."""

    def interrupt(self) -> None:
        """SIGINT: first stop sending and give in-flight requests a grace period; second: cancel them now."""
        if self.stopping:
            self._cancel_all()
            return
        self.stopping = True
        with contextlib.suppress(OSError):  # after SIGHUP the terminal may be gone; stopping must not fail
            self.console.print(Text.assemble(("Stopping:", "yellow"),
                                             f" nothing new is sent; {self.inflight} requests in flight get up to "
                                             f"{self.opts.grace:g} s to finish (Ctrl-C again to stop now)"),
                               highlight=False)
        self.grace_handle = asyncio.get_running_loop().call_later(self.opts.grace, self._cancel_all)
        self._wake()

    # -- main ------------------------------------------------------------------------------------
    async def run(self) -> Summary:
        self.t0 = time.perf_counter()
        s = self.summary
        loop = asyncio.get_running_loop()
        reader = loop.create_task(self._read_prompts())
        suspected = self.prepared.suspected if self.prev_suspected else []
        if suspected:
            n = len(suspected)
            self.say(f"{n} request{'s' if n > 1 else ''} suspected of crashing {'their' if n > 1 else 'its'} server "
                     f"in an earlier run (in flight on 2 replicas that died) {'are' if n > 1 else 'is'} not sent: "
                     + ", ".join(suspected[:10]) + (f" and {n - 10} more" if n > 10 else "")
                     + " (--retry-suspected sends them)")
        if self.prepared.remaining == 0:
            await self._next_item()  # everything was done earlier: count the skips, need no replica
        with self.progress:
            monitor = loop.create_task(self._monitor())
            try:
                await self.finished.wait()
            finally:
                monitor.cancel()
                self.want_more.set()  # the reader ends after the chunk it is reading (never cut mid-chunk)
                await asyncio.gather(reader, return_exceptions=True)
                if self.grace_handle is not None:
                    self.grace_handle.cancel()
                self._cancel_all()
                tasks = [t for rep in [*self.retired, *self.replicas.values()] for t in rep.workers]
                await asyncio.gather(monitor, *tasks, return_exceptions=True)
                with contextlib.suppress(OSError):  # a full disk was reported already
                    self._write_deaths_left()
                for rep in [*self.retired, *self.replicas.values()]:
                    await rep.transport.aclose()
                s.wall_s = time.perf_counter() - self.t0
                s.failed_replicas = self.failed_replicas()
                self._update_progress()
                self._publish("failed" if self.fatal is not None else "interrupted" if self.stopping else "completed")
                generations = getattr(self.source, "deployments", None)
                if callable(generations):
                    s.deployments = generations()
                else:
                    s.deployments = deployments_of(r.endpoint for r in [*self.retired, *self.replicas.values()])
                usage = getattr(self.source, "usage", None)
                if usage is not None:
                    with contextlib.suppress(Exception):  # a figure for the summary never fails the batch
                        s.usage = usage(self.started_at, time.time())
        resume = "run the same command again to send the remaining requests (done ones are skipped)"
        if self.fatal is not None:
            s.status = "failed"
            raise BatchFailed(self.fatal.message, s, self.fatal.fix)
        if self.stopping:
            s.status = "interrupted"
            raise BatchInterrupted(f"interrupted: {s.ok + s.skipped} of {s.total} requests done, "
                                   f"{s.remaining} left; results in {self.results.path}", s, fix=resume)
        return s


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def quiet_console() -> Console:
    """stderr, printing what it is given as it is: no markup, emoji codes or highlighting in answers or reasons."""
    return Console(stderr=True, markup=False, emoji=False, highlight=False)


async def run_batch_async(source: EndpointSource, prepared: PreparedBatch, options: BatchOptions,
                          console: Console | None = None) -> Summary:
    """Run the batch inside a running event loop (no signal handling; cancel the task to stop)."""
    runner = _Runner(source, prepared, options, console or quiet_console())
    return await runner.run()


def run_batch(source: EndpointSource, prepared: PreparedBatch, options: BatchOptions,
              console: Console | None = None) -> Summary:
    """Run the batch to the end and return its :class:`Summary`.

    Raises :class:`BatchFailed` (exit 1) when it cannot go on and :class:`BatchInterrupted` (exit 130) after
    Ctrl-C; both carry the summary so far, and the results file is valid in every case.
    """

    async def main() -> Summary:
        runner = _Runner(source, prepared, options, console or quiet_console())
        loop = asyncio.get_running_loop()
        handled = threading.current_thread() is threading.main_thread()
        # SIGTERM and SIGHUP (`timeout`, a dropped ssh session, an outer job's time limit) stop like Ctrl-C.
        previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS} if handled else {}
        # Started under nohup (SIGHUP ignored): logging out is not meant to stop it.
        previous = {sig: h for sig, h in previous.items() if not (sig == signal.SIGHUP and h is signal.SIG_IGN)}
        for sig in previous:
            loop.add_signal_handler(sig, runner.interrupt)
        try:
            return await runner.run()
        finally:
            for sig, handler in previous.items():
                loop.remove_signal_handler(sig)
                signal.signal(sig, handler)

    return asyncio.run(main())
