"""The gateway's pool of replicas with fake deployments: their states come from a table the test sets, submission
and cancel are stand-ins, and the pool's watcher is driven one look (``tick``) at a time. What a lab would see:
nodes never forgotten when a cancel fails, no queue stranded beside a free slot, a restart that finds a deployment
ended, replicas that keep failing to start, successors before a time limit, a dead URL backend, and the counts
after a restart."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
import types
import typing as tp

import pytest

from speedslurm.deployments import lifecycle
from speedslurm.deployments import status as status_mod
from speedslurm.deployments.status import ReplicaStatus
from speedslurm.errors import SpeedslurmError
from speedslurm.gateway.metrics import Usage, prometheus
from speedslurm.gateway.pool import Pool, Replica, Unavailable, Waiter, alias_specs
from speedslurm.gateway.state import Folder

_ids = itertools.count(1)
STATES: dict[str, tp.Any] = {}  # deployment id -> the state its status probe reports (or the error it raises)


def fake_dep(state: str) -> types.SimpleNamespace:
    ident = f"dep{next(_ids)}"
    STATES[ident] = state
    return types.SimpleNamespace(id=ident, info={"nodes": 1}, job_ids=[ident + "-job"])


class FakeProbe:
    def __init__(self, dep: tp.Any) -> None:
        self.dep = dep

    def __call__(self) -> list[ReplicaStatus]:
        st = STATES[self.dep.id]
        if isinstance(st, Exception):
            raise st
        ep = types.SimpleNamespace(url="http://127.0.0.1:9", api_key="", parallel=1, follower_nodes=[])
        return [ReplicaStatus(0, st, self.dep.job_ids[0], why=f"fake {st.lower()}",
                              endpoint=ep if st == "READY" else None)]


@pytest.fixture
def downs(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str | None]]:
    """Deployments cancelled (id, why); status, idle nodes, warm-cache note and time left stood in for."""
    cancelled: list[tuple[str, str | None]] = []
    monkeypatch.setattr(status_mod, "StatusProbe", FakeProbe)
    monkeypatch.setattr(lifecycle, "down", lambda dep, before=None, because=None: cancelled.append((dep.id, because)))
    monkeypatch.setattr(lifecycle, "idle_nodes", lambda settings: 10)
    monkeypatch.setattr(lifecycle, "record_warm", lambda *a: None)
    monkeypatch.setattr(lifecycle, "time_left", lambda dep: None)
    return cancelled


def make_pool(s: tp.Any, model: str = "x=tinymodel") -> Pool:
    return Pool(s, alias_specs(s, [model]), Folder(s.gateway.root).open(), Usage())


def ready_replica(pool: Pool, slots: int = 1) -> Replica:
    alias = pool.aliases["x"]
    r = Replica(alias, fake_dep("READY"))  # type: ignore[arg-type]
    r.state, r.ready_at, r.slots, r.url = "READY", time.monotonic(), slots, "http://127.0.0.1:9"
    alias.replicas.append(r)
    return r


def near_its_limit(s: tp.Any) -> tuple[Pool, Replica, tp.Any]:
    """A pool with one ready replica inside its handover window, and the deployment its successor will be
    (waiting in Slurm: PENDING)."""
    pool = make_pool(s)
    pool._window = lambda r: (100.0, 30.0)  # type: ignore[method-assign]
    old = ready_replica(pool)
    old.ends_at = time.monotonic() + 50
    succ = fake_dep("PENDING")
    pool._submit = lambda spec: succ  # type: ignore[assignment,return-value]
    return pool, old, succ


def cancel_fails_once(monkeypatch: pytest.MonkeyPatch, downs: list[tp.Any]) -> list[str]:
    """scancel fails the first time (slurmctld busy), then cancels (into ``downs``); returns the tries."""
    tries: list[str] = []

    def down(dep: tp.Any, before: tp.Any = None, because: tp.Any = None) -> None:
        tries.append(dep.id)
        if len(tries) == 1:
            raise SpeedslurmError("scancel: Socket timed out on send/recv operation")
        downs.append((dep.id, because))

    monkeypatch.setattr(lifecycle, "down", down)
    return tries


async def looks(pool: Pool, n: int, between: float = 0.02) -> None:
    for _ in range(n):
        await pool.tick()
        await asyncio.sleep(between)


def test_a_cancel_that_fails_keeps_the_deployment_recorded_and_is_tried_again(
        gsettings: tp.Any, downs: list[tp.Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """scancel fails (slurmctld busy): the replica is not forgotten while its job may still hold nodes: it stays
    in deployments.json (a restart re-attaches it), takes no request, and the cancel is tried again later."""
    s = gsettings()
    tries = cancel_fails_once(monkeypatch, downs)

    async def main() -> None:
        pool = make_pool(s)
        r = ready_replica(pool)
        pool._record()
        pool._drain(r, "idle")
        await looks(pool, 5)
        assert len(tries) == 1 and r.state == "READY" and r.free == 0
        assert json.loads((s.gateway.root / "deployments.json").read_text()) == {"aliases": {"x": [r.name]}, "successors": {}}
        r.stop_next = time.monotonic()  # the backoff is over
        await looks(pool, 3)
        assert downs == [(r.name, "idle")] and r.state == "ENDED"
        assert json.loads((s.gateway.root / "deployments.json").read_text()) == {"aliases": {}, "successors": {}}

    asyncio.run(main())


def test_the_gateway_does_not_say_it_stopped_a_deployment_whose_cancel_failed(
        gsettings: tp.Any, downs: list[tp.Any], monkeypatch: pytest.MonkeyPatch) -> None:
    s = gsettings()

    def down(dep: tp.Any, before: tp.Any = None, because: tp.Any = None) -> None:
        raise SpeedslurmError("scancel: Socket timed out on send/recv operation")

    monkeypatch.setattr(lifecycle, "down", down)

    async def main() -> None:
        pool = make_pool(s)
        r = ready_replica(pool)
        assert await pool.close(stop=True) == []
        assert json.loads((s.gateway.root / "deployments.json").read_text()) == {"aliases": {"x": [r.name]}, "successors": {}}

    asyncio.run(main())


def test_a_replica_ready_while_its_warm_note_fails_still_takes_the_waiting_requests(
        gsettings: tp.Any, downs: list[tp.Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """Writing the warm-cache note fails (a full home): the replica serves all the same, and the requests that
    waited for it, and the next ones, get its slot."""
    s = gsettings()

    def record_warm(*a: tp.Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(lifecycle, "record_warm", record_warm)

    async def main() -> list[tp.Any]:
        pool = make_pool(s)
        alias = pool.aliases["x"]
        dep = fake_dep("PENDING")
        pool._submit = lambda spec: dep  # type: ignore[assignment,return-value]
        first = asyncio.ensure_future(pool.acquire(alias, timeout=30))
        while not alias.replicas:
            await asyncio.sleep(0.01)
        STATES[dep.id] = "READY"
        await looks(pool, 2)
        got = await first
        pool.release(got)
        second = await pool.acquire(alias, timeout=30)
        return [got, second]

    assert all(isinstance(x, Replica) for x in asyncio.run(main()))


def test_a_reattached_deployment_that_ended_meanwhile_does_not_fail_the_alias(
        gsettings: tp.Any, downs: list[tp.Any]) -> None:
    """The job reached its time limit while the gateway was down: on restart the alias is cold, not failed, and
    the next request starts a new deployment."""
    s = gsettings()

    async def main() -> None:
        pool = make_pool(s)
        alias = pool.aliases["x"]
        r = Replica(alias, fake_dep("ENDED"))  # type: ignore[arg-type]
        r.reattached = True
        alias.replicas.append(r)
        await pool._follow(r)
        assert alias.state() == "cold" and alias.failure is None
        new = fake_dep("READY")
        pool._submit = lambda spec: new  # type: ignore[assignment,return-value]
        waiting = asyncio.ensure_future(pool.acquire(alias, timeout=30))
        while len(alias.replicas) < 2:
            await asyncio.sleep(0.01)
        await looks(pool, 2)
        assert (await waiting).name == new.id

    asyncio.run(main())


def test_scale_up_backs_off_while_new_replicas_fail_to_start(gsettings: tp.Any, downs: list[tp.Any]) -> None:
    """Requests keep queueing but each replica added fails (a bad node): one more is tried only after a wait
    that doubles, not one per look."""
    s = gsettings("gateway.scale_up_after_s=0", "gateway.scale_up_wait_s=0", "gateway.max_replicas=3")
    submitted: list[str] = []

    async def main() -> None:
        pool = make_pool(s)
        alias = pool.aliases["x"]
        r = ready_replica(pool)
        r.in_flight = 1
        loop = asyncio.get_running_loop()
        for _ in range(3):
            alias.waiters.append(Waiter(loop.create_future()))

        def submit(spec: tp.Any) -> tp.Any:
            dep = fake_dep("FAILED")
            submitted.append(dep.id)
            return dep

        pool._submit = submit  # type: ignore[assignment]
        await looks(pool, 25)
        for w in alias.waiters:
            w.future.cancel()
        assert len(submitted) == 1 and alias.failed_starts == 1, (submitted, alias.failed_starts)
        assert alias.state() == "ready"  # the replica that serves goes on serving

    asyncio.run(main())


def test_two_replicas_near_their_time_limit_get_a_successor_each(gsettings: tp.Any, downs: list[tp.Any]) -> None:
    s = gsettings("gateway.max_replicas=2", "gateway.min_replicas=2", "gateway.idle_timeout=0")
    submitted: list[str] = []

    async def main() -> None:
        pool = make_pool(s)
        pool._window = lambda r: (100.0, 30.0)  # type: ignore[method-assign]
        a, b = ready_replica(pool), ready_replica(pool)
        a.ends_at = b.ends_at = time.monotonic() + 50  # both inside the handover window

        def submit(spec: tp.Any) -> tp.Any:
            dep = fake_dep("PENDING")
            submitted.append(dep.id)
            return dep

        pool._submit = submit  # type: ignore[assignment]
        await looks(pool, 10)
        assert len(submitted) == 2 and a.successor and b.successor
        for dep_id in submitted:
            STATES[dep_id] = "READY"
        await looks(pool, 5)
        assert sorted(d for d, why in downs if why == "handed over") == sorted([a.name, b.name]), downs

    asyncio.run(main())


def test_a_successor_waiting_in_slurm_is_not_stopped_as_idle(gsettings: tp.Any, downs: list[tp.Any]) -> None:
    """The successor waits in Slurm's queue longer than the idle timeout while the old replica serves on: it is
    kept, and drains the old one once it is ready."""
    s = gsettings("gateway.idle_timeout=1s")

    async def main() -> None:
        pool, old, succ = near_its_limit(s)
        deadline = time.monotonic() + 1.5  # past the idle timeout of the successor
        while time.monotonic() < deadline:
            old.last_used = time.monotonic()  # the old replica keeps serving
            await looks(pool, 1, 0.05)
        assert downs == [], downs
        STATES[succ.id] = "READY"
        await looks(pool, 3)
        assert downs == [(old.name, "handed over")], downs

    asyncio.run(main())


def test_a_url_backend_down_for_a_while_answers_at_once(gsettings: tp.Any, downs: list[tp.Any]) -> None:
    """Every server of a URL alias stopped answering long ago: a request gets 503 at once with the reason and
    when the gateway looks again, not after gateway.max_wait_s; the alias's state says "down"."""
    s = gsettings("gateway.max_wait_s=600")

    async def main() -> None:
        pool = make_pool(s, "x=http://127.0.0.1:9")
        pool.add_urls()
        alias = pool.aliases["x"]
        [r] = alias.replicas
        pool.lost(r, "connection refused")
        r.down_since -= 60
        assert alias.state() == "down"
        t0 = time.monotonic()
        with pytest.raises(Unavailable) as err:
            await pool.acquire(alias)
        assert time.monotonic() - t0 < 60  # far less than max_wait_s: it did not wait
        assert err.value.status == 503 and "server http://127.0.0.1:9 is DOWN (connection refused)" in \
            err.value.reason and err.value.retry_after, err.value.reason

    asyncio.run(main())


