"""Aliases and their replicas: wake on request, routing by free slots, watching deployments, idle stop.

Each replica of an alias is a deployment of one replica of its own (so that one can be stopped without the
others), started through :mod:`speedslurm.deployments.lifecycle` with the same plan, checks and submission as
``speedslurm up``; or, for an alias whose model is a URL, that running server. A request takes a slot of the ready
replica with the most free ones (``slots``: the replica's llama-server slots, less what the gateway has in flight
there); with none free it waits in the alias's queue (at most ``gateway.max_queue``, for at most
``gateway.max_wait_s``), and a request for an alias with nothing running starts a replica first.

The watcher looks at each deployment's run directory twice a second (Slurm less often: the status probe's
backoff) and at unreachable replicas with a backed-off ``GET /health``. A replica whose connection broke leaves
the pool at once, and comes back when its server answers again; only its job's end or failure retires it. A
deployment that fails before it served fails the requests waiting for it with its reason, once; new requests
get that reason (503) for ``gateway.retry_after_failure_s`` before one starts another.

Blocking work (planning, sbatch, squeue, scancel, file reads) runs in worker threads; everything else runs on the
event loop and is not locked.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import os
import re
import time
import typing as tp
from pathlib import Path

from ..errors import SpeedslurmError, UsageError
from .metrics import Usage
from .state import Folder

if tp.TYPE_CHECKING:
    import aiohttp

    from ..deployments.status import ReplicaStatus, StatusProbe
    from ..rundir.layout import Deployment
    from ..settings.settings import GatewayModel, Settings

log = logging.getLogger("speedslurm.gateway")

ALIAS = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@-]{0,127}$")
LIVE = ("PENDING", "STARTING", "LOADING", "READY", "DOWN")
URL_DOWN_FAST_S = 10.0  # a URL alias whose servers have all been down this long answers 503 at once
STOP_RETRY_MOST_S = 300.0  # a cancel that failed is tried again with backoff, up to this far apart
SCALE_UP_BACKOFF_MOST_S = 600.0  # after replicas failed to start, scale-up waits up to this long
WATCH_S = 0.5
WATCH_WAITED_S = 0.05  # while requests wait for a replica that is starting: its endpoint is taken at once
PROBE_FIRST_S, PROBE_MOST_S = 0.5, 10.0
DOWN_REPLACE_S = 120.0  # a deployment's replica unreachable this long while its job runs is stopped and replaced
CLOSE_TASKS_S = 60.0  # how long the gateway's exit waits for the submissions and cancels under way, all together
SLOTS_OF_A_URL = 4


class Unavailable(Exception):
    """No replica can take the request: the HTTP status (503, 502, 404), the reason, and Retry-After (seconds)."""

    def __init__(self, status: int, reason: str, retry_after: int | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.retry_after = retry_after


@dataclasses.dataclass(frozen=True)
class AliasSpec:
    """An alias with every default filled in: what ``--model ALIAS=MODEL`` and ``gateway.models`` give."""

    name: str
    model: str  # a registry name, a .gguf path, or URLs of running servers (comma-separated: one replica each)
    nodes: int | None
    min_replicas: int
    max_replicas: int
    ctx: int | None
    time: str | None
    idle_timeout_s: float
    slots: int | None
    api_key_file: str | None

    @property
    def is_url(self) -> bool:
        return self.model.startswith(("http://", "https://"))


def alias_specs(settings: Settings, models: tp.Sequence[str] = ()) -> list[AliasSpec]:
    """The aliases to serve: ``gateway.models`` with ``models`` (``ALIAS=MODEL`` from ``--model``) added or
    overriding their model; :class:`UsageError` naming the problem for a malformed one."""
    from ..node.idle import parse_duration

    g = settings.gateway
    table: dict[str, GatewayModel] = dict(g.models)
    from ..settings.settings import GatewayModel

    for item in models:
        alias, sep, model = item.partition("=")
        alias, model = alias.strip(), model.strip()
        if not sep or not alias or not model:
            raise UsageError(f"--model {item!r} is not ALIAS=MODEL",
                             fix="give an alias and a model, e.g. --model llama=Q4_K_S or --model tiny=/path/m.gguf")
        table[alias] = dataclasses.replace(table.get(alias) or GatewayModel(), model=model)
    if not table:
        raise UsageError("the gateway has no model to serve",
                         fix="give one or more --model ALIAS=MODEL, or set gateway.models in the settings")
    out = []
    for alias, m in table.items():
        where = settings.origins.get(f"gateway.models.{alias}", "--model")
        if not ALIAS.fullmatch(alias):
            raise UsageError(f"{where}: {alias!r} is not a valid alias",
                             fix="use letters, digits and . _ : / @ - (at most 128), starting with a letter or digit")
        if not m.model:
            raise UsageError(f"{where}: gateway.models.{alias} names no model",
                             fix=f"set gateway.models.{alias}.model, or give --model {alias}=MODEL")
        if m.model.startswith(("http://", "https://")):
            import urllib.parse

            for url in m.model.split(","):
                parts = urllib.parse.urlsplit(url.strip())
                try:
                    parts.port  # noqa: B018 - raises ValueError for a port out of range
                except ValueError:
                    parts = parts._replace(netloc="")
                if parts.scheme not in ("http", "https") or not parts.hostname \
                        or parts.path.strip("/") not in ("", "v1") or parts.query:
                    raise UsageError(f"{where}: {url.strip()!r} of alias {alias!r} is not a server's base URL",
                                     fix="give http(s)://HOST:PORT (no path), several separated by commas")
        idle = m.idle_timeout if m.idle_timeout is not None else g.idle_timeout
        try:
            idle_s = parse_duration(idle)
        except ValueError as exc:
            raise UsageError(f"gateway idle timeout of {alias!r}: {exc}",
                             fix="give a duration such as 90s, 30m or 2h (0: never)") from None
        low = m.min_replicas if m.min_replicas is not None else g.min_replicas
        high = m.max_replicas if m.max_replicas is not None else g.max_replicas
        if low > high:
            raise UsageError(f"alias {alias!r}: min_replicas {low} is more than max_replicas {high}",
                             fix="make min_replicas at most max_replicas")
        out.append(AliasSpec(alias, m.model, m.nodes, low, high, m.ctx, m.time or g.time, idle_s, m.slots,
                             m.api_key_file))
    return out


class Replica:
    """One replica the gateway can send to: a deployment of one replica, or a URL."""

    def __init__(self, alias: Alias, dep: Deployment | None = None, url: str = "", api_key: str = "",
                 slots: int = SLOTS_OF_A_URL) -> None:
        self.alias = alias
        self.dep = dep
        self.state = "READY" if dep is None else "PENDING"
        self.why = ""
        self.url = url.rstrip("/")
        self.api_key = api_key
        self.slots = slots
        self.in_flight = 0
        self.served = 0
        self.nodes = 0
        self.born = time.monotonic()
        self.ready_at: float | None = time.monotonic() if dep is None else None
        self.last_used = time.monotonic()
        self.probe_next = 0.0
        self.probe_wait = PROBE_FIRST_S
        self.probe: StatusProbe | None = None
        self.stopping = False  # being cancelled (or cancelled): takes nothing, counts for nothing
        self.draining = ""  # why it takes no new request (handed over, scaled down); stopped once empty
        self.ends_at: float | None = None  # when its servers may stop (monotonic), once Slurm said
        self.successor = False  # a successor was started for it (its time limit nears)
        self.successor_for: Replica | None = None  # the replica this one was started to succeed
        self.reattached = False  # found running by a restarted gateway: it did not start it
        self.down_since = 0.0  # when it went DOWN (monotonic)
        self.stop_next = 0.0  # a cancel that failed is tried again from then (monotonic)
        self.cancel_pending = False  # its cancel failed: its job may still hold nodes, so it stays recorded
        self.stop_wait = 0.0

    @property
    def name(self) -> str:
        return self.dep.id if self.dep is not None else self.url

    @property
    def free(self) -> int:
        if self.state != "READY" or self.stopping or self.draining:
            return 0
        return self.slots - self.in_flight

    @property
    def holds_nodes(self) -> bool:
        return self.dep is not None and self.state in ("STARTING", "LOADING", "READY", "DOWN")

    def to_json(self) -> dict[str, tp.Any]:
        state = "DRAINING" if self.draining and self.state == "READY" and not self.stopping else self.state
        return {"deployment": self.dep.id if self.dep is not None else None,
                "job_ids": self.dep.job_ids if self.dep is not None else [],
                "url": self.url or None, "state": state, "why": self.draining or self.why,
                "in_flight": self.in_flight, "slots": self.slots, "served": self.served,
                "idle_s": round(time.monotonic() - self.last_used, 1),
                "ends_in_s": None if self.ends_at is None else round(self.ends_at - time.monotonic())}


class Waiter:
    __slots__ = ("future", "since")

    def __init__(self, future: asyncio.Future[Replica]) -> None:
        self.future = future
        self.since = time.monotonic()


class Alias:
    def __init__(self, spec: AliasSpec) -> None:
        self.spec = spec
        self.replicas: list[Replica] = []
        self.waiters: collections.deque[Waiter] = collections.deque()
        self.failure: tuple[str, float] | None = None  # (reason, until: monotonic)
        self.failed_starts = 0  # starts in a row that failed: the minimum is kept again only after a request
        self.starting = 0  # replicas being planned and submitted now
        self.pressure_since: float | None = None  # since when requests have queued past the thresholds
        self.busiest: collections.deque[tuple[float, int]] = collections.deque()  # (time, in flight + waiting)
        self.handing: collections.deque[Replica] = collections.deque()  # replicas waiting for their successor

    @property
    def name(self) -> str:
        return self.spec.name

    def live(self) -> list[Replica]:
        return [r for r in self.replicas if r.state in LIVE and not r.stopping]

    def serving(self) -> list[Replica]:
        """The live replicas that are not drained: what the alias has, or will have, to serve requests."""
        return [r for r in self.live() if not r.draining]

    def state(self) -> str:
        live = self.live()
        if any(r.state == "READY" for r in live):
            return "ready"
        if self.spec.is_url and live and all(r.state == "DOWN" for r in live):
            return "down"
        if live or self.starting:
            return "starting"
        if self.failure and self.failure[1] > time.monotonic():
            return "failed"
        return "cold"

    def why(self) -> str:
        if self.failure and self.state() == "failed":
            return self.failure[0]
        waiting = [r for r in self.live() if r.state != "READY"]
        if waiting:
            r = waiting[0]
            what = "deployment" if r.dep is not None else "server"
            return f"{what} {r.name} is {r.state}{' (' + r.why + ')' if r.why else ''}"
        return ""

    def oldest_wait(self, now: float) -> float:
        return now - self.waiters[0].since if self.waiters else 0.0

    def to_json(self) -> dict[str, tp.Any]:
        live = self.live()
        return {"alias": self.name, "model": self.spec.model, "state": self.state(), "why": self.why(),
                "queue": len(self.waiters), "in_flight": sum(r.in_flight for r in self.replicas),
                "replicas": {"ready": sum(r.state == "READY" for r in live), "live": len(live),
                             "min": self.spec.min_replicas, "max": self.spec.max_replicas},
                "deployments": [r.to_json() for r in self.replicas]}


class Pool:
    """Every alias of a gateway, its replicas and waiting requests. Methods run on the event loop."""

    def __init__(self, settings: Settings, specs: tp.Sequence[AliasSpec], folder: Folder, usage: Usage) -> None:
        self.settings = settings
        self.gateway = settings.gateway
        self.aliases = {s.name: Alias(s) for s in specs}
        self.folder = folder
        self.usage = usage
        self.session: aiohttp.ClientSession | None = None
        self.closing = False
        self.not_stopped: list[str] = []  # at exit: deployments whose cancel failed (still recorded)
        self.decisions: collections.deque[dict[str, tp.Any]] = collections.deque(maxlen=50)
        self._tasks: set[asyncio.Task[tp.Any]] = set()
        self._look_errors: dict[str, str] = {}  # what failed at the watcher's last look, by alias or replica
        self._held_at = time.monotonic()
        # The deployments' settings: the gateway decides when a replica is idle, not the job side.
        self.deploy_settings = dataclasses.replace(settings, llama=dataclasses.replace(settings.llama,
                                                                                          idle_timeout="0"))

    def decide(self, what: str, alias: Alias, why: str, **figures: tp.Any) -> None:
        """One decision, in the log and in ``gateway status``: what, for which alias, why, the figures behind it."""
        entry = {"time": round(time.time(), 1), "decision": what, "alias": alias.name, "why": why, **figures}
        self.decisions.append(entry)
        log.info("%s", _line("decision", **{k: v for k, v in entry.items() if k != "time"}))

    # ------------------------------------------------------------------------------------------ requests

    def names(self) -> list[str]:
        return sorted(self.aliases)

    def alias(self, name: tp.Any) -> Alias:
        alias = self.aliases.get(name) if isinstance(name, str) else None
        if alias is None:
            shown = repr(name) if isinstance(name, str) and len(name) <= 80 else "that model"
            raise Unavailable(404, f"the gateway serves no model {shown}; its models are: {', '.join(self.names())}")
        return alias

    def _pick(self, alias: Alias) -> Replica | None:
        best = max(alias.replicas, key=lambda r: r.free, default=None)
        return best if best is not None and best.free > 0 else None

    async def acquire(self, alias: Alias, timeout: float | None = None) -> Replica:
        """A slot on a ready replica of ``alias``: at once, or after a wait (a cold alias starts a replica);
        :class:`Unavailable` when the queue is full, the wait is over or the alias's deployment failed."""
        if self.closing:
            raise Unavailable(503, "the gateway is shutting down", retry_after=30)
        replica = self._pick(alias)
        if replica is not None and not alias.waiters:
            replica.in_flight += 1
            return replica
        if alias.state() == "failed":
            assert alias.failure is not None
            raise Unavailable(503, f"model {alias.name!r} could not start: {alias.failure[0]}",
                              retry_after=max(1, int(alias.failure[1] - time.monotonic())))
        if alias.state() == "down":
            now = time.monotonic()
            live = alias.live()
            if now - max(r.down_since for r in live) >= URL_DOWN_FAST_S:
                raise Unavailable(503, f"the server(s) of {alias.name!r} do not answer: {alias.why()}",
                                  retry_after=max(1, int(min(r.probe_next for r in live) - now) + 1))
        if len(alias.waiters) >= self.gateway.max_queue:
            raise Unavailable(503, f"{len(alias.waiters)} requests for {alias.name!r} wait already "
                                   f"(gateway.max_queue); try again shortly", retry_after=5)
        if not alias.serving() and not alias.starting:
            self.decide("wake", alias, "a request came and no replica serves the model")
            alias.failed_starts = 0
            self.wake(alias)
        for r in alias.live():
            if r.state != "READY":
                r.last_used = time.monotonic()  # asked for: its idle time counts from the last request waiting
        future: asyncio.Future[Replica] = asyncio.get_running_loop().create_future()
        waiter = Waiter(future)
        alias.waiters.append(waiter)
        wait = self.gateway.max_wait_s if timeout is None else timeout
        try:
            return await asyncio.wait_for(asyncio.shield(future), wait)
        except (asyncio.TimeoutError, asyncio.CancelledError) as exc:
            if future.done() and not future.cancelled() and future.exception() is None:
                if isinstance(exc, asyncio.TimeoutError):
                    return future.result()
                self.release(future.result())  # handed a slot as the client left
            else:
                future.cancel()
            with_removed(alias.waiters, waiter)
            if isinstance(exc, asyncio.CancelledError):
                raise
            why = alias.why() or "every replica is busy"
            raise Unavailable(503, f"no replica of {alias.name!r} could take the request in {wait:g} s: {why}",
                              retry_after=30) from None

    def release(self, replica: Replica) -> None:
        """A request on ``replica`` is over: its slot goes to the next waiting request, if any."""
        replica.in_flight -= 1
        replica.last_used = time.monotonic()
        self._hand_out(replica.alias)
        if replica.draining and replica.in_flight == 0:
            self._spawn(self._stop(replica, replica.draining))

    def _hand_out(self, alias: Alias) -> None:
        while alias.waiters:
            replica = self._pick(alias)
            if replica is None:
                return
            waiter = alias.waiters.popleft()
            if waiter.future.done():
                continue
            replica.in_flight += 1
            waiter.future.set_result(replica)

    def lost(self, replica: Replica, why: str) -> None:
        """``replica``'s connection broke or it answers that it is loading: out of the pool until it answers."""
        if replica.state == "READY":
            replica.state, replica.why = "DOWN", why
            replica.down_since = time.monotonic()
            replica.probe_next, replica.probe_wait = time.monotonic() + PROBE_FIRST_S, PROBE_FIRST_S
            log.info("%s", _line("replica_down", alias=replica.alias.name, replica=replica.name, why=why))

    def _fail_waiters(self, alias: Alias, reason: str, status: int = 503) -> None:
        while alias.waiters:
            future = alias.waiters.popleft().future
            if not future.done():
                future.set_exception(Unavailable(status, reason, retry_after=int(self.gateway.retry_after_failure_s)))

    # ------------------------------------------------------------------------------------------ replicas

    def wake(self, alias: Alias, count: int | None = None, *, succeeds: Replica | None = None) -> int:
        """Start replicas of ``alias`` in the background (default: enough for its minimum, at least one). The
        successor of a replica that ``succeeds`` it before its time limit may go past the maximum by as many
        replicas as wait for theirs (they drain once it is ready). Returns how many started."""
        if alias.spec.is_url or self.closing:
            return 0
        room = alias.spec.max_replicas - len(alias.serving()) - alias.starting
        if succeeds is not None:
            room += len(alias.handing)
        n = min(room, count if count is not None else max(1, alias.spec.min_replicas - len(alias.serving())))
        for _ in range(max(0, n)):
            alias.starting += 1
            self._spawn(self._start_one(alias, succeeds))
        return max(0, n)

    async def _start_one(self, alias: Alias, succeeds: Replica | None = None) -> None:
        try:
            dep = await asyncio.to_thread(self._submit, alias.spec)
        except Exception as exc:  # noqa: BLE001 - a bug must not stop the gateway either; it shows in the log
            alias.starting -= 1
            if isinstance(exc, SpeedslurmError):
                reason = exc.message + (f" ({exc.fix})" if exc.fix else "")
            else:
                log.exception("starting a replica of %s", alias.name)
                reason = f"starting a replica failed: {exc!r}"
            if succeeds is not None:
                self._successor_lost(alias, succeeds)
            self._failed_to_start(alias, reason)
            return
        alias.starting -= 1
        replica = Replica(alias, dep)
        replica.nodes = int(dep.info.get("nodes") or 1)
        replica.successor_for = succeeds
        alias.replicas.append(replica)
        self._record()
        log.info("%s", _line("replica_started", alias=alias.name, deployment=dep.id, job_ids=",".join(dep.job_ids)))
        if self.closing:
            await self._stop(replica, "the gateway stopped")

    def _submit(self, spec: AliasSpec) -> Deployment:
        from ..deployments import lifecycle

        plan, binaries = lifecycle.prepare(self.deploy_settings, spec.model, nodes=spec.nodes, replicas=1,
                                           ctx=spec.ctx, time_limit=spec.time)
        return lifecycle.launch(self.deploy_settings, plan, binaries)

    def _successor_lost(self, alias: Alias, old: Replica) -> None:
        """The successor started for ``old`` will not serve: another one is started on the next look, unless
        starts keep failing (then ``old`` drains at its time limit)."""
        with_removed(alias.handing, old)
        old.successor = alias.failed_starts >= 2

    def _failed_to_start(self, alias: Alias, reason: str) -> None:
        log.info("%s", _line("start_failed", alias=alias.name, why=reason))
        alias.failed_starts += 1
        if alias.live() or alias.starting:
            return  # another replica may still serve the waiting requests
        alias.failure = (reason, time.monotonic() + self.gateway.retry_after_failure_s)
        self._fail_waiters(alias, f"model {alias.name!r} could not start: {reason}")

    async def _stop(self, replica: Replica, why: str) -> bool:
        """Cancel ``replica``'s deployment; False when the cancel failed: the replica stays recorded, takes no
        request and is tried again with backoff (the watcher), so that its nodes are never forgotten."""
        if replica.dep is None or replica.stopping:
            return False
        replica.stopping = True
        from ..deployments import lifecycle

        try:
            await asyncio.to_thread(lifecycle.down, replica.dep, None, why)
        except Exception as exc:  # noqa: BLE001 - whatever it was, the job may still run: keep it and retry
            replica.stopping = False
            replica.cancel_pending = True
            replica.draining = replica.draining or why
            replica.stop_wait = min(STOP_RETRY_MOST_S, max(5.0, replica.stop_wait * 2))
            replica.stop_next = time.monotonic() + replica.stop_wait
            message = exc.message if isinstance(exc, SpeedslurmError) else repr(exc)
            log.info("%s", _line("stop_failed", alias=replica.alias.name, deployment=replica.name, why=message,
                                 retry_in_s=replica.stop_wait))
            self._record()
            return False
        replica.cancel_pending = False
        replica.state, replica.why = ("FAILED" if replica.state == "FAILED" else "ENDED"), why
        self.usage.retire(replica.name)
        log.info("%s", _line("replica_stopped", alias=replica.alias.name, deployment=replica.name, why=why))
        self._record()
        return True

    def _record(self) -> None:
        """deployments.json: the deployments that are not over, by alias (a restart re-attaches to them)."""
        by_alias = {a.name: [r.dep.id for r in a.replicas if r.dep is not None
                             and ((r.state in LIVE and not r.stopping) or r.cancel_pending)]
                    for a in self.aliases.values()}
        recorded = {i for ids in by_alias.values() for i in ids}
        successors = {r.dep.id: r.successor_for.dep.id for a in self.aliases.values() for r in a.replicas
                      if r.dep is not None and r.dep.id in recorded and r.successor_for is not None
                      and r.successor_for.dep is not None and r.successor_for.dep.id in recorded}
        self.folder.write_deployments({a: ids for a, ids in by_alias.items() if ids}, successors)

    def attach(self) -> list[str]:
        """Re-attach to the deployments a gateway of this folder started and left running; returns their ids.
        Those of an alias no longer served are stopped."""
        from ..deployments import lifecycle
        from ..deployments.record import find_deployment

        found, orphans = [], []
        by_alias, successors = self.folder.deployments()
        by_id: dict[str, Replica] = {}
        for alias_name, ids in by_alias.items():
            for ident in ids:
                try:
                    dep = find_deployment(self.settings, ident)
                except SpeedslurmError:
                    continue  # its run directory is gone
                alias = self.aliases.get(alias_name)
                if alias is None or alias.spec.is_url:
                    orphans.append(dep)
                    continue
                replica = Replica(alias, dep)
                replica.nodes = int(dep.info.get("nodes") or 1)
                replica.why = "re-attached"
                replica.reattached = True
                alias.replicas.append(replica)
                by_id[dep.id] = replica
                found.append(dep.id)
        # A handover the last gateway had begun goes on: the old replica drains once its successor is ready,
        # and gets no second successor.
        for succ_id, old_id in successors.items():
            succ, old = by_id.get(succ_id), by_id.get(old_id)
            if succ is not None and old is not None and succ.alias is old.alias:
                succ.successor_for, old.successor = old, True
                old.alias.handing.append(old)
        for dep in orphans:
            log.info("%s", _line("orphan_stopped", deployment=dep.id, why="its alias is no longer served"))
            try:
                lifecycle.down(dep, None, "its alias is no longer served")
            except SpeedslurmError:
                pass
        return found

    def add_urls(self) -> None:
        for alias in self.aliases.values():
            if alias.spec.is_url:
                key = ""
                if alias.spec.api_key_file:
                    path = Path(os.path.expanduser(alias.spec.api_key_file))
                    try:
                        key = path.read_text().strip()
                    except OSError as exc:
                        raise UsageError(f"cannot read the API key of {alias.name!r} from {path}: "
                                         f"{exc.strerror or exc}", fix=f"check gateway.models.{alias.name}"
                                                                        ".api_key_file") from None
                for url in alias.spec.model.split(","):
                    url = url.strip().rstrip("/")
                    url = url[:-3] if url.endswith("/v1") else url
                    alias.replicas.append(Replica(alias, None, url, key, alias.spec.slots or SLOTS_OF_A_URL))

    async def size_urls(self) -> None:
        """A URL replica without ``slots`` set takes as many requests at once as its server has slots
        (llama-server's ``/props`` ``total_slots``), else 4."""
        import aiohttp

        assert self.session is not None
        for alias in self.aliases.values():
            if not alias.spec.is_url or alias.spec.slots:
                continue
            for r in alias.replicas:
                try:
                    async with self.session.get(r.url + "/props", headers={"Authorization": f"Bearer {r.api_key}"},
                                                timeout=aiohttp.ClientTimeout(total=5)) as resp:
                        data = await resp.json(content_type=None) if resp.status == 200 else None
                except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError):
                    data = None
                slots = data.get("total_slots") if isinstance(data, dict) else None
                if isinstance(slots, int) and not isinstance(slots, bool) and 0 < slots <= 4096:
                    r.slots = slots

    def check_models(self) -> None:
        """Every alias's model can be planned now (registry name or file, binaries, settings): a bad one
        stops the gateway before it serves, not its first request."""
        from ..deployments import lifecycle

        for alias in self.aliases.values():
            if not alias.spec.is_url:
                try:
                    lifecycle.prepare(self.deploy_settings, alias.spec.model, nodes=alias.spec.nodes, replicas=1,
                                      ctx=alias.spec.ctx, time_limit=alias.spec.time, place=False)
                except UsageError as exc:
                    raise UsageError(f"alias {alias.name!r}: {exc.message}", fix=exc.fix) from None

    # ------------------------------------------------------------------------------------------ watching

    def _spawn(self, coro: tp.Coroutine[tp.Any, tp.Any, tp.Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def watch(self) -> None:
        """Until the gateway closes: follow each deployment's state, probe unreachable replicas, scale each
        alias, hand replicas over before their time limit."""
        while True:
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the watcher must go on; the error shows in the log
                log.exception("gateway watcher")
            awaited = any(a.waiters and any(r.state != "READY" for r in a.live()) for a in self.aliases.values())
            await asyncio.sleep(WATCH_WAITED_S if awaited else WATCH_S)

    async def tick(self) -> None:
        """One look at every alias and replica. An error with one of them (a run directory that cannot be
        read, a bug) is logged and skips that one only: the others are looked at all the same."""
        now = time.monotonic()
        self.account(now)
        for alias in self.aliases.values():
            for replica in list(alias.replicas):
                try:
                    await self._look_at(replica, now)
                except Exception as exc:  # noqa: BLE001 - one replica must not stop the look at the others
                    self._look_failed(f"replica {replica.name}", exc)
            try:
                await self._look_at_alias(alias, now)
            except Exception as exc:  # noqa: BLE001 - nor one alias the look at the others
                self._look_failed(f"alias {alias.name}", exc)
            self._forget(alias, now)

    async def _look_at(self, replica: Replica, now: float) -> None:
        if replica.dep is not None and replica.state in LIVE and not replica.stopping:
            await self._follow(replica)
        if replica.state == "DOWN" and now >= replica.probe_next:
            await self._probe(replica)
        if replica.dep is not None and replica.state == "DOWN" and not replica.draining and not self.closing \
                and now - replica.down_since >= DOWN_REPLACE_S:
            # Slurm says its job runs, but its servers have not answered for minutes: its nodes serve nobody.
            self._drain(replica, f"unreachable for {round(now - replica.down_since)} s", last_error=replica.why)
            alias = replica.alias
            if alias.waiters or len(alias.serving()) < alias.spec.min_replicas:
                self.decide("wake", alias, f"deployment {replica.name} is unreachable", waiting=len(alias.waiters))
                self.wake(alias, 1)
        if (replica.cancel_pending or (replica.draining and replica.in_flight == 0 and replica.state in LIVE)) \
                and not replica.stopping and now >= replica.stop_next:
            self._spawn(self._stop(replica, replica.draining))  # drained, or its cancel failed

    async def _look_at_alias(self, alias: Alias, now: float) -> None:
        self._hand_out(alias)  # a free slot never waits for an event to be handed to a waiting request
        if self.closing:
            return
        self._handover(alias, now)
        await self._scale_up(alias, now)
        self._scale_down(alias, now)
        self._idle(alias, now)
        if alias.state() == "cold" and alias.spec.min_replicas > 0 and not alias.failed_starts:
            self.decide("wake", alias, "fewer replicas than the alias's minimum", min=alias.spec.min_replicas)
            self.wake(alias)

    def _look_failed(self, what: str, exc: Exception) -> None:
        text = repr(exc)
        if self._look_errors.get(what) != text:  # logged when it starts or changes, not at every look
            self._look_errors[what] = text
            log.error("gateway watcher: %s: %s", what, text, exc_info=exc)

    def _forget(self, alias: Alias, now: float) -> None:
        """Replicas that ended long ago are forgotten (their record stays in the run directory); one that may
        hold nodes (live, being stopped, or its cancel failed) never is."""
        keep = {id(r) for r in alias.replicas if r.state in LIVE or r.stopping or r.cancel_pending}
        ended = [r for r in alias.replicas if id(r) not in keep and now - r.last_used < 3600][-50:]
        keep.update(id(r) for r in ended)
        alias.replicas = [r for r in alias.replicas if id(r) in keep]

    def account(self, now: float) -> None:
        """Node-seconds held since the last call, by alias and replica."""
        elapsed, self._held_at = now - self._held_at, now
        for alias in self.aliases.values():
            for r in alias.replicas:
                if r.holds_nodes and not r.stopping:
                    self.usage.hold(alias.name, r.name, r.nodes * elapsed)

    async def _follow(self, replica: Replica) -> None:
        from ..deployments.status import StatusProbe, deployment_why

        assert replica.dep is not None
        if replica.probe is None:
            replica.probe = StatusProbe(replica.dep)
        try:
            statuses: list[ReplicaStatus] = await asyncio.to_thread(replica.probe)
        except SpeedslurmError as exc:
            replica.why = exc.message
            return
        except OSError as exc:  # its run directory cannot be read now (a stale NFS handle): looked at again later
            replica.why = f"its run directory cannot be read: {exc}"
            return
        if not statuses:
            return
        s = statuses[0]
        alias = replica.alias
        if s.state == "READY" and s.endpoint is not None:
            if replica.state in ("PENDING", "STARTING", "LOADING"):
                await self._ready(replica, s, statuses)
            return
        if s.state in ("PENDING", "STARTING", "LOADING"):
            if replica.state != "DOWN":
                replica.state = s.state
            replica.why = s.why or s.reason if s.state == "PENDING" else s.why
            return
        # FAILED or ENDED (or UNSUBMITTED, which the gateway never makes): it is over.
        served = replica.ready_at is not None
        replica.state, replica.why = s.state, s.why or deployment_why(statuses)
        log.info("%s", _line("replica_ended", alias=alias.name, deployment=replica.name, state=s.state,
                             why=replica.why))
        self.usage.retire(replica.name)
        self._record()
        if s.state == "FAILED":
            # A failed job must not keep nodes busy (its other components, a follower that still runs).
            await self._stop(replica, f"failed: {replica.why}")
            replica.state = "FAILED"
        if replica.successor_for is not None and not served:
            self._successor_lost(alias, replica.successor_for)
            replica.successor_for = None
        if not served and not replica.reattached:
            self._failed_to_start(alias, f"deployment {replica.name} {s.state.lower()}: {replica.why}")
        elif alias.waiters and not alias.serving() and not alias.starting:
            self.decide("wake", alias, f"deployment {replica.name} ended ({replica.why}) with requests waiting")
            self.wake(alias)

    async def _ready(self, replica: Replica, s: ReplicaStatus, statuses: list[ReplicaStatus]) -> None:
        from ..deployments import lifecycle

        assert replica.dep is not None and s.endpoint is not None
        alias = replica.alias
        ep = s.endpoint
        replica.url, replica.api_key = ep.url.rstrip("/"), ep.api_key
        replica.slots = alias.spec.slots or max(1, ep.parallel)
        replica.nodes = 1 + len(ep.follower_nodes)
        replica.state, replica.why = "READY", ""
        replica.ready_at = replica.last_used = time.monotonic()
        alias.failure = None
        alias.failed_starts = 0
        log.info("%s", _line("replica_ready", alias=alias.name, deployment=replica.name, url=replica.url,
                             slots=replica.slots, after_s=round(replica.ready_at - replica.born, 1)))
        # The replica this one succeeds takes no new request now; it is stopped once its last request is done.
        old, replica.successor_for = replica.successor_for, None
        if old is not None:
            with_removed(alias.handing, old)
            if old is not replica and old in alias.live() and not old.draining:
                self._drain(old, "handed over", successor=replica.name)
        self._hand_out(alias)
        try:
            await asyncio.to_thread(lifecycle.record_warm, self.deploy_settings, replica.dep, statuses)
        except Exception as exc:  # noqa: BLE001 - the warm-cache note is a hint; the replica serves without it
            log.info("%s", _line("warm_record_failed", deployment=replica.name, why=repr(exc)))
        try:
            left = await asyncio.to_thread(lifecycle.time_left, replica.dep)
        except Exception:  # noqa: BLE001 - unknown: no handover planned, as for a job without a limit
            left = None
        if left is not None:
            _before, margin = lifecycle.handover_window(self.deploy_settings, replica.dep.info,
                                                        self.gateway.handover_before_s)
            replica.ends_at = time.monotonic() + left - margin

    def _drain(self, replica: Replica, why: str, **figures: tp.Any) -> None:
        replica.draining = why
        with_removed(replica.alias.handing, replica)  # whatever the reason, it waits for no successor now
        self.decide("drain", replica.alias, why, deployment=replica.name, in_flight=replica.in_flight, **figures)
        if replica.in_flight == 0:
            self._spawn(self._stop(replica, why))

    async def _probe(self, replica: Replica) -> None:
        import aiohttp

        assert self.session is not None
        ok = False
        try:
            async with self.session.get(replica.url + "/health",
                                        headers={"Authorization": f"Bearer {replica.api_key}"},
                                        timeout=aiohttp.ClientTimeout(total=5)) as resp:
                ok = resp.status < 500  # 503: llama-server loads its model again
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            ok = False
        if ok:
            replica.state, replica.why = "READY", ""
            log.info("%s", _line("replica_back", alias=replica.alias.name, replica=replica.name))
            self._hand_out(replica.alias)
        else:
            replica.probe_wait = min(PROBE_MOST_S, replica.probe_wait * 2)
            replica.probe_next = time.monotonic() + replica.probe_wait

    # ------------------------------------------------------------------------------------------ elasticity

    def _handover(self, alias: Alias, now: float) -> None:
        """A replica whose time limit nears gets a successor; once that is ready it drains (see :meth:`_ready`).
        Its servers may stop at ``ends_at``: from then on it takes nothing, whether a successor serves or not."""
        for r in alias.live():
            if r.ends_at is None or r.state != "READY" or r.draining:
                continue
            if now >= r.ends_at:
                self._drain(r, "time limit", ends_in_s=0)
                continue
            before, _margin = self._window(r)
            if before > 0 and not r.successor and now >= r.ends_at - before:
                alias.handing.append(r)
                if not self.wake(alias, 1, succeeds=r):
                    with_removed(alias.handing, r)  # no room now: tried again on the next look
                    continue
                r.successor = True
                self.decide("handover", alias, "its job's time limit nears", deployment=r.name,
                            ends_in_s=round(r.ends_at - now), before_s=before)

    def _window(self, replica: Replica) -> tuple[float, float]:
        from ..deployments.lifecycle import handover_window

        assert replica.dep is not None
        return handover_window(self.deploy_settings, replica.dep.info, self.gateway.handover_before_s)

    async def _scale_up(self, alias: Alias, now: float) -> None:
        g = self.gateway
        queued, oldest = len(alias.waiters), alias.oldest_wait(now)
        if queued < g.scale_up_queue or oldest < g.scale_up_wait_s or not alias.serving():
            alias.pressure_since = None
            return
        if alias.pressure_since is None:
            alias.pressure_since = now
        held = now - alias.pressure_since
        if held < g.scale_up_after_s or alias.spec.is_url or alias.starting:
            return
        if alias.failed_starts:
            # Replicas failed to start: each new try waits twice as long (a bad node, a model that does not fit).
            backoff = min(SCALE_UP_BACKOFF_MOST_S, max(1.0, g.scale_up_after_s) * 2 ** min(alias.failed_starts, 20))
            if held < backoff:
                return
        if any(r.state != "READY" for r in alias.serving()):
            return  # one replica is on its way already
        if len(alias.serving()) >= alias.spec.max_replicas:
            return
        figures: dict[str, tp.Any] = {"queue": queued, "oldest_wait_s": round(oldest, 1), "held_s": round(held, 1),
                   "replicas": len(alias.serving())}
        if not g.queue_replicas:
            from ..deployments import lifecycle

            try:
                idle = await asyncio.to_thread(lifecycle.idle_nodes, self.deploy_settings)
            except SpeedslurmError:
                idle = 0
            need = alias.spec.nodes or max((r.nodes for r in alias.replicas), default=1)
            if idle is not None and idle < need:
                self.decide("no_scale_up", alias, "the partition has too few idle nodes (gateway.queue_replicas "
                            "is off); looking again in 30 s", idle_nodes=idle, nodes_needed=need, **figures)
                alias.pressure_since = now - g.scale_up_after_s + 30
                return
            figures["idle_nodes"] = idle
        self.decide("scale_up", alias, "requests keep waiting for a slot", **figures)
        alias.pressure_since = None
        self.wake(alias, 1)

    def _scale_down(self, alias: Alias, now: float) -> None:
        """Drain one replica when, over ``gateway.scale_down_after_s``, the busiest moment needed at most
        ``gateway.scale_down_use`` of the slots the other replicas have."""
        g = self.gateway
        busy = sum(r.in_flight for r in alias.live()) + len(alias.waiters)
        alias.busiest.append((now, busy))
        while alias.busiest and alias.busiest[0][0] < now - g.scale_down_after_s:
            alias.busiest.popleft()
        ready = [r for r in alias.serving() if r.state == "READY" and r.dep is not None]
        if len(ready) <= max(1, alias.spec.min_replicas) or alias.starting:
            return
        youngest = max(r.ready_at or now for r in ready)
        if now - youngest < g.scale_down_after_s:
            return  # the newest replica has not served a whole window yet
        peak = max(b for _t, b in alias.busiest)
        victim = min(ready, key=lambda r: (r.in_flight, -(r.ready_at or 0)))
        others = sum(r.slots for r in ready if r is not victim)
        if peak <= g.scale_down_use * others:
            alias.busiest.clear()
            self._drain(victim, "scaled down", peak_busy=peak, other_slots=others,
                        window_s=g.scale_down_after_s)

    def _idle(self, alias: Alias, now: float) -> None:
        idle_s = alias.spec.idle_timeout_s
        if not idle_s or alias.spec.is_url:
            return
        serving = alias.serving()
        for replica in sorted(serving, key=lambda r: r.last_used):
            if len(serving) <= alias.spec.min_replicas:
                return
            # A replica still queued in Slurm that nobody waits for is not needed either.
            old = replica.successor_for
            if old is not None and old in alias.live() and not old.draining:
                continue  # started to take over from a replica near its time limit: needed once ready
            replica.successor_for = None
            if replica.state in ("READY", "PENDING") and replica.in_flight == 0 and not alias.waiters \
                    and now - replica.last_used >= idle_s:
                self._drain(replica, "idle", idle_s=round(now - replica.last_used))
                serving = [r for r in serving if r is not replica]

    # ------------------------------------------------------------------------------------------ the end

    async def close(self, stop: bool) -> list[str]:
        """The gateway exits: waiting requests get 503; with ``stop``, every live deployment is cancelled and
        the record emptied, else they are left running (the next start re-attaches). Returns the ids stopped."""
        self.closing = True
        for alias in self.aliases.values():
            self._fail_waiters(alias, "the gateway is shutting down")
        pending = [t for t in self._tasks if not t.done()]
        if pending:  # submissions and cancels under way: together, not one after the other
            await asyncio.wait(pending, timeout=CLOSE_TASKS_S)
        stopped = []
        if stop:
            replicas = [r for a in self.aliases.values() for r in a.replicas
                        if r.dep is not None and ((r.state in LIVE and not r.stopping) or r.cancel_pending)]
            done = await asyncio.gather(*(self._stop(r, "the gateway stopped") for r in replicas))
            stopped = [r.name for r, ok in zip(replicas, done, strict=True) if ok]
            self.not_stopped = [r.name for r, ok in zip(replicas, done, strict=True) if not ok]
        return stopped

    def gauges(self) -> dict[str, tp.Any]:
        replicas: dict[tuple[str, str], int] = {}
        for alias in self.aliases.values():
            for r in alias.replicas:
                if r.state in LIVE and not r.stopping:
                    state = "draining" if r.draining else r.state.lower()
                    replicas[(alias.name, state)] = replicas.get((alias.name, state), 0) + 1
        return {"queue": {a.name: len(a.waiters) for a in self.aliases.values()},
                "in_flight": {a.name: sum(r.in_flight for r in a.replicas) for a in self.aliases.values()},
                "replicas": replicas}


def with_removed(queue: collections.deque[tp.Any], item: tp.Any) -> None:
    try:
        queue.remove(item)
    except ValueError:
        pass


def _line(event: str, **fields: tp.Any) -> str:
    import json

    return json.dumps({"event": event, **fields}, default=str)
