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
* a replica that fails (its failed.json, the job ended, or ``down_after`` connection errors in a row) stops
  getting requests, and its in-flight requests go back to the queue for the others, without costing a retry;
* when every replica has failed and none can come, :class:`BatchFailed` (exit 1) names each replica and why;
* Ctrl-C (SIGINT), SIGTERM and SIGHUP: nothing new is sent, in-flight requests get ``options.grace`` seconds to finish and be written
  (a second Ctrl-C cancels them at once), the file is flushed, and :class:`BatchInterrupted` (exit 130) says how
  to resume: run the same command again.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import heapq
import itertools
import json
import os
import random
import re
import signal
import stat
import sys
import threading
import time
import typing as tp
from collections import deque
from pathlib import Path

from rich.console import Console

from ..errors import SpeedslurmError, UsageError
from ..rundir import Endpoint
from .inputs import InvalidLine, Request, RequestDefaults, ScanResult, Spool, iter_prompts, scan_prompts
from .progress import BatchProgress
from .results import INVALID_INPUT, ResultsFile, check_out_path, default_out_path, error_line, success_line
from .sources import EndpointSource
from .summary import Summary
from .transport import CLIENTS, Reply, Transport, TransportError

RETRY_STATUSES = frozenset({408, 409, 429})
READ_CHUNK = 256  # prompt lines read per trip to the reader thread
READ_AHEAD = 2048  # prompt lines read ahead of the senders, at most


def _take(items: tp.Iterator[Request | InvalidLine], n: int) -> list[Request | InvalidLine]:
    return list(itertools.islice(items, n))


@dataclasses.dataclass
class BatchOptions:
    """Everything that shapes one batch run (the ``run`` command's flags, plus tuning knobs)."""

    max_tokens: int | None = None
    temperature: float | None = None
    system: str | None = None
    concurrency: int | None = None  # total in-flight requests; default: sum of ready replicas' slots
    timeout: float = 600.0  # seconds per request
    retries: int = 5  # retries per request for transient errors
    skip_invalid: bool = False
    quiet: bool = False
    client: str = "raw"  # "raw" (lean HTTP/1.1; https servers use openai) or "openai" (AsyncOpenAI)
    poll_interval: float = 0.25  # seconds between looks at the endpoint source
    backoff_base: float = 0.5
    backoff_max: float = 15.0
    grace: float = 5.0  # seconds in-flight requests get after Ctrl-C
    down_after: int = 3  # consecutive connection errors that mark a replica failed
    settle: float = 3.0  # seconds a locally seen failure waits for the source's own reason before stopping
    lock: bool = True  # lock the results file (--no-lock: the user makes sure of one writer)

    def defaults(self) -> RequestDefaults:
        return RequestDefaults(self.max_tokens, self.temperature, self.system)


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


@dataclasses.dataclass
class PreparedBatch:
    """A validated prompts file and an open, locked results file, ready to run.

    The prompts were read once, into ``spool``; the run reads that copy, never ``prompts`` again.
    """

    prompts: Path  # as given (``-`` for stdin)
    display: str  # how to name the prompts in messages ("<stdin>" for -)
    scan: ScanResult
    results: ResultsFile
    spooled: bool = False  # the prompts came from stdin: resuming needs the same prompts on stdin again
    spool: Spool | None = None  # the bytes validated; None: read ``prompts`` (callers that built one by hand)

    @property
    def out(self) -> Path:
        return self.results.path

    @property
    def remaining(self) -> int:
        """Valid requests without a successful line yet (0: nothing to send, no deployment needed)."""
        done = self.results.previous.done
        valid_done = sum(1 for cid in done if cid in self.scan.ids and cid not in self.scan.invalid_ids)
        return self.scan.requests - valid_done

    def reader(self) -> tp.BinaryIO:
        """The prompts as validated, from the first line."""
        return self.spool.reader() if self.spool is not None else open(self.prompts, "rb")

    def close(self) -> None:
        self.results.close()
        if self.spool is not None:
            self.spool.close()


