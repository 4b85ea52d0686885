"""``speedslurm gateway`` on the real test bed: real Slurm jobs of 2 nodes per replica, real llama.cpp, the real
``openai`` client, the gateway as its own process (``python -m speedslurm gateway``) as a user runs it.

* a cold alias starts its deployment on the first request (a job is submitted then, not before), answers plain
  and streamed requests, refuses a wrong key, counts two users in ``gateway usage`` and ``/metrics``, and SIGTERM
  stops the gateway (exit 0) and cancels its job;
* a gateway killed with SIGKILL and started again on the same folder re-attaches to its running deployment: no
  new job, the same deployment and job, and it answers;
* a follower's rpc-server killed under a load of non-streamed requests on two replicas: the gateway sees the
  replica leave, and every request of the load gets one 200 answer all the same.

Every wait ends on an event (a line on the gateway's stderr, a state in ``gateway status``, a job leaving the
queue), with a guard against a hang only; the load is stopped by the test once the event it waits for happened.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import typing as tp
import urllib.request
from pathlib import Path

import openai
import pytest
from gatewayproc import Gateway
from longbatch import GUARD_S, TOKENS, wait_until

pytestmark = [pytest.mark.slurm, pytest.mark.llama]


class Bed:
    """The test's gateway folder, run folder and CLI, and every gateway it started (killed at the end)."""

    def __init__(self, tmp: Path, tiny_gguf: Path) -> None:
        self.runs = tmp / "runs"
        self.folder = tmp / "gw"
        self.model = tiny_gguf
        self.env = {**os.environ, "SPEEDSLURM_PROFILE": "testbed", "SPEEDSLURM_RUN__DIR": str(self.runs),
                    "SPEEDSLURM_GATEWAY__DIR": str(self.folder)}
        self.env.pop("OPENAI_API_KEY", None)
        self.gateways: list[Gateway] = []

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        res = subprocess.run([sys.executable, "-m", "speedslurm", *args], env=self.env, capture_output=True,
                             text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        assert res.returncode == 0, f"speedslurm {' '.join(args)} exited {res.returncode}\n{res.stdout}\n{res.stderr}"
        return res

    def add_key(self, name: str) -> str:
        return self.cli("gateway", "keys", "add", name).stdout.strip()

    def start(self, *settings: str) -> Gateway:
        sets = [a for s in ("gateway.models.tiny.nodes=2", "gateway.idle_timeout=0", *settings) for a in ("--set", s)]
        g = Gateway(self.env, [*sets, "gateway", "--listen", "127.0.0.1:0", "--model", f"tiny={self.model}"])
        self.gateways.append(g)
        return g

    def status(self) -> dict[str, tp.Any]:
        return tp.cast("dict[str, tp.Any]", json.loads(self.cli("gateway", "status", "--json").stdout))

    def deployments(self) -> list[dict[str, tp.Any]]:
        """The alias's deployments as ``gateway status`` shows them."""
        [alias] = self.status()["aliases"]
        return tp.cast("list[dict[str, tp.Any]]", alias["deployments"])

    def all_deployments(self) -> list[dict[str, tp.Any]]:
        """Every deployment under the run folder, as ``speedslurm status --json`` shows them."""
        return tp.cast("list[dict[str, tp.Any]]", json.loads(self.cli("status", "--json").stdout))

    def close(self) -> None:
        for g in self.gateways:
            g.kill()
        jobs = set()
        for info in self.runs.glob("*/deployment.json") if self.runs.is_dir() else []:
            data = json.loads(info.read_text())
            jobs.update(str(j).split("_")[0].split("+")[0] for j in data.get("job_ids", []))
        if jobs:
            subprocess.run(["scancel", *sorted(jobs)], capture_output=True, timeout=60)


@pytest.fixture
def bed(testbed: tp.Any, llama_bins: tp.Any, shared_tmp: Path, tiny_gguf: Path) -> tp.Iterator[Bed]:
    b = Bed(shared_tmp, tiny_gguf)
    try:
        yield b
    finally:
        b.close()


def client(g: Gateway, key: str, timeout: float = 300) -> openai.OpenAI:
    return openai.OpenAI(base_url=g.url + "/v1", api_key=key, max_retries=0, timeout=timeout)


def chat(g: Gateway, key: str, text: str = "Say hi", **kw: tp.Any) -> tp.Any:
    return client(g, key).chat.completions.create(model="tiny", messages=[{"role": "user", "content": text}], **kw)


def queued(job_ids: tp.Iterable[str]) -> list[str]:
    """The lines squeue still has for these jobs (pending, running, completing)."""
    ids = sorted({j.split("_")[0].split("+")[0] for j in job_ids})
    out = subprocess.run(["squeue", "-h", "-j", ",".join(ids), "-o", "%i %T"], capture_output=True, text=True,
                         timeout=30).stdout
    return out.split("\n")[:-1] if out.strip() else []


def my_jobs(runs: Path) -> set[str]:
    """Ids of the jobs recorded under the run folder (each deployment's deployment.json)."""
    ids = set()
    for info in runs.glob("*/deployment.json") if runs.is_dir() else []:
        ids.update(str(j) for j in json.loads(info.read_text()).get("job_ids", []))
    return ids


def metrics(g: Gateway, key: str) -> str:
    req = urllib.request.Request(g.url + "/metrics", headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310 - the test's own gateway
        return tp.cast(str, resp.read().decode())


# ------------------------------------------------------------------------------------------ a: a cold alias


def test_a_cold_alias_starts_a_job_on_its_first_request_and_sigterm_cancels_it(bed: Bed) -> None:
    alice, bob = bed.add_key("alice"), bed.add_key("bob")
    g = bed.start()
    [model] = client(g, alice).models.list().data
    assert model.id == "tiny" and model.model_extra["state"] == "cold"  # type: ignore[index]
    assert bed.deployments() == [] and bed.all_deployments() == [] and my_jobs(bed.runs) == set()

    t0 = time.monotonic()
    answer = chat(g, alice, max_tokens=8)
    print(f"cold alias -> first answer: {time.monotonic() - t0:.1f}s")
    assert answer.choices and answer.usage is not None and answer.usage.completion_tokens > 0
    # The first request submitted a Slurm job of 2 nodes, which serves.
    [dep] = bed.deployments()
    assert dep["state"] == "READY" and dep["job_ids"], dep
    assert [d["id"] for d in bed.all_deployments()] == [dep["deployment"]]
    assert queued(dep["job_ids"]) and all(line.endswith(" RUNNING") for line in queued(dep["job_ids"]))
    [status] = json.loads(bed.cli("status", dep["deployment"], "--json").stdout)
    assert status["state"] == "READY"
    assert len(status["replicas"][0]["endpoint"]["follower_nodes"]) == 1

    # A streamed answer comes in several chunks (ignore_eos: never shorter than max_tokens).
    stream = chat(g, alice, "Count to ten", max_tokens=8, stream=True, extra_body={"ignore_eos": True})
    chunks = [c for c in stream if c.choices and c.choices[0].delta.content]
    assert len(chunks) >= 2, chunks

    with pytest.raises(openai.AuthenticationError):
        chat(g, "ssg-not-a-key", max_tokens=2)
    for _ in range(3):
        assert chat(g, bob, max_tokens=4).choices

    usage = json.loads(bed.cli("gateway", "usage", "--json").stdout)
    assert usage["keys"]["alice"]["requests"] == 2 and usage["keys"]["bob"]["requests"] == 3, usage
    assert usage["keys"]["alice"]["errors"] == 0 and usage["keys"]["bob"]["errors"] == 0, usage
    assert usage["keys"]["bob"]["completion_tokens"] > 0 and usage["unauthorized"] == 1, usage
    text = metrics(g, bob)
    assert 'speedslurm_gateway_requests_total{alias="tiny",key="alice",code="200"} 2' in text, text
    assert 'speedslurm_gateway_requests_total{alias="tiny",key="bob",code="200"} 3' in text, text
    assert bed.deployments()[0]["deployment"] == dep["deployment"]  # every request went to the one deployment
    assert bed.status()["aliases"][0]["state"] == "ready"

    assert g.stop(signal.SIGTERM) == 0, g.output.stderr
    assert "Stopped deployment(s): " + dep["deployment"] in g.output.stderr
    wait_until(f"job {dep['job_ids']} gone from the queue", lambda: not queued(dep["job_ids"]), every=0.5)
    [status] = json.loads(bed.cli("status", dep["deployment"], "--json").stdout)
    assert status["state"] == "ENDED", status
    assert json.loads((bed.folder / "deployments.json").read_text()) == {"aliases": {}, "successors": {}}


# ------------------------------------------------------------------------------------------ b: kill, restart


def test_a_killed_gateway_started_again_reattaches_without_a_new_job(bed: Bed) -> None:
    alice = bed.add_key("alice")
    g = bed.start()
    assert chat(g, alice, max_tokens=4).choices
    [dep] = bed.deployments()
    assert g.stop(signal.SIGKILL) == -signal.SIGKILL
    assert queued(dep["job_ids"])  # its job runs on without the gateway
    jobs = my_jobs(bed.runs)

    again = bed.start()
    assert again.events("gateway_started")[0]["reattached"] == [dep["deployment"]]
    assert chat(again, alice, max_tokens=4).choices
    [now] = bed.deployments()
    assert (now["deployment"], now["job_ids"], now["state"]) == (dep["deployment"], dep["job_ids"], "READY")
    assert now["served"] == 1
    assert my_jobs(bed.runs) == jobs and [d["id"] for d in bed.all_deployments()] == [dep["deployment"]]
    assert json.loads(bed.cli("gateway", "usage", "--json").stdout)["keys"]["alice"]["requests"] >= 1

    assert again.stop(signal.SIGTERM) == 0, again.output.stderr
    wait_until(f"job {dep['job_ids']} gone from the queue", lambda: not queued(dep["job_ids"]), every=0.5)


# ------------------------------------------------------------------------------------------ c: a follower dies


def test_a_follower_killed_under_load_loses_no_request(bed: Bed) -> None:
    """Two replicas of 2 nodes (the bed's 4 nodes); threads send non-streamed requests, each its own id, until
    the gateway has seen the victim replica leave and the other one answered more after that; then every
    request has exactly one answer, a 200."""
    key = bed.add_key("load")
    g = bed.start("gateway.models.tiny.min_replicas=2", "gateway.models.tiny.max_replicas=2",
                  "llama.rpc_cache=false")
    wait_until("two ready replicas", lambda: [d["state"] for d in bed.deployments()] == ["READY", "READY"],
               every=1)
    deps = bed.deployments()
    victim = deps[1]
    run_dir = next(p.parent for p in bed.runs.glob(f"{victim['deployment']}/deployment.json"))
    follower = json.loads(next(run_dir.glob("r0/follower-*.json")).read_text())

    results: dict[str, list[tp.Any]] = {}
    lock = threading.Lock()
    stop = threading.Event()
    counter = iter(range(10**9))

    def load() -> None:
        c = client(g, key)
        while not stop.is_set():
            with lock:
                rid = f"q{next(counter)}"
                results[rid] = []
            try:
                r = c.chat.completions.with_raw_response.create(
                    model="tiny", messages=[{"role": "user", "content": f"Request {rid}"}], max_tokens=TOKENS,
                    extra_body={"ignore_eos": True})
                outcome: tp.Any = (r.http_response.status_code, r.parse().usage.completion_tokens)
            except openai.OpenAIError as exc:
                outcome = repr(exc)
            with lock:
                results[rid].append(outcome)

    def answered() -> int:
        with lock:
            return sum(1 for v in results.values() if v)

    threads = [threading.Thread(target=load, daemon=True) for _ in range(8)]
    for t in threads:
        t.start()
    try:
        # Requests in flight on the victim, then its rpc-server is killed.
        wait_until("requests in flight on both replicas",
                   lambda: all(d["in_flight"] > 0 for d in bed.deployments()), every=0.2)
        before = answered()
        os.kill(int(follower["pid"]), signal.SIGKILL)
        wait_until(f"the gateway sees {victim['deployment']} leave",
                   lambda: next(d for d in bed.deployments() if d["deployment"] == victim["deployment"])["state"]
                   != "READY", every=0.2)
        left = answered()
        # The load goes on on the other replica: more answers after the victim left.
        wait_until("answers after the replica left", lambda: answered() >= left + 16, every=0.2)
    finally:
        stop.set()
        for t in threads:
            t.join(GUARD_S)
    assert not any(t.is_alive() for t in threads)
    bad = {rid: v for rid, v in results.items() if v != [(200, TOKENS)]}
    assert not bad, bad
    print(f"{len(results)} requests, {before} answered before the kill, {left} when the replica left; events: "
          f"{[(e['event'], e.get('why')) for e in g.events('replica_down') + g.events('replica_ended')]}")
    states = {d["deployment"]: d["state"] for d in bed.deployments()}
    assert states[deps[0]["deployment"]] == "READY", states
    usage = json.loads(bed.cli("gateway", "usage", "--json").stdout)
    assert usage["keys"]["load"]["requests"] == len(results) and usage["keys"]["load"]["errors"] == 0, usage
    assert g.stop(signal.SIGTERM) == 0, g.output.stderr
    jobs = [j for d in deps for j in d["job_ids"]]
    wait_until(f"jobs {jobs} gone from the queue", lambda: not queued(jobs), every=0.5)


# ------------------------------------------------------------------------------------------ d: elasticity


class Load:
    """Threads that send non-streamed requests through the gateway, one after the other each, until stopped;
    every request's outcome and when it was sent and answered."""

    def __init__(self, g: Gateway, key: str, threads: int, max_tokens: int = TOKENS) -> None:
        self.g, self.key, self.max_tokens = g, key, max_tokens
        self.results: dict[str, list[tp.Any]] = {}
        self.times: list[tuple[float, float]] = []  # (sent, answered), monotonic
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.counter = iter(range(10**9))
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]
        for t in self.threads:
            t.start()

    def _run(self) -> None:
        c = client(self.g, self.key)
        while not self.stopped.is_set():
            with self.lock:
                rid = f"q{next(self.counter)}"
                self.results[rid] = []
            sent = time.monotonic()
            try:
                r = c.chat.completions.with_raw_response.create(
                    model="tiny", messages=[{"role": "user", "content": f"Request {rid}"}],
                    max_tokens=self.max_tokens, extra_body={"ignore_eos": True})
                outcome: tp.Any = (r.http_response.status_code, r.parse().usage.completion_tokens)
            except openai.OpenAIError as exc:
                outcome = repr(exc)
            with self.lock:
                self.results[rid].append(outcome)
                self.times.append((sent, time.monotonic()))

    def answered(self) -> int:
        with self.lock:
            return len(self.times)

    def stop(self) -> None:
        self.stopped.set()
        for t in self.threads:
            t.join(GUARD_S)
        assert not any(t.is_alive() for t in self.threads)

    def bad(self) -> dict[str, list[tp.Any]]:
        return {rid: v for rid, v in self.results.items() if v != [(200, self.max_tokens)]}


def p95(times: tp.Sequence[tuple[float, float]]) -> float:
    spans = sorted(b - a for a, b in times)
    return spans[int(0.95 * (len(spans) - 1))] if spans else float("nan")


def sacct_states(job_ids: tp.Iterable[str]) -> dict[str, str]:
    """Slurm's accounting of these jobs: job id -> state (hetjob components each their own line)."""
    ids = sorted({j.split("_")[0].split("+")[0] for j in job_ids})
    out = subprocess.run(["sacct", "-X", "-n", "-P", "-j", ",".join(ids), "-o", "JobID,State"], capture_output=True,
                         text=True, timeout=60).stdout
    return dict(line.split("|", 1) for line in out.splitlines() if "|" in line)


def test_a_burst_adds_a_replica_silence_brings_the_alias_to_zero_and_a_request_wakes_it(bed: Bed) -> None:
    """One replica of 1 node and 2 slots; 8 clients at once keep 6 requests waiting by construction, so the
    gateway adds a second replica (max 2), which takes requests as soon as it is ready. The load stops; over
    the scale-down window the busiest moment needs none of the other replica's slots: one replica is scaled down,
    the other stopped as idle; both jobs leave the queue, cancelled, and ``speedslurm status`` says why. The next
    request wakes the alias: a new deployment answers it."""
    key = bed.add_key("burst")
    g = bed.start("gateway.models.tiny.nodes=1", "gateway.models.tiny.slots=2", "gateway.models.tiny.max_replicas=2",
                  "gateway.scale_up_queue=2", "gateway.scale_up_wait_s=0", "gateway.scale_up_after_s=2",
                  "gateway.scale_down_after_s=5", "gateway.models.tiny.idle_timeout=12s")
    assert chat(g, key, max_tokens=4).choices  # wakes the first replica
    [first] = bed.deployments()
    load = Load(g, key, threads=8)
    try:
        wait_until("a second replica ready", lambda: len([d for d in bed.deployments() if d["state"] == "READY"]) == 2,
                   every=0.5)
        one_replica = list(load.times)
        second = next(d for d in bed.deployments() if d["deployment"] != first["deployment"])
        wait_until("the second replica served 16 requests",
                   lambda: next(d for d in bed.deployments() if d["deployment"] == second["deployment"])["served"]
                   >= 16, every=0.2)
        mark = load.answered()
        wait_until("16 more answers on two replicas", lambda: load.answered() >= mark + 16, every=0.2)
    finally:
        load.stop()
    assert not load.bad(), load.bad()
    two_replicas = load.times[len(one_replica):]
    print(f"burst: {len(one_replica)} answers on one replica (p95 {p95(one_replica):.2f}s), "
          f"{len(two_replicas)} once two served (p95 {p95(two_replicas):.2f}s)")
    decisions = bed.status()["decisions"]
    [up] = [d for d in decisions if d["decision"] == "scale_up"]
    assert up["queue"] >= 2 and up["held_s"] >= 2 and up["replicas"] == 1, up

    # Silence: one replica is scaled down, then the other stopped as idle: the alias has none.
    wait_until("the alias cold", lambda: bed.status()["aliases"][0]["state"] == "cold", every=0.5)
    drains = {d["deployment"]: d["why"] for d in bed.status()["decisions"] if d["decision"] == "drain"}
    assert sorted(drains.values()) == ["idle", "scaled down"], drains
    ids = [first["deployment"], second["deployment"]]
    wait_until("both jobs gone from the queue", lambda: not queued(first["job_ids"] + second["job_ids"]), every=0.5)
    for dep_id in ids:
        [st] = json.loads(bed.cli("status", dep_id, "--json").stdout)
        assert st["state"] == "ENDED" and st["replicas"][0]["why"] == drains[dep_id], st
    states = sacct_states(first["job_ids"] + second["job_ids"])
    assert states and all(s.startswith(("CANCELLED", "COMPLETED")) for s in states.values()), states

    # The next request wakes it.
    assert chat(g, key, max_tokens=4).choices
    [woken] = [d for d in bed.deployments() if d["state"] == "READY"]
    assert woken["deployment"] not in ids
    assert any(d["decision"] == "wake" for d in bed.status()["decisions"][-3:])
    assert g.stop(signal.SIGTERM) == 0, g.output.stderr
    wait_until("the woken job gone from the queue", lambda: not queued(woken["job_ids"]), every=0.5)


def test_requests_across_three_time_limits_lose_none(bed: Bed) -> None:
    """Replicas of 1 node with a 2-minute time limit (Slurm's warning may stop the servers a minute before it)
    and requests without pause: before each limit the gateway starts a successor, moves new requests to it once
    it is ready and drains the old one. The load goes on until three deployments were handed over and the fourth
    answered; then every request has one 200 answer, no more than 2 deployments were ever alive at once, and no
    job ended by its time limit."""
    key = bed.add_key("steady")
    g = bed.start("gateway.models.tiny.nodes=1", "gateway.models.tiny.time=2", "gateway.handover_before_s=30")
    assert chat(g, key, max_tokens=4).choices
    load = Load(g, key, threads=2, max_tokens=8)
    alive_most = 0
    handed: list[str] = []
    try:
        def three_handed_over() -> bool:
            nonlocal alive_most, handed
            st = bed.status()
            deps = st["aliases"][0]["deployments"]
            alive_most = max(alive_most, len([d for d in deps if d["state"] not in ("ENDED", "FAILED")]))
            handed = [d["deployment"] for d in st["decisions"] if d["decision"] == "drain"
                      and d["why"] == "handed over"]
            return len(handed) >= 3 and any(d["state"] == "READY" and d["served"] > 0 and d["deployment"]
                                            not in handed for d in deps)

        wait_until("three handovers and a fourth deployment answering", three_handed_over, guard=900, every=0.5)
    finally:
        load.stop()
    assert not load.bad(), load.bad()
    done = sorted(t for _s, t in load.times)
    gaps = sorted(round(b - a, 2) for a, b in zip(done, done[1:], strict=False))
    print(f"{len(load.times)} answers across 3 handovers; longest gaps between answers {gaps[-3:]}; "
          f"at most {alive_most} deployments alive")
    assert alive_most <= 2, alive_most
    jobs = my_jobs(bed.runs)
    assert g.stop(signal.SIGTERM) == 0, g.output.stderr
    wait_until("every job gone from the queue", lambda: not queued(jobs), every=0.5)
    states = sacct_states(jobs)
    assert len(states) >= 4 and not [s for s in states.values() if "TIMEOUT" in s], states
    for dep_id in handed:
        [st] = json.loads(bed.cli("status", dep_id, "--json").stdout)
        assert st["state"] == "ENDED" and st["replicas"][0]["why"] == "handed over", st