def test_counts_by_status_and_the_histograms_go_on_across_a_restart() -> None:
    u = Usage()
    u.count("x", "alice", 200, 3, 5, wait_s=0.2, latency_s=1.5, replica="dep1")
    u.count("x", "alice", 502, wait_s=3.0, latency_s=4.0)
    again = Usage.load(json.loads(json.dumps(u.to_json())))
    text = prometheus(again, {"queue": {}, "in_flight": {}, "replicas": {}})
    assert 'speedslurm_gateway_requests_total{alias="x",key="alice",code="200"} 1' in text, text
    assert 'speedslurm_gateway_requests_total{alias="x",key="alice",code="502"} 1' in text, text
    assert prometheus(u, {"queue": {}, "in_flight": {}, "replicas": {}}) == text


def test_a_successor_whose_submission_fails_is_tried_again(gsettings: tp.Any, downs: list[tp.Any]) -> None:
    """sbatch times out once while a replica's time limit nears: another successor is submitted, not none."""
    s = gsettings("gateway.idle_timeout=0")
    tries: list[int] = []

    async def main() -> None:
        pool = make_pool(s)
        pool._window = lambda r: (100.0, 30.0)  # type: ignore[method-assign]
        old = ready_replica(pool)
        old.ends_at = time.monotonic() + 50

        def submit(spec: tp.Any) -> tp.Any:
            tries.append(1)
            if len(tries) == 1:
                raise SpeedslurmError("sbatch: Socket timed out on send/recv operation")
            return fake_dep("PENDING")

        pool._submit = submit  # type: ignore[assignment]
        await looks(pool, 10)
        assert len(tries) == 2 and old.successor
        assert [r.successor_for for r in pool.aliases["x"].replicas if r is not old] == [old]

    asyncio.run(main())