def prepare_batch(prompts: str | Path, out: str | Path | None, options: BatchOptions,
                  stdin: tp.BinaryIO | None = None) -> PreparedBatch:
    """Read and validate the prompts (once) and open the results file; raise :class:`UsageError` if bad.

    The prompts are copied as they are read into a private spool next to the results (see
    :class:`~speedslurm.batch.inputs.Spool`), which the run then reads: ``prompts`` may be a file that changes
    later, ``"-"`` for stdin, a FIFO or a pipe such as ``<(command)`` (the last three need ``out``). A request
    that already has a successful line in ``out`` but asks something else now is an error naming it.
    """
    if options.client not in CLIENTS:
        raise UsageError(f"unknown client {options.client!r}", fix=f"use one of: {', '.join(CLIENTS)}")
    if options.concurrency is not None and options.concurrency < 1:
        raise UsageError(f"--concurrency must be at least 1, got {options.concurrency}", fix="e.g. --concurrency 16")
    if options.timeout <= 0:
        raise UsageError(f"--timeout must be positive, got {options.timeout:g}", fix="e.g. --timeout 600")
    if options.retries < 0:
        raise UsageError(f"--retries must be >= 0, got {options.retries}", fix="e.g. --retries 5")
    _check_text_flag("--system", options.system)
    from_stdin = str(prompts) == "-"
    source: str | Path | tp.BinaryIO
    if from_stdin:
        if out is None:
            raise UsageError("reading prompts from stdin (-) needs --out",
                             fix="name the results file, e.g. --out results.jsonl (running the same command "
                                 "again then resumes it)")
        path, display, same_as = Path("-"), "<stdin>", None
        source = stdin if stdin is not None else sys.stdin.buffer
    else:
        path = Path(prompts)
        display = str(prompts)
        try:
            mode = os.stat(path).st_mode
        except FileNotFoundError:
            raise UsageError(f"prompts file {path} does not exist", fix="check the path given to --prompts") from None
        except OSError as exc:
            raise UsageError(f"cannot read prompts file {path}: {exc.strerror}",
                             fix="check the path given to --prompts and its permissions") from None
        if stat.S_ISDIR(mode):
            raise UsageError(f"prompts path {path} is a directory", fix="give --prompts a JSONL file")
        same_as = path if stat.S_ISREG(mode) else None
        if same_as is None and out is None:  # a FIFO, <(command): no file to put the results next to
            raise UsageError(f"reading prompts from a pipe ({path}) needs --out",
                             fix="name the results file, e.g. --out results.jsonl")
        source = path
    out_path = Path(out) if out is not None else default_out_path(path)
    check_out_path(out_path, same_as)
    spool = Spool.create(out_path.parent)
    try:
        with spool.writer() as copy:
            scan = scan_prompts(source, options.defaults(), options.skip_invalid, display, copy_to=copy)
        results = ResultsFile.open(out_path, same_as, lock=options.lock)
        try:
            results.previous.notices.extend(_check_unchanged(scan, results))
        except BaseException:
            results.close()
            raise
    except BaseException:
        spool.close()
        raise
    return PreparedBatch(path, display, scan, results, from_stdin, spool)


def _check_text_flag(flag: str, value: str | None) -> None:
    """A flag's text must be UTF-8: a non-UTF-8 byte on the command line arrives as a lone surrogate."""
    if value is None:
        return
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        code = ord(value[exc.start])
        what = f"the byte 0x{code - 0xdc00:02x}" if 0xdc80 <= code <= 0xdcff else f"the code point U+{code:04X}"
        raise UsageError(f"{flag} holds {what}, which is not UTF-8 text (at character {exc.start + 1})",
                         fix=f"pass {flag} as UTF-8 text (check the encoding of the terminal or script, "
                             "e.g. iconv -f latin1 -t utf-8)") from None


_GENERATED_ID = re.compile(r"line-\d+")


