"""The replicas of a batch run: their workers and slots, how each reply is handled, failures, the source's polls."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time

from rich.text import Text

from ..errors import SpeedslurmError
from ..rundir.records import Endpoint
from .inputs import Request
from .results import INVALID_INPUT, SUSPECT_AFTER, success_line
from .sources import SourceState
from .summary import percentile
from .transport import CLIENTS, Reply, Transport, TransportError
from .workqueue import WorkQueue

RETRY_STATUSES = frozenset({408, 409, 429})
PROBE_TIMEOUT = 10.0  # seconds one probe of an unreachable replica may take (at most the request timeout)


@dataclasses.dataclass(eq=False)
class Replica:
    """One ready replica as the run uses it: its transport, its workers (one per slot) and whether it failed."""

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
    draining: bool = False  # gets no new requests; its requests in flight finish (its deployment hands over)
    retired: bool = False  # drained: nothing in flight, its source was told (and may cancel its job)
    # Unreachable (connection errors in a row): gets no new requests and is probed with backoff until it answers
    # (it serves again) or its source says it failed, or run.outage_s passes (then it is failed).
    probing: bool = False
    down_since: float = 0.0
    back: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)  # set when it stops probing
    # Requests whose connection to it broke since it last served one sent after (id -> (when, request)): should
    # it turn out dead, they were in flight when it died.
    lost: dict[str, tuple[float, Request]] = dataclasses.field(default_factory=dict)


class ReplicaPool(WorkQueue):
    """Adds the replicas to the work queue: a worker per slot sends requests and handles replies; the monitor
    polls the source for replicas that became ready or failed."""

    def _add_replica(self, ep: Endpoint) -> None:
        make = self._make_transport
        if self.opts.client == "raw" and not ep.url.startswith("http://"):
            make = CLIENTS["openai"]  # the lean client speaks plain http only; https goes through openai
        rep = Replica(ep, make(ep, self.opts.timeout))
        before = self.replicas.get(ep.replica)
        if before is not None:  # the replica's job started again: the old transport is closed at the end
            if not before.failed:  # it was unreachable: that start is over
                before.failed, before.probing, before.reason, before.confirmed = True, False, "started again", True
                before.back.set()
                for task in list(before.workers):
                    task.cancel()
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

    def _fail_replica(self, rep: Replica, reason: str, confirmed: bool, died: bool = True) -> None:
        """Give ``rep`` up: its source said it failed (``confirmed``) or it stayed unreachable for run.outage_s.
        ``died``: its server died (not its job moved elsewhere), so the requests that were in flight on it are
        charged with the death."""
        rep.failed, rep.reason, rep.confirmed = True, reason, confirmed
        rep.failed_at = time.monotonic()
        rep.probing = False
        rep.back.set()
        hurry = getattr(self.source, "hurry", None)
        if not confirmed and callable(hurry):
            hurry()  # seen here first: the source's slower checks (Slurm) may soon say why
        me = asyncio.current_task()
        busy = rep.inflight
        for task in list(rep.workers):
            if task is not me:
                task.cancel()  # their in-flight requests go back to the queue (the prober ends)
        self.changed.set()  # the requests held while its fate was unknown may go
        others = [r for r in self.replicas.values() if not r.failed]
        where = "the other replicas" if others else "the queue until a replica is ready"
        self.say(Text.assemble((f"replica r{rep.endpoint.replica} failed:", "red"), f" {reason}",
                               f"; its in-flight requests go to {where}" if busy else ""))
        if died:
            self._count_deaths(rep)  # its cancelled workers' requests are still in ``sending``
        rep.lost.clear()

    def _count_deaths(self, rep: Replica) -> None:
        """``rep`` died: each request in flight on it (or whose connection to it broke before it was seen dead)
        was in flight on one more replica that died; at SUSPECT_AFTER it is suspected of crashing them."""
        victims = dict(rep.lost)
        victims.update({cid: (0.0, item) for cid, (r, item) in self.sending.items() if r is rep})
        rep.lost.clear()
        for cid, (_, item) in victims.items():
            if cid in self.suspects:
                continue
            n = self.deaths[cid] = self.deaths.get(cid, 0) + 1
            self.died_on.setdefault(cid, []).append(f"r{rep.endpoint.replica}: {rep.reason}")
            if n >= SUSPECT_AFTER:
                self._suspect(item)

    def _came_back(self, rep: Replica, restarted: bool, why: str) -> None:
        """``rep`` answers a probe again. ``restarted``: it had stopped answering (refused, or 5xx while it loads
        its model again), so its server died and was restarted: the requests whose connection broke are charged
        with the death, as when it fails (a request that crashes a server that a supervisor restarts at once is
        suspected too, not sent for ever). Else it was alive all along: each of them costs an attempt (--retries
        bounds a request whose connection always breaks)."""
        lost = [item for _, item in rep.lost.values()]
        if restarted:
            rep.reason = f"{why}; it answered again (its server restarted)"
            self._count_deaths(rep)
            rep.lost.clear()
            return
        rep.lost.clear()
        for item in lost:
            self._charge(item, "connection_error", f"replica r{rep.endpoint.replica}: the connection broke while "
                         "the request was in flight")

    def _unreachable(self, rep: Replica, why: str) -> None:
        """Connection errors in a row: no new requests for ``rep`` until a probe gets an answer."""
        rep.probing, rep.down_since = True, time.monotonic()
        rep.reason = f"unreachable at {rep.endpoint.url}: {why}"
        rep.back.clear()
        hurry = getattr(self.source, "hurry", None)
        if callable(hurry):
            hurry()  # the source's slower checks (Slurm) may know that its job ended
        self.say(Text.assemble((f"replica r{rep.endpoint.replica} unreachable", "yellow"),
                               f" at {rep.endpoint.url}: {why}; probing it (it serves again once it answers; "
                               f"given up after {self.opts.outage:g} s)"))
        loop = asyncio.get_running_loop()
        loop.call_later(self.opts.settle, self.changed.set)  # the requests it held may go then (see _may_send)
        task = loop.create_task(self._probe(rep))
        rep.workers.add(task)
        task.add_done_callback(rep.workers.discard)
        self.changed.set()  # its idle workers stop waiting for work

    async def _probe(self, rep: Replica) -> None:
        """Probe ``rep`` at once, then after probe_base seconds, doubling up to probe_max, until it answers
        (it serves again) or run.outage_s has passed since it became unreachable (it is failed)."""
        delay = self.opts.probe_base
        probe = getattr(rep.transport, "probe", None)
        limit = min(PROBE_TIMEOUT, self.opts.timeout)
        refused = 0  # probes that got no answer (or a 5xx: e.g. a llama-server loading its model again)
        try:
            while rep.probing and not rep.failed:
                try:
                    why = await asyncio.wait_for(probe(), limit) if callable(probe) else await _connects(rep)
                except asyncio.TimeoutError:
                    why = f"no answer within {limit:g} s"
                if not rep.probing or rep.failed:
                    return
                down = time.monotonic() - rep.down_since
                if why is None:
                    rep.probing, rep.conn_errors = False, 0
                    rep.back.set()
                    self._came_back(rep, restarted=refused > 0, why=rep.reason)
                    self.say(f"replica r{rep.endpoint.replica} answers again after {down:.1f} s: it serves again")
                    self._wake()
                    return
                refused += 1
                if down >= self.opts.outage:  # a partition as much as a crash: nobody is blamed for it
                    self._fail_replica(rep, f"unreachable at {rep.endpoint.url} for {self.opts.outage:g} s "
                                       f"(run.outage_s): {why}", confirmed=False, died=False)
                    self._wake()
                    return
                await asyncio.sleep(min(delay, self.opts.outage - down))
                delay = min(delay * 2, self.opts.probe_max)
        except asyncio.CancelledError:
            pass

    async def _worker(self, rep: Replica) -> None:
        try:
            while not rep.failed and not rep.draining:
                if rep.probing:
                    await rep.back.wait()
                    continue
                if self.sem is not None:
                    await self.sem.acquire()
                try:
                    item = await self._next_item(rep)
                    if item is None:
                        if rep.probing:
                            continue  # wait until it answers again
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

    async def _handle(self, rep: Replica, item: Request) -> None:
        body = item.body
        if "model" not in body and rep.endpoint.model:
            body["model"] = rep.endpoint.model
        if rep.probing:  # it became unreachable while this worker waited for work
            self.pending.appendleft(item)
            return
        cid = item.custom_id
        self.inflight += 1
        rep.inflight += 1
        self.sending[cid] = (rep, item)
        t0 = time.perf_counter()
        sent_at = time.monotonic()
        try:
            reply = await rep.transport.send(item.url, body)
        except asyncio.CancelledError:
            self.inflight -= 1
            rep.inflight -= 1
            self.sending.pop(cid, None)
            self._requeue(item)  # the replica failed or the run stops: not this request's fault
            self._check_done()
            raise
        except UnicodeError as exc:
            # Validation rejects text UTF-8 cannot encode; should any reach here, it fails this request only.
            self.inflight -= 1
            rep.inflight -= 1
            self.sending.pop(cid, None)
            self._write_error(item, INVALID_INPUT, f"{self.prepared.display}:{item.line}: the request cannot be "
                              f"encoded as UTF-8: {exc}")
            self._wake()
            return
        except TransportError as exc:
            self.inflight -= 1
            rep.inflight -= 1
            self.sending.pop(cid, None)
            if exc.kind == "connect" and not rep.failed:
                if exc.sent:
                    rep.lost[cid] = (time.monotonic(), item)  # should the server have died, this was in flight
                if not rep.probing:
                    rep.conn_errors += 1
                    if rep.conn_errors >= self.opts.down_after:
                        self._unreachable(rep, str(exc))
            if rep.failed or rep.probing:
                self._requeue(item)  # the replica is down: not this request's fault, as far as is known
            else:
                self._retry(item, "timeout" if exc.kind == "timeout" else "connection_error",
                            f"replica r{rep.endpoint.replica}: {exc}")
            self._wake()
            return
        self.inflight -= 1
        rep.inflight -= 1
        self.sending.pop(cid, None)
        rep.conn_errors = 0
        if rep.lost:  # it answered a request sent after those broke: it was alive then
            rep.lost = {c: v for c, v in rep.lost.items() if v[0] > sent_at}
        self._on_reply(rep, item, reply, time.perf_counter() - t0)
        self._wake()

    def _on_reply(self, rep: Replica, item: Request, reply: Reply, latency: float) -> None:
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
            self._forget(item.custom_id)
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
            self._drain(state)
            if not self.stopping:
                for ep in state.ready:
                    rep = self.replicas.get(ep.replica)
                    if rep is None or ((rep.failed or rep.probing) and ep.replica not in state.failed
                                       and _new_start(rep.endpoint, ep)):
                        self._add_replica(ep)  # new, or started again (requeued): its new endpoint
            listed = {ep.replica for ep in state.ready}
            for r, rep in list(self.replicas.items()):
                if not rep.failed and not rep.retired and r not in listed and r not in state.failed:
                    # The source stopped offering it, without a failure: its job was requeued or preempted.
                    self._fail_replica(rep, "its job left its nodes (requeued or preempted); waiting for it to "
                                       "start again", confirmed=True, died=False)
            for r, why in state.failed.items():
                rep = self.replicas.get(r)
                if rep is not None and rep.retired:
                    continue  # drained and handed over: how its job ends is no failure of the batch
                if rep is None:
                    if r not in self.source_failed:
                        self.source_failed[r] = why
                        self.say(Text.assemble((f"replica r{r} failed:", "red"), f" {why}"))
                elif not rep.failed:  # a death only when its job side saw the server exit (failed.json)
                    self._fail_replica(rep, why, confirmed=True, died=r in state.crashed)
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
        live = [r for r in self.replicas.values() if not r.failed and not r.retired]
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

    def _drain(self, state: SourceState) -> None:
        """Stop sending to the replicas the source hands over (``state.draining``) and to those whose job ends
        (``state.ends_at``) before a request would finish; tell the source (``drained(r)``) once one has nothing
        in flight, so that it can end its job."""
        now = time.time()
        expected = percentile(self.summary.latencies[-200:], 95) if self.summary.latencies else None
        for r, rep in self.replicas.items():
            if rep.failed or rep.draining:
                continue
            end = state.ends_at.get(r)
            short = end is not None and expected is not None and end - now < expected + self.opts.poll_interval
            if r in state.draining or short:
                rep.draining = True
                why = "its successor serves" if r in state.draining else \
                    f"its job ends in {max(0.0, end - now):.0f} s, sooner than a request takes" if end else ""
                self.say(f"replica r{r} draining ({why}): no new requests, {rep.inflight} in flight finish")
                self.changed.set()  # its idle workers wake and end
        drained = getattr(self.source, "drained", None)
        for r, rep in self.replicas.items():
            if rep.draining and not rep.retired and not rep.failed and not rep.probing and rep.inflight == 0:
                # (one that is unreachable is not drained: its source says how its job ended, e.g. its time limit)
                rep.retired = True
                rep.probing = False
                rep.back.set()
                for task in list(rep.workers):
                    task.cancel()  # idle: waiting for work it will not take
                self.say(f"replica r{r} drained ({rep.served} served)")
                if callable(drained):
                    drained(r)

    def failed_replicas(self) -> dict[int, str]:
        out = dict(self.source_failed)
        out.update({r: rep.reason for r, rep in self.replicas.items() if rep.failed})
        out.update({r: f"{rep.reason} (still probed when the run ended)" for r, rep in self.replicas.items()
                    if rep.probing})
        return out


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


async def _connects(rep: Replica) -> str | None:
    """A probe for a transport without its own: does the replica's host accept a TCP connection?"""
    import urllib.parse

    parts = urllib.parse.urlsplit(rep.endpoint.url)
    try:
        _, writer = await asyncio.open_connection(parts.hostname or "127.0.0.1",
                                                  parts.port or (443 if parts.scheme == "https" else 80))
    except OSError as exc:
        return exc.strerror or str(exc) or type(exc).__name__
    writer.close()
    return None
