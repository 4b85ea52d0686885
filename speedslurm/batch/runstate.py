"""The state one batch run shares between its parts (work queue, replicas, runner), and its stop events."""

from __future__ import annotations

import asyncio
import time
import typing as tp
from collections import deque

from rich.console import Console
from rich.text import Text

from ..errors import SpeedslurmError
from ..rundir.batches import write_progress
from .inputs import InvalidLine, Request
from .prepare import BatchOptions, PreparedBatch
from .progress import BatchProgress
from .sources import EndpointSource
from .summary import Summary
from .transport import CLIENTS

if tp.TYPE_CHECKING:
    from .replicas import Replica


class RunState:
    """The run's shared state and events; :class:`~speedslurm.batch.workqueue.WorkQueue` and
    :class:`~speedslurm.batch.replicas.ReplicaPool` add the work queue and the replicas on top of it."""

    def __init__(self, source: EndpointSource, prepared: PreparedBatch, options: BatchOptions,
                 console: Console) -> None:
        self.source = source
        self.prepared = prepared
        self.opts = options
        self.console = console
        self.results = prepared.results
        self.prev_done = prepared.results.previous.done
        self.prev_failed = prepared.results.previous.failed
        self.summary = Summary(str(prepared.out), total=prepared.scan.requests)
        self.fresh: deque[Request | InvalidLine] = deque()  # read ahead from the spool, not yet looked at
        self.want_more = asyncio.Event()  # the reader waits on it while ``fresh`` is full
        self.exhausted = False  # the reader has read the last line
        self.pending: deque[Request] = deque()
        self.delayed: list[tuple[float, int, Request]] = []
        self.seq = 0
        self.inflight = 0
        self.replicas: dict[int, Replica] = {}
        self.retired: list[Replica] = []  # replicas replaced by their job's next start (requeue)
        self.source_failed: dict[int, str] = {}  # failed replicas we never used
        previous = prepared.results.previous
        # Requests in flight on replicas that died (:mod:`.results`, REPLICA_DIED): id -> how many (earlier runs'
        # too), and this run's ("r0: why"); at SUSPECT_AFTER one is suspected of crashing its server (``suspects``,
        # its error line written, never sent again in this run).
        self.deaths: dict[str, int] = dict(previous.died)
        self.died_on: dict[str, list[str]] = {}
        self.suspects: set[str] = set()
        self.prev_suspected = {} if options.retry_suspected else previous.suspected  # not sent unless asked
        self.broken: set[str] = set()  # requests whose connection broke on a replica that stayed alive
        self.sending: dict[str, tuple[Replica, Request]] = {}  # requests in flight: id -> (replica, request)
        self.sem = asyncio.Semaphore(options.concurrency) if options.concurrency else None
        self.stopping = False
        self.fatal: SpeedslurmError | None = None
        self.finished = asyncio.Event()
        self.changed = asyncio.Event()
        self.grace_handle: asyncio.TimerHandle | None = None
        self.progress = BatchProgress(console, self.summary.total, enabled=not options.quiet)
        self._make_transport = CLIENTS[options.client]
        self._said_waiting = False
        self.t0 = time.perf_counter()  # the run's start (set again when it runs)
        self.started_at = time.time()
        self._published_at = -float("inf")

    def say(self, message: str | Text) -> None:
        """Print a line for the user; a str is printed as it is (a reason from a server or a node is no markup)."""
        if not self.opts.quiet:
            self.progress.log(self.console, message, highlight=False, markup=False, emoji=False)

    def _cancel_all(self) -> None:
        for rep in [*self.retired, *self.replicas.values()]:
            for task in rep.workers:
                task.cancel()

    def _wake(self) -> None:
        self.changed.set()
        self._check_done()

    def _check_done(self) -> None:
        if self.inflight:
            return
        if self.stopping or (self.exhausted and not self.fresh and not self.pending and not self.delayed):
            self.finished.set()

    def _set_fatal(self, error: SpeedslurmError) -> None:
        if self.fatal is None:
            self.fatal = error
        self.stopping = True
        self._cancel_all()
        self.finished.set()

    def _update_progress(self) -> None:
        s = self.summary
        elapsed = time.perf_counter() - self.t0
        live = sum(1 for r in self.replicas.values() if not r.failed and not r.probing)
        down = sum(1 for r in self.replicas.values() if r.probing)
        self.progress.update(s.ok + s.failed + s.skipped, s.failed, s.completion_tokens / elapsed if elapsed else 0.0,
                             f"{live} replica{'s' if live != 1 else ''}" + (f" ({down} unreachable)" if down else ""))
        self._publish()

    def _publish(self, status: str = "running") -> None:
        """The progress in the deployment's run directory, for ``speedslurm top`` (at most once a second)."""
        run_root = getattr(getattr(self.source, "run_dir", None), "root", None)
        now = time.monotonic()
        if run_root is None or (status == "running" and now - self._published_at < 1.0):
            return
        self._published_at = now
        s = self.summary
        elapsed = time.perf_counter() - self.t0
        write_progress(run_root, results=s.results_path, total=s.total, done=s.ok + s.failed + s.skipped,
                       failed=s.failed, completion_tok_s=s.completion_tokens / elapsed if elapsed else 0.0,
                       started_at=self.started_at, status=status)