def _check_unchanged(scan: ScanResult, results: ResultsFile) -> list[str]:
    """Raise :class:`UsageError` when a request that has a successful line now asks something else.

    Results are never mixed: a successful line answers the request whose fingerprint it carries. Returns
    notices (successful lines of older versions carry no fingerprint and cannot be checked).
    """
    prev = results.previous
    changed: list[tuple[int, str, int]] = []
    unchecked = 0
    for cid in prev.done:
        line = scan.lines.get(cid)
        if line is None:
            continue  # no longer in the prompts: nothing is sent for it
        recorded = prev.fingerprints.get(cid)
        if recorded is None:
            unchecked += 1
        elif scan.fingerprints.get(cid) != recorded[0]:
            changed.append((line, cid, recorded[1]))
    notices = []
    if unchecked:
        notices.append(f"{unchecked} successful line{'s' if unchecked > 1 else ''} in {results.path} "
                       f"{'were' if unchecked > 1 else 'was'} written by an older speedslurm, without a request "
                       "fingerprint: those prompts are not checked for changes")
    if not changed:
        return notices
    changed.sort()
    line, cid, at = changed[0]
    what = "the line is now invalid" if cid in scan.invalid_ids else "its text, fields or url differ"
    more = f"; {len(changed) - 1} more changed after it" if len(changed) > 1 else ""
    fix = ("the results are not mixed: to resume this file, give the prompts (and flags) that were answered; to send "
           "the changed prompts, write to a new --out")
    if any(_GENERATED_ID.fullmatch(c) for _, c, _ in changed):
        fix += ("; lines without a custom_id are named by position (line-N), so inserting or removing a line "
                "renames every line after it: give each line its own custom_id")
    raise UsageError(f"{scan.display}:{line}: request {json.dumps(cid)} is not the one answered in "
                     f"{results.path}:{at}: {what} (the prompts changed since, or a flag such as --max-tokens, "
                     f"--temperature or --system differs){more}", fix=fix)


@dataclasses.dataclass(eq=False)
class _Replica:
    endpoint: Endpoint
    transport: Transport
    workers: set[asyncio.Task[None]] = dataclasses.field(default_factory=set)
    served: int = 0
    inflight: int = 0
    conn_errors: int = 0
    failed: bool = False
    reason: str = ""
    failed_at: float = 0.0
    confirmed: bool = False  # the source itself reported the failure (its reason is the real one)


