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
import json
import os
import random
import signal
import threading
import time
import typing as tp
from collections import deque
from pathlib import Path

from rich.console import Console

from ..errors import SpeedslurmError, UsageError
from ..rundir import Endpoint
from .inputs import InvalidLine, Request, RequestDefaults, ScanResult, iter_prompts, scan_prompts, spool_stdin
from .progress import BatchProgress
from .results import INVALID_INPUT, ResultsFile, default_out_path, error_line, success_line
from .sources import EndpointSource
from .summary import Summary
from .transport import CLIENTS, Reply, Transport, TransportError

RETRY_STATUSES = frozenset({408, 409, 429})


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
    """A validated prompts file and an open, locked results file, ready to run."""

    prompts: Path
    display: str  # how to name the prompts in messages ("<stdin>" for -)
    scan: ScanResult
    results: ResultsFile
    spooled: bool = False  # prompts is our temporary copy of stdin

    @property
    def out(self) -> Path:
        return self.results.path

    @property
    def remaining(self) -> int:
        """Valid requests without a successful line yet (0: nothing to send, no deployment needed)."""
        done = self.results.previous.done
        valid_done = sum(1 for cid in done if cid in self.scan.ids and cid not in self.scan.invalid_ids)
        return self.scan.requests - valid_done

    def close(self) -> None:
        self.results.close()
        if self.spooled:
            try:
                os.unlink(self.prompts)
            except FileNotFoundError:
                pass


def prepare_batch(prompts: str | Path, out: str | Path | None, options: BatchOptions,
                  stdin: tp.BinaryIO | None = None) -> PreparedBatch:
    """Validate the prompts (first streaming pass) and open the results file; raise :class:`UsageError` if bad.

    ``prompts`` may be ``"-"`` for stdin (copied to a private temporary file; ``out`` is then required).
    """
    if options.client not in CLIENTS:
        raise UsageError(f"unknown client {options.client!r}", fix=f"use one of: {', '.join(CLIENTS)}")
    if options.concurrency is not None and options.concurrency < 1:
        raise UsageError(f"--concurrency must be at least 1, got {options.concurrency}", fix="e.g. --concurrency 16")
    if options.timeout <= 0:
        raise UsageError(f"--timeout must be positive, got {options.timeout:g}", fix="e.g. --timeout 600")
    if options.retries < 0:
        raise UsageError(f"--retries must be >= 0, got {options.retries}", fix="e.g. --retries 5")
    spooled = False
    if str(prompts) == "-":
        if out is None:
            raise UsageError("reading prompts from stdin (-) needs --out",
                             fix="name the results file, e.g. --out results.jsonl (running the same command "
                                 "again then resumes it)")
        path, display, spooled = spool_stdin(stdin), "<stdin>", True
    else:
        path = Path(prompts)
        display = str(prompts)
        if not path.exists():
            raise UsageError(f"prompts file {path} does not exist", fix="check the path given to --prompts")
        if path.is_dir():
            raise UsageError(f"prompts path {path} is a directory", fix="give --prompts a JSONL file")
    try:
        scan = scan_prompts(path, options.defaults(), options.skip_invalid, display)
        out_path = Path(out) if out is not None else default_out_path(path)
        results = ResultsFile.open(out_path, None if spooled else path)
    except BaseException:
        if spooled:
            os.unlink(path)
        raise
    return PreparedBatch(path, display, scan, results, spooled)


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
        self.requests: tp.Iterator[Request | InvalidLine] = iter_prompts(prepared.prompts, options.defaults())
        self.exhausted = False
        self.pending: deque[Request] = deque()
        self.delayed: list[tuple[float, int, Request]] = []
        self.seq = 0
        self.inflight = 0
        self.replicas: dict[int, _Replica] = {}
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
        for rep in self.replicas.values():
            for task in rep.workers:
                task.cancel()

    def _wake(self) -> None:
        self.changed.set()
        self._check_done()

    def _check_done(self) -> None:
        if self.inflight:
            return
        if self.stopping or (self.exhausted and not self.pending and not self.delayed):
            self.finished.set()

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
            if not self.exhausted:
                item = next(self.requests, None)
                if item is None:
                    self.exhausted = True
                    self._check_done()
                    continue
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
        self.results.write(error_line(item.custom_id, code, message))
        s = self.summary
        s.failed += 1
        s.errors[code] = s.errors.get(code, 0) + 1

    # -- replicas --------------------------------------------------------------------------------
    def _add_replica(self, ep: Endpoint) -> None:
        make = self._make_transport
        if self.opts.client == "raw" and not ep.url.startswith("http://"):
            make = CLIENTS["openai"]  # the lean client speaks plain http only; https goes through openai
        rep = _Replica(ep, make(ep, self.opts.timeout))
        self.replicas[ep.replica] = rep
        n = self.opts.concurrency or max(1, ep.parallel)
        for _ in range(n):
            task = asyncio.get_running_loop().create_task(self._worker(rep))
            rep.workers.add(task)
            task.add_done_callback(rep.workers.discard)
        self.summary.per_replica.setdefault(ep.replica, 0)
        self.say(f"replica r{ep.replica} ready at {ep.url} ({ep.parallel} slots)")

    def _fail_replica(self, rep: _Replica, reason: str, confirmed: bool) -> None:
        rep.failed, rep.reason, rep.confirmed = True, reason, confirmed
        rep.failed_at = time.monotonic()
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
            self.results.write(success_line(item.custom_id, request_id, reply.body))
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
                    if ep.replica not in self.replicas:
                        self._add_replica(ep)
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
        if self.prepared.remaining == 0:
            await self._next_item()  # everything was done earlier: count the skips, need no replica
        with self.progress:
            monitor = asyncio.get_running_loop().create_task(self._monitor())
            try:
                await self.finished.wait()
            finally:
                monitor.cancel()
                if self.grace_handle is not None:
                    self.grace_handle.cancel()
                self._cancel_all()
                tasks = [t for rep in self.replicas.values() for t in rep.workers]
                await asyncio.gather(monitor, *tasks, return_exceptions=True)
                for rep in self.replicas.values():
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