def test_a_failed_deployment_whose_cancel_fails_stays_recorded_and_is_cancelled_later(
        gsettings: tp.Any, downs: list[tp.Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """A job that failed may keep a follower on its nodes: when scancel fails, it stays in deployments.json and
    is cancelled once scancel answers."""
    s = gsettings()
    tries = cancel_fails_once(monkeypatch, downs)

    async def main() -> None:
        pool = make_pool(s)
        r = ready_replica(pool)
        pool._record()
        STATES[r.name] = "FAILED"
        await looks(pool, 3)
        assert tries == [r.name] and r.state == "FAILED"
        assert json.loads((s.gateway.root / "deployments.json").read_text()) == {"aliases": {"x": [r.name]}, "successors": {}}
        r.stop_next = time.monotonic()
        await looks(pool, 3)
        assert len(downs) == 1 and downs[0][0] == r.name
        assert json.loads((s.gateway.root / "deployments.json").read_text()) == {"aliases": {}, "successors": {}}

    asyncio.run(main())


def test_the_successor_of_a_replica_stopped_as_idle_is_stopped_as_idle_too(
        gsettings: tp.Any, downs: list[tp.Any]) -> None:
    """Night falls during a handover: the old replica is stopped as idle, and its successor, still waiting in
    Slurm, succeeds nothing any more: it is stopped as idle too instead of holding nodes for nobody."""
    s = gsettings("gateway.idle_timeout=1s")

    async def main() -> None:
        pool, old, succ = near_its_limit(s)
        await looks(pool, 3)
        deadline = time.monotonic() + 10
        while len(downs) < 2 and time.monotonic() < deadline:  # nobody asks: both pass the idle timeout
            await looks(pool, 1, 0.05)
        assert sorted(downs) == sorted([(old.name, "idle"), (succ.id, "idle")]), downs

    asyncio.run(main())


def test_a_gateway_restarted_during_a_handover_goes_on_with_it(gsettings: tp.Any, downs: list[tp.Any],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Restarted while a successor waits in Slurm: the new gateway knows which deployment it succeeds, starts no
    second successor, and drains the old one once the successor is ready."""
    from speedslurm.deployments import record as record_mod

    s = gsettings("gateway.idle_timeout=0")
    submitted: list[str] = []

    async def main() -> None:
        pool, old, succ = near_its_limit(s)
        await looks(pool, 3)
        assert pool.aliases["x"].replicas[-1].dep is succ and old.successor  # the handover has begun
        saved = json.loads((s.gateway.root / "deployments.json").read_text())
        assert saved["successors"] == {succ.id: old.name}, saved

        # The gateway is killed and started again: it finds both deployments running.
        deps = {old.name: old.dep, succ.id: succ}
        monkeypatch.setattr(record_mod, "find_deployment", lambda settings, ident: deps[ident])
        monkeypatch.setattr(lifecycle, "time_left", lambda dep: 80.0 if dep is old.dep else None)
        monkeypatch.setattr(lifecycle, "handover_window", lambda *a: (100.0, 30.0))  # so it is inside its window
        again = make_pool(s)
        again._window = lambda r: (100.0, 30.0)  # type: ignore[method-assign]

        def submit(spec: tp.Any) -> tp.Any:
            dep = fake_dep("PENDING")
            submitted.append(dep.id)
            return dep

        again._submit = submit  # type: ignore[assignment]
        assert sorted(again.attach()) == sorted(deps)
        await looks(again, 5)
        assert submitted == [] and downs == [], (submitted, downs)  # the old one serves, no second successor
        STATES[succ.id] = "READY"
        await looks(again, 5)
        assert submitted == [] and downs == [(old.name, "handed over")], (submitted, downs)

    asyncio.run(main())


def test_a_replica_whose_look_fails_does_not_stop_the_look_at_the_others(
        gsettings: tp.Any, downs: list[tp.Any], caplog: pytest.LogCaptureFixture) -> None:
    """One deployment's status cannot be read (a bug, a run directory on a file system that answers errors): the
    watcher goes on with every other replica and alias, and says what failed once, not at every look."""
    s = gsettings("gateway.idle_timeout=1s")

    async def main() -> None:
        pool = Pool(s, alias_specs(s, ["x=tinymodel", "y=tinymodel"]), Folder(s.gateway.root).open(), Usage())
        broken = Replica(pool.aliases["x"], fake_dep("PENDING"))  # type: ignore[arg-type]
        STATES[broken.name] = RuntimeError("a bug in the status of one deployment")
        stale = Replica(pool.aliases["x"], fake_dep("PENDING"))  # type: ignore[arg-type]
        STATES[stale.name] = OSError(116, "Stale file handle")
        pool.aliases["x"].replicas += [broken, stale]
        idle = Replica(pool.aliases["y"], fake_dep("READY"))  # type: ignore[arg-type]
        idle.state, idle.slots, idle.url = "READY", 1, "http://127.0.0.1:9"
        idle.last_used = time.monotonic() - 7200  # idle for two hours
        pool.aliases["y"].replicas.append(idle)
        await looks(pool, 5)
        assert (idle.name, "idle") in downs, downs
        assert "Stale file handle" in stale.why
        logged = [r for r in caplog.records if "a bug in the status" in r.getMessage()]
        assert len(logged) == 1, [r.getMessage() for r in caplog.records]

    asyncio.run(main())


def test_replicas_that_may_hold_nodes_are_never_forgotten(gsettings: tp.Any, downs: list[tp.Any],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed deployment whose cancel failed, unused for hours, stays (its job may hold nodes) and is cancelled
    again; a live replica stays however many ended ones came after it."""
    s = gsettings("gateway.idle_timeout=0")
    tries = cancel_fails_once(monkeypatch, downs)

    async def main() -> None:
        pool = make_pool(s)
        alias = pool.aliases["x"]
        live = ready_replica(pool)
        live.last_used = time.monotonic() - 7200
        failed = Replica(alias, fake_dep("FAILED"))  # type: ignore[arg-type]
        failed.state, failed.cancel_pending, failed.draining = "FAILED", True, "failed: fake failed"
        failed.last_used = time.monotonic() - 7200
        alias.replicas.append(failed)
        for _ in range(60):  # ended within the hour
            r = Replica(alias, fake_dep("ENDED"))  # type: ignore[arg-type]
            r.state = "ENDED"
            alias.replicas.append(r)
        await looks(pool, 2)
        assert tries == [failed.name] and downs == [], downs  # the first cancel failed
        failed.stop_next = 0.0  # its retry is due
        await looks(pool, 2)
        assert live in alias.replicas and downs == [(failed.name, "failed: fake failed")], downs
        assert len([r for r in alias.replicas if r.state == "ENDED"]) == 50

    asyncio.run(main())


def test_a_replica_unreachable_for_minutes_is_stopped_and_replaced(gsettings: tp.Any, downs: list[tp.Any]) -> None:
    """Slurm says the job runs, but its servers have not answered for DOWN_REPLACE_S: it is stopped (its nodes
    serve nobody) and, as a request waits, a new deployment is started."""
    from speedslurm.gateway import pool as pool_mod

    s = gsettings("gateway.idle_timeout=0")
    submitted: list[str] = []

    async def main() -> None:
        pool = make_pool(s)
        r = ready_replica(pool)
        pool.session = types.SimpleNamespace()  # type: ignore[assignment]
        pool.lost(r, "connection refused")
        r.down_since = time.monotonic() - pool_mod.DOWN_REPLACE_S - 1
        r.probe_next = time.monotonic() + 3600  # not probed again within the test

        def submit(spec: tp.Any) -> tp.Any:
            dep = fake_dep("PENDING")
            submitted.append(dep.id)
            return dep

        pool._submit = submit  # type: ignore[assignment]
        waiting = asyncio.ensure_future(pool.acquire(pool.aliases["x"], timeout=60))
        await looks(pool, 3)
        assert downs and downs[0][0] == r.name and downs[0][1].startswith("unreachable for "), downs
        assert len(submitted) == 1, submitted
        STATES[submitted[0]] = "READY"
        await looks(pool, 3)
        got = await asyncio.wait_for(waiting, 10)
        assert got.name == submitted[0]

    asyncio.run(main())


def test_the_exit_waits_for_the_tasks_under_way_together(gsettings: tp.Any, downs: list[tp.Any],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Three submissions that never come back (a controller that does not answer): the exit waits for them
    once, CLOSE_TASKS_S in all, not that long for each in turn."""
    from speedslurm.gateway import pool as pool_mod

    s = gsettings()
    monkeypatch.setattr(pool_mod, "CLOSE_TASKS_S", 0.2)

    async def main() -> float:
        pool = make_pool(s)
        never = asyncio.Event()
        for _ in range(3):
            pool._spawn(never.wait())
        start = time.monotonic()
        await asyncio.wait_for(pool.close(stop=True), 30)  # a guard against a hang only
        return time.monotonic() - start

    asyncio.run(main())


def test_a_request_that_ends_after_its_replica_ended_adds_no_replica_to_the_usage() -> None:
    """A stream that finishes after its deployment was stopped: its tokens count for its key, and no entry of the
    ended replica comes back (a gateway that runs for weeks would keep one per ended deployment)."""
    usage = Usage()
    usage.hold("x", "dep-a", 100.0)
    usage.count("x", "ann", 200, 10, 20, replica="dep-a")
    usage.retire("dep-a")
    usage.count("x", "ann", 200, 5, 5, replica="dep-a")  # the last stream of dep-a ends now
    assert usage.replicas == {}
    assert usage.by[("x", "ann")]["completion_tokens"] == 25
    assert usage.key_node_hours() == {"ann": round(100.0 / 3600, 6)}  # all of dep-a, shared once