class _Runner:
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
        self.replicas: dict[int, _Replica] = {}
        self.retired: list[_Replica] = []  # replicas replaced by their job's next start (requeue)
        self.source_failed: dict[int, str] = {}  # failed replicas we never used
        self.sem = asyncio.Semaphore(options.concurrency) if options.concurrency else None
        self.stopping = False
        self.fatal: SpeedslurmError | None = None
        self.finished = asyncio.Event()
        self.changed = asyncio.Event()
        self.grace_handle: asyncio.TimerHandle | None = None
        self.progress = BatchProgress(console, self.summary.total, enabled=not options.quiet)
        self._make_transport = CLIENTS[options.client]
        self._said_waiting = False

    # -- events ----------------------------------------------------------------------------------
    def say(self, message: str) -> None:
        if not self.opts.quiet:
            self.progress.log(self.console, message, highlight=False)

    def interrupt(self) -> None:
        """SIGINT: first stop sending and give in-flight requests a grace period; second: cancel them now."""
        if self.stopping:
            self._cancel_all()
            return
        self.stopping = True
        with contextlib.suppress(OSError):  # after SIGHUP the terminal may be gone; stopping must not fail
            self.console.print(f"[yellow]Stopping:[/yellow] nothing new is sent; {self.inflight} requests in flight "
                               f"get up to {self.opts.grace:g} s to finish (Ctrl-C again to stop now)",
                               highlight=False)
        self.grace_handle = asyncio.get_running_loop().call_later(self.opts.grace, self._cancel_all)
        self._wake()

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
    async def _next_item(self) -> Request | None:
        s = self.summary
        while True:
            if self.stopping or self.fatal is not None:
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

    # -- replicas --------------------------------------------------------------------------------
    def _add_replica(self, ep: Endpoint) -> None:
        make = self._make_transport
        if self.opts.client == "raw" and not ep.url.startswith("http://"):
            make = CLIENTS["openai"]  # the lean client speaks plain http only; https goes through openai
        rep = _Replica(ep, make(ep, self.opts.timeout))
        before = self.replicas.get(ep.replica)
        if before is not None:  # the replica's job started again: the old transport is closed at the end
            self.retired.append(before)
            rep.served = before.served
            self.source_failed.pop(ep.replica, None)
        self.replicas[ep.replica] = rep
        n = self.opts.concurrency or max(1, ep.parallel)
        for _ in range(n):
            task = asyncio.get_running_loop().create_task(self._worker(rep))
            rep.workers.add(task)
            task.add_done_callback(rep.workers.discard)
        self.summary.per_replica.setdefault(ep.replica, 0)
        again = f" again (start {ep.epoch + 1} of job {ep.job_id})" if before is not None else ""
        self.say(f"replica r{ep.replica} ready{again} at {ep.url} ({ep.parallel} slots)")

    def _fail_replica(self, rep: _Replica, reason: str, confirmed: bool) -> None:
        rep.failed, rep.reason, rep.confirmed = True, reason, confirmed
        rep.failed_at = time.monotonic()
        hurry = getattr(self.source, "hurry", None)
        if not confirmed and callable(hurry):
            hurry()  # seen here first: the source's slower checks (Slurm) may soon say why
        me = asyncio.current_task()
        busy = rep.inflight
        for task in list(rep.workers):
            if task is not me:
                task.cancel()  # their in-flight requests go back to the queue
        others = [r for r in self.replicas.values() if not r.failed]
        where = "the other replicas" if others else "the queue until a replica is ready"
        self.say(f"[red]replica r{rep.endpoint.replica} failed:[/red] {reason}; its in-flight requests go to {where}"
                 if busy else f"[red]replica r{rep.endpoint.replica} failed:[/red] {reason}")

    async def _worker(self, rep: _Replica) -> None:
        try:
            while not rep.failed:
                if self.sem is not None:
                    await self.sem.acquire()
                try:
                    item = await self._next_item()
                    if item is None:
                        return
                    await self._handle(rep, item)
                finally:
                    if self.sem is not None:
                        self.sem.release()
        except asyncio.CancelledError:
            pass
        except OSError as exc:  # writing the results file failed (disk full, ...)
            self._set_fatal(SpeedslurmError(f"cannot write results to {self.results.path}: {exc.strerror or exc}",
                                            fix="free space or fix the file system, then run the same command "
                                                "again to resume"))
        except Exception as exc:  # pragma: no cover - a bug: stop rather than hang
            self._set_fatal(SpeedslurmError(f"batch runner error: {type(exc).__name__}: {exc}"))
            raise

    def _set_fatal(self, error: SpeedslurmError) -> None:
        if self.fatal is None:
            self.fatal = error
        self.stopping = True
        self._cancel_all()
        self.finished.set()

    async def _handle(self, rep: _Replica, item: Request) -> None:
        body = item.body
        if "model" not in body and rep.endpoint.model:
            body["model"] = rep.endpoint.model
        self.inflight += 1
        rep.inflight += 1
        t0 = time.perf_counter()
        try:
            reply = await rep.transport.send(item.url, body)
        except asyncio.CancelledError:
            self.inflight -= 1
            rep.inflight -= 1
            self._requeue(item)  # the replica failed or the run stops: not this request's fault
            self._check_done()
            raise
        except UnicodeError as exc:
            # Validation rejects text UTF-8 cannot encode; should any reach here, it fails this request only.
            self.inflight -= 1
            rep.inflight -= 1
            self._write_error(item, INVALID_INPUT, f"{self.prepared.display}:{item.line}: the request cannot be "
                              f"encoded as UTF-8: {exc}")
            self._wake()
            return
        except TransportError as exc:
            self.inflight -= 1
            rep.inflight -= 1
            if exc.kind == "connect" and not rep.failed:
                rep.conn_errors += 1
                if rep.conn_errors >= self.opts.down_after:
                    self._fail_replica(rep, f"unreachable at {rep.endpoint.url}: {exc}", confirmed=False)
            if rep.failed:
                self._requeue(item)
            else:
                self._retry(item, "timeout" if exc.kind == "timeout" else "connection_error",
                            f"replica r{rep.endpoint.replica}: {exc}")
            self._wake()
            return
        self.inflight -= 1
        rep.inflight -= 1
        rep.conn_errors = 0
        self._on_reply(rep, item, reply, time.perf_counter() - t0)
        self._wake()

    def _on_reply(self, rep: _Replica, item: Request, reply: Reply, latency: float) -> None:
        status = reply.status
        s = self.summary
        if status == 200:
            try:
                data = json.loads(reply.body)
                usage = data.get("usage") or {}
                prompt_tokens = int(usage.get("prompt_tokens") or 0)
                completion_tokens = int(usage.get("completion_tokens") or 0)
                request_id = reply.request_id or (data.get("id") if isinstance(data.get("id"), str) else None)
            except (ValueError, AttributeError, TypeError):
                self._retry(item, "invalid_response", f"replica r{rep.endpoint.replica} answered 200 with a body "
                            "that is not a JSON object")
                return
            self.results.write(success_line(item.custom_id, request_id, reply.body, item.fingerprint))
            s.ok += 1
            s.prompt_tokens += prompt_tokens
            s.completion_tokens += completion_tokens
            s.latencies.append(latency)
            rep.served += 1
            s.per_replica[rep.endpoint.replica] = rep.served
            return
        message = _error_message(reply)
        if status == 401:
            self._requeue(item)
            self._set_fatal(SpeedslurmError(
                f"replica r{rep.endpoint.replica} at {rep.endpoint.url} rejected the API key (401): {message}",
                fix="check the key (--api-key, or the deployment's endpoint file), then run the same command again"))
            return
        if status in RETRY_STATUSES or status >= 500:
            self._retry(item, f"http_{status}", f"replica r{rep.endpoint.replica} answered {status}: {message}",
                        reply.retry_after)
            return
        rep.served += 1
        s.per_replica[rep.endpoint.replica] = rep.served
        self._write_error(item, f"http_{status}", f"the server rejected the request ({status}): {message}")

    # -- monitor ---------------------------------------------------------------------------------
    async def _monitor(self) -> None:
        while not self.finished.is_set():
            try:
                state = self.source.poll()
            except SpeedslurmError as exc:
                self._set_fatal(exc)
                return
            if not self.stopping:
                for ep in state.ready:
                    rep = self.replicas.get(ep.replica)
                    if rep is None or (rep.failed and ep.replica not in state.failed and _new_start(rep.endpoint, ep)):
                        self._add_replica(ep)  # new, or started again (requeued): its new endpoint
            listed = {ep.replica for ep in state.ready}
            for r, rep in list(self.replicas.items()):
                if not rep.failed and r not in listed and r not in state.failed:
                    # The source stopped offering it, without a failure: its job was requeued or preempted.
                    self._fail_replica(rep, "its job left its nodes (requeued or preempted); waiting for it to "
                                       "start again", confirmed=True)
            for r, why in state.failed.items():
                rep = self.replicas.get(r)
                if rep is None:
                    if r not in self.source_failed:
                        self.source_failed[r] = why
                        self.say(f"[red]replica r{r} failed:[/red] {why}")
                elif not rep.failed:
                    self._fail_replica(rep, why, confirmed=True)
                elif not rep.confirmed:
                    rep.reason, rep.confirmed = why, True  # the job side's reason beats "unreachable"
            self._check_all_failed(state.finished)
            if not self.replicas and not self._said_waiting and not state.finished:
                self._said_waiting = True
                self.say("waiting for a replica to be ready...")
            self._update_progress()
            await asyncio.sleep(self.opts.poll_interval)

    def _check_all_failed(self, finished: bool) -> None:
        if not finished or self.finished.is_set():
            return
        live = [r for r in self.replicas.values() if not r.failed]
        if live:
            return
        now = time.monotonic()
        if any(not r.confirmed and now - r.failed_at < self.opts.settle for r in self.replicas.values()):
            return  # give the job side a moment to say why
        why = self.failed_replicas()
        if not why:
            self._set_fatal(SpeedslurmError("no replica is available to send requests to",
                                            fix="start a deployment (speedslurm up) and run the same command again"))
            return
        s = self.summary
        left = s.total - s.ok - s.skipped - s.failed
        names = "; ".join(f"replica r{r}: {w}" for r, w in sorted(why.items()))
        self._set_fatal(SpeedslurmError(
            f"every replica failed ({names}); {left} of {s.total} requests were not sent",
            fix=f"the results in {self.results.path} stay valid; once a deployment is serving again, run the same "
                "command to send the rest (done requests are skipped)"))

    def failed_replicas(self) -> dict[int, str]:
        out = dict(self.source_failed)
        out.update({r: rep.reason for r, rep in self.replicas.items() if rep.failed})
        return out

    def _update_progress(self) -> None:
        s = self.summary
        elapsed = time.perf_counter() - self.t0
        live = sum(1 for r in self.replicas.values() if not r.failed)
        self.progress.update(s.ok + s.failed + s.skipped, s.failed, s.completion_tokens / elapsed if elapsed else 0.0,
                             f"{live} replica{'s' if live != 1 else ''}")

    # -- main ------------------------------------------------------------------------------------
    async def run(self) -> Summary:
        self.t0 = time.perf_counter()
        s = self.summary
        loop = asyncio.get_running_loop()
        reader = loop.create_task(self._read_prompts())
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
                for rep in [*self.retired, *self.replicas.values()]:
                    await rep.transport.aclose()
                s.wall_s = time.perf_counter() - self.t0
                s.failed_replicas = self.failed_replicas()
                self._update_progress()
        resume = "run the same command again to send the remaining requests (done ones are skipped)"
        if self.fatal is not None:
            s.status = "failed"
            raise BatchFailed(self.fatal.message, s, self.fatal.fix)
        if self.stopping:
            s.status = "interrupted"
            raise BatchInterrupted(f"interrupted: {s.ok + s.skipped} of {s.total} requests done, "
                                   f"{s.remaining} left; results in {self.results.path}", s, fix=resume)
        return s


def _new_start(old: Endpoint, new: Endpoint) -> bool:
    """``new`` is another start of the replica than ``old`` (a requeued job's next start, or another job)."""
    return (new.job_id, new.epoch, new.url, new.ready_at) != (old.job_id, old.epoch, old.url, old.ready_at)


def _error_message(reply: Reply) -> str:
    """The server's error message (llama-server and OpenAI put it in ``error.message``), else the raw body."""
    try:
        data = json.loads(reply.body)
        err = data.get("error") if isinstance(data, dict) else None
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if isinstance(err, str):
            return err
    except ValueError:
        pass
    text = reply.body.decode("utf-8", "replace").strip()
    return text[:300] or "(empty body)"


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


async def run_batch_async(source: EndpointSource, prepared: PreparedBatch, options: BatchOptions,
                          console: Console | None = None) -> Summary:
    """Run the batch inside a running event loop (no signal handling; cancel the task to stop)."""
    runner = _Runner(source, prepared, options, console or Console(stderr=True))
    return await runner.run()


def run_batch(source: EndpointSource, prepared: PreparedBatch, options: BatchOptions,
              console: Console | None = None) -> Summary:
    """Run the batch to the end and return its :class:`Summary`.

    Raises :class:`BatchFailed` (exit 1) when it cannot go on and :class:`BatchInterrupted` (exit 130) after
    Ctrl-C; both carry the summary so far, and the results file is valid in every case.
    """

    async def main() -> Summary:
        runner = _Runner(source, prepared, options, console or Console(stderr=True))
        loop = asyncio.get_running_loop()
        handled = threading.current_thread() is threading.main_thread()
        # SIGTERM and SIGHUP (`timeout`, a dropped ssh session, an outer job's time limit) stop like Ctrl-C.
        previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS} if handled else {}
        for sig in previous:
            loop.add_signal_handler(sig, runner.interrupt)
        try:
            return await runner.run()
        finally:
            for sig, handler in previous.items():
                loop.remove_signal_handler(sig)
                signal.signal(sig, handler)

    return asyncio.run(main())
