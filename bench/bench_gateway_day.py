"""P10 a lab day, compressed: the gateway's elasticity against each user submitting their own jobs, on the test bed;
prints a table, writes docs/gateway-day.md.

A recorded arrival trace, ``bench/traces/lab-day.jsonl`` (made by ``--make-trace``, seeded): three users, each
sending bursts of tens of requests over about 10 s every 40-90 s, interleaved with the others, in a morning
session, then a quiet lunch longer than the gateway's idle timeout, then an afternoon session. It is replayed twice
on the bed, one side after the other in one run:

* A: through ``speedslurm gateway`` (the tiny random-weight llama, 2 nodes per replica, 0 to 2 replicas, a short
  idle timeout), one key per user; every request is sent at its trace time (open loop, the ``openai`` client,
  no retries); its time to answer is the answer's arrival minus its trace time.
* B: as the lab works without it: each user's burst becomes a prompts file at the burst's first arrival, and that
  user runs ``speedslurm submit --nodes 2`` on it, concurrently with the other users' submits (the bed holds two
  such jobs at once; a third waits in Slurm); a request's time to answer is when its result line appears in the
  results file (polled) minus its trace time.

For each side: node-hours from Slurm's accounting (``sacct -X``: ElapsedRaw x NNodes of every job or hetjob
component that side submitted), p50 and p95 of the time to answer, failed requests (not a 200 answer, an error
line, or missing). Goal: A uses <= 0.5x B's node-hours at <= B's p95, with 0 failed requests.

    flock /tmp/bed.lock .venv/bin/python bench/bench_gateway_day.py          # the whole day (about 20 minutes)
    flock /tmp/bed.lock .venv/bin/python bench/bench_gateway_day.py --quick  # its first 2 minutes (or QUICK=1)
    .venv/bin/python bench/bench_gateway_day.py --make-trace                 # write the trace again (seeded)

The bed is shared: run it under ``flock /tmp/bed.lock`` as above. Every job the bench submitted is cancelled when
it ends, whatever happens.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import typing as tp
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # devtools/ (the tiny model) lives in the checkout, not in the wheel
PY = sys.executable
TRACE = ROOT / "bench" / "traces" / "lab-day.jsonl"
DOC = ROOT / "docs" / "gateway-day.md"
ENV = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
ENV["PYTHONPATH"] = str(ROOT)

SEED = 10
USERS = ("u1", "u2", "u3")
SESSIONS = (("morning", 0.0, 250.0), ("afternoon", 340.0, 590.0))  # (name, start, end) in trace seconds
BURST_EVERY_S = (40.0, 90.0)   # a user's next burst starts this long after the last one began
BURST_SPAN_S = (7.0, 12.0)     # a burst's requests arrive over this long
BURST_SIZE = (60, 110)         # requests per burst
MAX_TOKENS = (8, 32)
MIN_REQUESTS = 2000
BURST_GAP_S = 15.0  # in the trace, a user's request this long after their previous one starts a new burst
QUICK_S = 120.0

# The gateway side (A). The replica's slots are the bed's llama.parallel (16).
IDLE_TIMEOUT = "30s"
SCALE = {
    # Another replica when >= 4 requests wait for a slot, the oldest for >= 0.5 s, both held for 1 s. One user's
    # burst never makes a request wait here (16 slots keep up with ~10 requests/s of 8-32 tokens); requests wait
    # only where two users' bursts overlap, and then the backlog grows every second until the second replica
    # serves. 1 s still ignores the instant when a burst's first requests land together (and no replica is
    # added while one is starting: a cold start's queue does not count). See RATIONALE.
    "gateway.scale_up_queue": "4",
    "gateway.scale_up_wait_s": "0.5",
    "gateway.scale_up_after_s": "1",
    # The second replica is drained once 45 s passed in which the busiest moment needed at most half of the
    # first replica's 16 slots: a pause between two users' bursts is enough, the 300 s default would keep
    # 2 nodes for most of the session after one overlap.
    "gateway.scale_down_after_s": "45",
    "gateway.scale_down_use": "0.5",
}
RATIONALE = (
    "The replica has 16 slots (the bed's `llama.parallel`). **Scale up** when at least 4 requests wait for a slot, "
    "the oldest for 0.5 s, both for 1 s. On this trace one user's burst never makes a request wait (a replica "
    "keeps up with ~10 requests/s of 8-32 tokens); requests wait only where two users' bursts overlap, and then "
    "the backlog grows every second until a second replica serves, so the trigger should be quick; 1 s of held "
    "pressure still ignores the instant when a burst's first requests land together, and no replica is added "
    "while one is starting (a cold start's queue does not count). A first full run on 2026-12-08 with 1 s and "
    "3 s (wait, held) scaled up at both overlaps, but 3 s after the pressure began, with 40 and 24 requests "
    "queued and the oldest waiting 2.8 s: A's p95 was 2.83 s against B's 2.19 s (1.29x), every request over B's "
    "p95 at one of the two overlaps. The default 20 s is longer than a burst: it would scale up only when bursts "
    "overlap for long. **Scale down** after 45 s in which the busiest moment needed at most half of the other "
    "replica's slots: a pause between bursts gives the second replica's 2 nodes back, where the default 300 s "
    "keeps them for most of a session after one overlap."
)
GUARD_S = 900.0  # against a hang only


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ the trace


PROMPTS = [
    "Summarise note {n} in one line.",
    "Give three keywords for paper {n}.",
    "Translate sentence {n} of the abstract into French.",
    "Is result {n} consistent with the baseline? Answer briefly.",
    "Suggest a title for figure {n}.",
    "Rewrite comment {n} more politely.",
    "What does error code {n} in the training log mean?",
    "Name a follow-up experiment to run {n}.",
    "Fix the grammar of paragraph {n}.",
    "Classify review {n} as positive or negative.",
]


def make_trace(seed: int = SEED) -> list[dict[str, tp.Any]]:
    """The compressed day: per session and user, bursts every BURST_EVERY_S, each BURST_SIZE requests over
    BURST_SPAN_S; users start a few seconds apart so that their bursts interleave."""
    rng = random.Random(seed)
    rows: list[dict[str, tp.Any]] = []
    for _name, start, end in SESSIONS:
        for k, user in enumerate(USERS):
            t = start + rng.uniform(0, 6) + 14 * k
            while t < end - BURST_SPAN_S[1]:
                span = rng.uniform(*BURST_SPAN_S)
                n = rng.randint(*BURST_SIZE)
                offsets = sorted([0.0] + [rng.uniform(0, span) for _ in range(n - 1)])
                for off in offsets:
                    rows.append({"t": round(t + off, 3), "user": user, "max_tokens": rng.randint(*MAX_TOKENS),
                                 "prompt": f"{user}: " + rng.choice(PROMPTS).format(n=rng.randint(1, 999))})
                t += rng.uniform(*BURST_EVERY_S)
    rows.sort(key=lambda r: (r["t"], r["user"]))
    if len(rows) < MIN_REQUESTS:
        raise SystemExit(f"seed {seed} gives only {len(rows)} requests (< {MIN_REQUESTS}); change the parameters")
    return rows


@dataclasses.dataclass(frozen=True)
class Req:
    id: str
    t: float
    user: str
    max_tokens: int
    prompt: str


@dataclasses.dataclass
class Burst:
    user: str
    index: int
    reqs: list[Req]

    @property
    def t(self) -> float:
        return self.reqs[0].t


def load_trace(path: Path, until_s: float | None) -> list[Req]:
    reqs = []
    with path.open() as f:
        for i, line in enumerate(f):
            d = json.loads(line)
            if until_s is not None and d["t"] >= until_s:
                continue
            reqs.append(Req(f"r{i:05d}", float(d["t"]), d["user"], int(d["max_tokens"]), d["prompt"]))
    reqs.sort(key=lambda r: r.t)
    return reqs


def bursts_of(reqs: tp.Sequence[Req]) -> list[Burst]:
    """Each user's requests cut into bursts where they paused for BURST_GAP_S or more; by first arrival."""
    out: list[Burst] = []
    last: dict[str, Burst] = {}
    for r in reqs:
        b = last.get(r.user)
        if b is None or r.t - b.reqs[-1].t >= BURST_GAP_S:
            b = Burst(r.user, sum(1 for x in out if x.user == r.user), [])
            out.append(b)
            last[r.user] = b
        b.reqs.append(r)
    return sorted(out, key=lambda b: b.t)


def describe_trace(reqs: tp.Sequence[Req], bursts: tp.Sequence[Burst]) -> dict[str, tp.Any]:
    sizes = [len(b.reqs) for b in bursts]
    spans = [b.reqs[-1].t - b.t for b in bursts]
    quiet = 0.0
    for a, b in zip(reqs, reqs[1:], strict=False):
        quiet = max(quiet, b.t - a.t)
    return {"requests": len(reqs), "users": len({r.user for r in reqs}), "bursts": len(bursts),
            "burst_sizes": (min(sizes), max(sizes)) if sizes else (0, 0),
            "burst_spans": (min(spans), max(spans)) if spans else (0.0, 0.0),
            "duration_s": reqs[-1].t if reqs else 0.0, "longest_quiet_s": quiet,
            "tokens": sum(r.max_tokens for r in reqs)}


# ------------------------------------------------------------------------------------------ measuring


def pct(values: tp.Sequence[float], q: float) -> float:
    """The nearest-rank percentile (q in 0..100)."""
    if not values:
        return float("nan")
    s = sorted(values)
    return s[max(0, math.ceil(q / 100 * len(s)) - 1)]


def job_ids_under(runs: Path) -> set[str]:
    """The Slurm jobs recorded under a run folder (each deployment's deployment.json), as scancel takes them."""
    ids: set[str] = set()
    for info in runs.glob("*/deployment.json") if runs.is_dir() else []:
        with contextlib.suppress(OSError, ValueError):
            ids.update(str(j).split("_")[0].split("+")[0] for j in json.loads(info.read_text()).get("job_ids", [])
                       if j)
    return ids


def queued(ids: tp.Iterable[str]) -> dict[str, str]:
    """Those of ``ids`` that squeue still shows: id -> state (a hetjob's state is its first component's)."""
    ids = sorted(ids)
    if not ids:
        return {}
    out = subprocess.run(["squeue", "-h", "-j", ",".join(ids), "-o", "%i %T"], capture_output=True, text=True,
                         timeout=60).stdout
    states: dict[str, str] = {}
    for line in out.splitlines():
        job, _, state = line.partition(" ")
        states.setdefault(job.split("+")[0].split("_")[0], state.strip())
    return states


def cancel(ids: tp.Iterable[str]) -> None:
    """scancel those of ``ids`` still pending or running, and wait until every one left the queue (with a guard;
    a job its own command cancelled may still be COMPLETING)."""
    left = queued(ids)
    running = sorted(j for j, state in left.items() if state != "COMPLETING")
    if running:
        log(f"cancelling job(s) left behind: {', '.join(running)}")
        subprocess.run(["scancel", *running], capture_output=True, timeout=60)
    deadline = time.monotonic() + 120
    while left and time.monotonic() < deadline:
        time.sleep(1)
        left = queued(left)


FINAL = ("COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY", "DEADLINE",
         "BOOT_FAIL")


def accounting(ids: tp.Iterable[str]) -> dict[str, tp.Any]:
    """Node-seconds of these jobs from sacct -X (ElapsedRaw x NNodes per job or hetjob component), once every
    record is final (a guard of 3 minutes for the accounting to catch up)."""
    ids = sorted(ids)
    if not ids:
        return {"node_s": 0.0, "rows": [], "final": True}
    deadline = time.monotonic() + 180
    while True:
        out = subprocess.run(["sacct", "-n", "-X", "-P", "-j", ",".join(ids), "-o",
                              "JobID,State,ElapsedRaw,NNodes,Start,End"], capture_output=True, text=True,
                             timeout=60).stdout
        rows: list[dict[str, tp.Any]] = []
        for line in out.splitlines():
            parts = line.split("|")
            if len(parts) == 6 and parts[2].isdigit() and parts[3].isdigit():
                rows.append({"job": parts[0], "state": parts[1].split()[0], "elapsed_s": int(parts[2]),
                             "nodes": int(parts[3]), "start": parts[4], "end": parts[5]})
        seen = {r["job"].split("+")[0].split("_")[0] for r in rows}
        final = all(r["state"] in FINAL and r["end"] not in ("Unknown", "None", "") for r in rows) \
            and seen >= set(ids)
        if final or time.monotonic() > deadline:
            return {"node_s": float(sum(r["elapsed_s"] * r["nodes"] for r in rows)), "rows": rows, "final": final}
        time.sleep(2)


def summary(side: dict[str, tp.Any], reqs: tp.Sequence[Req]) -> dict[str, tp.Any]:
    """p50/p95 of the time to answer, failed and answered counts of one side's per-request outcomes."""
    outcomes: dict[str, dict[str, tp.Any]] = side["outcomes"]
    times = [o["tta"] for o in outcomes.values() if o.get("ok")]
    failed = [r.id for r in reqs if not outcomes.get(r.id, {}).get("ok")]
    return {"p50": pct(times, 50), "p95": pct(times, 95), "max": max(times) if times else float("nan"),
            "answered": len(times), "failed": len(failed), "failed_ids": failed[:10],
            "negative": sum(1 for t in times if t < 0)}


# ------------------------------------------------------------------------------------------ A: the gateway


SERVES = re.compile(r"speedslurm gateway serves (http://\S+)/v1 ")


class GatewayProc:
    """``speedslurm gateway`` as its own process; every stderr line kept with the time it was read."""

    def __init__(self, env: dict[str, str], args: list[str]) -> None:
        self.proc = subprocess.Popen([PY, "-m", "speedslurm", *args], env=env, text=True, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.lines: list[tuple[float, str]] = []
        self.events: list[tuple[float, dict[str, tp.Any]]] = []
        self.url = ""
        self.changed = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        with self.changed:
            self.changed.wait_for(lambda: bool(self.url) or self.proc.poll() is not None, timeout=300)
        if not self.url:
            self.stop()
            raise RuntimeError("the gateway did not start:\n" + "\n".join(line for _t, line in self.lines[-40:]))

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            now = time.monotonic()
            line = line.rstrip("\n")
            with self.changed:
                self.lines.append((now, line))
                if line.startswith("{"):
                    with contextlib.suppress(ValueError):
                        data = json.loads(line)
                        if isinstance(data, dict) and "event" in data:
                            self.events.append((now, data))
                m = SERVES.search(line)
                if m and not self.url:
                    self.url = m.group(1)
                self.changed.notify_all()
        with self.changed:
            self.changed.notify_all()

    def named(self, *names: str) -> list[tuple[float, dict[str, tp.Any]]]:
        with self.changed:
            return [(t, e) for t, e in self.events if e.get("event") in names]

    def live_replicas(self) -> int:
        """Replicas started, or decided on, and not yet stopped or ended, from the gateway's own log lines."""
        started = {e["deployment"] for _t, e in self.named("replica_started")}
        over = {e.get("deployment") for _t, e in self.named("replica_stopped", "replica_ended")}
        decided = sum(1 for _t, e in self.named("decision") if e.get("decision") in ("wake", "scale_up"))
        failed = len(self.named("start_failed"))
        return len(started - over) + max(0, decided - failed - len(started))

    def wait_for(self, pred: tp.Callable[[], bool], timeout: float) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: pred() or self.proc.poll() is not None, timeout=timeout) and pred()

    def stop(self, timeout: float = 300) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(60)


def cli(env: dict[str, str], *args: str, timeout: float = 120) -> str:
    res = subprocess.run([PY, "-m", "speedslurm", *args], env=env, capture_output=True, text=True, timeout=timeout,
                         stdin=subprocess.DEVNULL)
    if res.returncode != 0:
        raise RuntimeError(f"speedslurm {' '.join(args)} exited {res.returncode}:\n{res.stdout}\n{res.stderr}")
    return res.stdout


async def _send_all(url: str, keys: dict[str, str], reqs: tp.Sequence[Req], t0: float
                    ) -> dict[str, dict[str, tp.Any]]:
    import openai

    clients = {u: openai.AsyncOpenAI(base_url=url + "/v1", api_key=k, max_retries=0, timeout=GUARD_S)
               for u, k in keys.items()}
    outcomes: dict[str, dict[str, tp.Any]] = {}

    async def one(r: Req) -> None:
        delay = t0 + r.t - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        sent = time.monotonic()
        o: dict[str, tp.Any] = {"lag": sent - (t0 + r.t), "ok": False}
        try:
            raw = await clients[r.user].chat.completions.with_raw_response.create(
                model="tiny", messages=[{"role": "user", "content": r.prompt}], max_tokens=r.max_tokens)
            answer = raw.parse()
            o["status"] = raw.http_response.status_code
            o["ok"] = o["status"] == 200 and bool(answer.choices)
        except openai.APIStatusError as exc:
            o["status"], o["error"] = exc.status_code, str(exc)[:300]
        except openai.OpenAIError as exc:
            o["status"], o["error"] = 0, repr(exc)[:300]
        o["tta"] = time.monotonic() - (t0 + r.t)
        outcomes[r.id] = o

    try:
        await asyncio.gather(*(one(r) for r in reqs))
    finally:
        for c in clients.values():
            await c.close()
    return outcomes


def side_a(tmp: Path, model: Path, reqs: tp.Sequence[Req], idle_timeout: str) -> dict[str, tp.Any]:
    folder = tmp / "a"
    env = {**ENV, "SPEEDSLURM_PROFILE": "testbed", "SPEEDSLURM_RUN__DIR": str(folder / "runs"),
           "SPEEDSLURM_GATEWAY__DIR": str(folder / "gw"),
           "SPEEDSLURM_GATEWAY__ACCESS_LOG": str(folder / "access.log"), "XDG_CACHE_HOME": str(folder / "cache")}
    keys = {u: cli(env, "gateway", "keys", "add", u).strip() for u in USERS}
    sets = {"gateway.models.tiny.nodes": "2", **SCALE}
    args = [*[a for k, v in sets.items() for a in ("--set", f"{k}={v}")], "gateway", "--listen", "127.0.0.1:0",
            "--model", f"tiny={model}", "--min-replicas", "0", "--max-replicas", "2", "--idle-timeout", idle_timeout]
    t0_box = [0.0]
    g = GatewayProc(env, args)
    out: dict[str, tp.Any] = {"settings": sets, "argv": args}
    try:
        t0 = time.monotonic() + 2.0
        t0_box[0] = t0
        log(f"A: replaying {len(reqs)} requests through {g.url} (trace {reqs[-1].t:.0f} s)")
        out["outcomes"] = asyncio.run(_send_all(g.url, keys, reqs, t0))
        last = time.monotonic()
        log(f"A: last answer {last - t0:.0f} s into the trace; waiting for the idle drain")
        drained = g.wait_for(lambda: g.live_replicas() == 0, timeout=GUARD_S)
        out["drained_after_s"] = time.monotonic() - last if drained else None
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired, ValueError):
            out["usage"] = json.loads(cli(env, "gateway", "usage", "--json"))
        out["exit"] = g.stop()
        out["end_s"] = time.monotonic() - t0
        out["t0"] = t0
    finally:
        if g.proc.poll() is None:
            g.stop()
        ids = job_ids_under(folder / "runs")
        cancel(ids)
    out["jobs"] = sorted(ids)
    out["acct"] = accounting(ids)
    out["events"] = [(t - t0_box[0], e) for t, e in g.named("decision", "replica_ready", "replica_stopped",
                                                           "replica_ended", "start_failed")]
    (folder / "gateway.log").write_text("\n".join(f"{t - t0_box[0]:9.2f} {line}" for t, line in g.lines) + "\n")
    out["log"] = str(folder / "gateway.log")
    return out


# ------------------------------------------------------------------------------------------ B: submit per burst


class ResultsPoller:
    """Reads the new complete lines of every results file every 0.1 s; the first time each custom_id's final
    line was seen."""

    def __init__(self) -> None:
        self.files: dict[Path, int] = {}
        self.seen: dict[str, tuple[float, bool, str]] = {}  # custom_id -> (when, ok, error)
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def add(self, path: Path) -> None:
        with self.lock:
            self.files.setdefault(path, 0)

    def poll(self) -> None:
        now = time.monotonic()
        with self.lock:
            files = list(self.files.items())
        for path, offset in files:
            try:
                with path.open("rb") as f:
                    f.seek(offset)
                    data = f.read()
            except FileNotFoundError:
                continue
            end = data.rfind(b"\n") + 1
            if not end:
                continue
            for line in data[:end].splitlines():
                with contextlib.suppress(ValueError):
                    d = json.loads(line)
                    resp = d.get("response") or {}
                    ok = d.get("error") is None and resp.get("status_code") == 200
                    cid = str(d.get("custom_id"))
                    prev = self.seen.get(cid)
                    if prev is None or (ok and not prev[1]):
                        self.seen[cid] = (now, ok, "" if ok else json.dumps(d.get("error") or resp)[:300])
            with self.lock:
                self.files[path] = offset + end

    def _run(self) -> None:
        while not self.stop.is_set():
            self.poll()
            time.sleep(0.1)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)
        self.poll()


def side_b(tmp: Path, model: Path, reqs: tp.Sequence[Req], bursts: tp.Sequence[Burst]) -> dict[str, tp.Any]:
    folder = tmp / "b"
    runs = folder / "runs"
    env = {**ENV, "SPEEDSLURM_PROFILE": "testbed", "SPEEDSLURM_RUN__DIR": str(runs),
           "XDG_CACHE_HOME": str(folder / "cache")}
    poller = ResultsPoller()
    procs: list[tuple[Burst, subprocess.Popen[str], Path, float]] = []
    out: dict[str, tp.Any] = {}
    t0 = time.monotonic() + 2.0
    log(f"B: {len(bursts)} bursts of {len(reqs)} requests, one `speedslurm submit --nodes 2` each "
        f"(trace {reqs[-1].t:.0f} s)")
    try:
        for b in bursts:
            delay = t0 + b.t - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            d = folder / f"{b.user}-{b.index:02d}"
            d.mkdir(parents=True)
            prompts, results = d / "burst.jsonl", d / "results.jsonl"
            prompts.write_text("".join(json.dumps({"custom_id": r.id, "messages": [{"role": "user",
                                                                                     "content": r.prompt}],
                                                   "max_tokens": r.max_tokens}) + "\n" for r in b.reqs))
            poller.add(results)
            with (d / "stdout").open("w") as so, (d / "stderr").open("w") as se:
                p = subprocess.Popen([PY, "-m", "speedslurm", "submit", "--model", str(model), "--nodes", "2",
                                      "--prompts", str(prompts), "--out", str(results), "--quiet", "--json"],
                                     env=env, stdout=so, stderr=se, stdin=subprocess.DEVNULL, text=True)
            procs.append((b, p, d, time.monotonic()))
        for _b, p, d, started in procs:
            try:
                rc = p.wait(max(1.0, started + GUARD_S - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.terminate()
                rc = p.wait(120)
            if rc != 0:
                log(f"B: submit of {d.name} exited {rc}: {(d / 'stderr').read_text()[-500:]}")
        out["end_s"] = time.monotonic() - t0
    finally:
        for _b, p, _d, _s in procs:
            if p.poll() is None:
                p.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(120)
        poller.close()
        ids = job_ids_under(runs)
        cancel(ids)
    trace_t = {r.id: r.t for r in reqs}
    out["outcomes"] = {cid: {"ok": ok, "tta": when - (t0 + trace_t[cid]), **({"error": err} if err else {})}
                       for cid, (when, ok, err) in poller.seen.items() if cid in trace_t}
    out["exits"] = [p.returncode for _b, p, _d, _s in procs]
    out["submits"] = []
    for b, p, d, started in procs:
        with contextlib.suppress(OSError, ValueError):
            s = json.loads((d / "stdout").read_text() or "{}")
            out["submits"].append({"burst": d.name, "t": b.t, "n": len(b.reqs), "rc": p.returncode,
                                   "wall_s": s.get("wall_s"), "started_s": started - t0})
    out["jobs"] = sorted(ids)
    out["acct"] = accounting(ids)
    out["t0"] = t0
    return out


# ------------------------------------------------------------------------------------------ report


def fmt_s(v: float) -> str:
    return "-" if v != v else f"{v:.2f} s"


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b and a == a and b == b else "-"


def table(a: dict[str, tp.Any] | None, b: dict[str, tp.Any] | None) -> tuple[str, dict[str, tp.Any]]:
    sa = a["summary"] if a else None
    sb = b["summary"] if b else None
    nh_a = a["acct"]["node_s"] / 3600 if a else float("nan")
    nh_b = b["acct"]["node_s"] / 3600 if b else float("nan")
    rows = [
        ["node-hours (sacct -X)", f"{nh_a:.4f}", f"{nh_b:.4f}", ratio(nh_a, nh_b), "<= 0.50x"],
        ["time to answer p50", fmt_s(sa["p50"]) if sa else "-", fmt_s(sb["p50"]) if sb else "-",
         ratio(sa["p50"], sb["p50"]) if sa and sb else "-", ""],
        ["time to answer p95", fmt_s(sa["p95"]) if sa else "-", fmt_s(sb["p95"]) if sb else "-",
         ratio(sa["p95"], sb["p95"]) if sa and sb else "-", "<= 1.00x"],
        ["time to answer max", fmt_s(sa["max"]) if sa else "-", fmt_s(sb["max"]) if sb else "-", "", ""],
        ["failed requests", str(sa["failed"]) if sa else "-", str(sb["failed"]) if sb else "-", "", "0 (A)"],
        ["jobs submitted", str(len(a["jobs"])) if a else "-", str(len(b["jobs"])) if b else "-", "", ""],
    ]
    head = ["figure", "A: gateway", "B: submit per burst", "A/B", "goal"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]
    verdict: dict[str, tp.Any] = {}
    if sa and sb:
        verdict = {"node_hours": nh_a <= 0.5 * nh_b, "p95": sa["p95"] <= sb["p95"], "failed": sa["failed"] == 0,
                   "nh_ratio": nh_a / nh_b if nh_b else float("nan"), "p95_ratio": sa["p95"] / sb["p95"]}
    return "\n".join(lines), verdict


def timeline(a: dict[str, tp.Any]) -> list[str]:
    out = []
    for t, e in a["events"]:
        kind = e.get("event")
        if kind == "decision":
            figures = ", ".join(f"{k} {v}" for k, v in e.items() if k not in ("event", "decision", "alias", "why"))
            out.append(f"| {t:7.1f} | {e['decision']} | {e.get('why', '')}{' (' + figures + ')' if figures else ''} |")
        elif kind == "replica_ready":
            out.append(f"| {t:7.1f} | (replica ready) | {e.get('deployment')} after {e.get('after_s')} s, "
                       f"{e.get('slots')} slots |")
        elif kind in ("replica_stopped", "replica_ended"):
            out.append(f"| {t:7.1f} | ({kind.replace('_', ' ')}) | {e.get('deployment')}: {e.get('why')} |")
        else:
            out.append(f"| {t:7.1f} | ({kind}) | {e.get('why', '')} |")
    return ["| trace s | decision | why (figures) |", "|---|---|---|", *out]


def per_job(side: dict[str, tp.Any]) -> dict[str, dict[str, int]]:
    """Each job's accounting summed over its hetjob components: {job: {node_s, elapsed_s, nodes}}."""
    jobs: dict[str, dict[str, int]] = {}
    for r in side["acct"]["rows"]:
        j = jobs.setdefault(r["job"].split("+")[0], {"node_s": 0, "elapsed_s": 0, "nodes": 0})
        j["node_s"] += r["elapsed_s"] * r["nodes"]
        j["elapsed_s"] = max(j["elapsed_s"], r["elapsed_s"])
        j["nodes"] += r["nodes"]
    return jobs


def jobs_detail(side: dict[str, tp.Any], each: bool) -> str:
    jobs = per_job(side)
    if each or len(jobs) <= 4:
        per = ", ".join(f"job {j}: {v['nodes']} nodes x {v['elapsed_s']} s" for j, v in jobs.items())
    else:
        el = [v["elapsed_s"] for v in jobs.values()]
        per = (f"{len(jobs)} jobs of {statistics.median([v['nodes'] for v in jobs.values()]):.0f} nodes, "
               f"{statistics.median(el):.0f} s each (median; {min(el)}-{max(el)} s)")
    return f"{len(side['jobs'])} job(s) submitted, accounting: {per or '-'}"


def sentence(verdict: dict[str, tp.Any], a: dict[str, tp.Any], b: dict[str, tp.Any]) -> str:
    if not verdict:
        return "Only one side ran: no comparison."
    met = verdict["node_hours"] and verdict["p95"] and verdict["failed"]
    parts = [f"A used {verdict['nh_ratio']:.2f}x B's node-hours (goal <= 0.50x: "
             f"{'met' if verdict['node_hours'] else 'not met'}), its p95 was {verdict['p95_ratio']:.2f}x B's "
             f"(goal <= 1.00x: {'met' if verdict['p95'] else 'not met'}), and {a['summary']['failed']} of its "
             f"requests failed (goal 0: {'met' if verdict['failed'] else 'not met'})."]
    parts.append("The goal was met." if met else "The goal was not met.")
    return " ".join(parts)


def over(a: dict[str, tp.Any], reqs: tp.Sequence[Req], limit: float) -> str:
    """A's requests answered later than ``limit``, counted by the 10 s of the trace they arrived in."""
    by: dict[int, int] = {}
    for r in reqs:
        o = a["outcomes"].get(r.id)
        if o is None or not o.get("ok") or o["tta"] > limit:
            by[int(r.t // 10) * 10] = by.get(int(r.t // 10) * 10, 0) + 1
    return ", ".join(f"{n} arriving at {t}-{t + 10} s" for t, n in sorted(by.items())) or "none"


def render(args: argparse.Namespace, info: dict[str, tp.Any], a: dict[str, tp.Any] | None,
           b: dict[str, tp.Any] | None, wall_s: float, reqs: tp.Sequence[Req]) -> str:
    tab, verdict = table(a, b)
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cmd = "python bench/bench_gateway_day.py" + (" --quick" if args.quick else "")
    tr = info["trace"]
    lo, hi = tr["burst_sizes"]
    slo, shi = tr["burst_spans"]
    sets = ", ".join(f"`{k}={v}`" for k, v in SCALE.items())
    doc = [
        "# Gateway: a lab day, compressed (P10)", "",
        f"`{cmd}` on the test bed, {when}: {os.cpu_count()} cores, Python {platform.python_version()}; the "
        f"bed's 4 nodes, the gateway, the submits and the load generator share the machine's cores. Wall time "
        f"of the run: {wall_s / 60:.1f} min.", "",
        "## What was replayed", "",
        f"`bench/traces/lab-day.jsonl` (`--make-trace`, seed {SEED})"
        f"{f', its first {QUICK_S:.0f} s' if args.quick else ''}: {tr['requests']} requests of {tr['users']} users "
        f"in {tr['bursts']} bursts ({lo}-{hi} requests each, arriving over {slo:.0f}-{shi:.0f} s; each user's "
        f"next burst {BURST_EVERY_S[0]:.0f}-{BURST_EVERY_S[1]:.0f} s after the last), "
        + ", ".join(f"{n} {s:.0f}-{e:.0f} s" for n, s, e in SESSIONS)
        + f" of the trace, over {tr['duration_s']:.0f} s; the longest quiet stretch {tr['longest_quiet_s']:.0f} s "
        f"(lunch, longer than the idle timeout). max_tokens {MAX_TOKENS[0]}-{MAX_TOKENS[1]} "
        f"({tr['tokens']} in all), chat requests to the tiny random-weight llama (devtools/testmodels.py).", "",
        "- **A, the gateway**: `speedslurm gateway --model tiny=TINY.gguf --min-replicas 0 --max-replicas 2 "
        f"--idle-timeout {args.idle_timeout}` with `gateway.models.tiny.nodes=2` (each replica 2 nodes: a 70B "
        f"model needs several; the bed has 4) and {sets}; one key per user, each request sent at its trace time "
        "(asyncio, the `openai` client, `max_retries=0`); time to answer = the answer's arrival - its trace time. "
        "After the last answer the gateway is left to drain its idle replicas, then gets SIGTERM.",
        "- **B, without it**: each user's burst is written as a prompts file at its first arrival and that user runs "
        "`speedslurm submit --model TINY.gguf --nodes 2 --prompts burst.jsonl --out results.jsonl` (concurrently "
        "with the others' submits, and with their own earlier one when it still runs); time to answer = when the "
        "request's line appears in the results file (polled every 0.1 s) - its trace time. A request late in a "
        "burst is in the file from the burst's start, so its answer can come before its trace time (negative).",
        "",
        "**Why these scaling settings.** " + RATIONALE + " "
        f"Idle timeout {args.idle_timeout}: shorter than lunch, so the alias holds no node over it.", "",
        "## Result", "",
        tab, "",
        sentence(verdict, a, b) if a and b else "Only one side ran.", "",
    ]
    if a and b:
        doc += [explain(verdict, a, b), "",
                f"A's requests answered later than B's p95 ({b['summary']['p95']:.2f} s): "
                f"{over(a, reqs, b['summary']['p95'])}.", ""]
    for name, side in (("A", a), ("B", b)):
        if side is None:
            continue
        s = side["summary"]
        doc.append(f"- {name}: {jobs_detail(side, name == 'A')}; {s['answered']} answered, {s['failed']} failed"
                   + (f" (first: {', '.join(s['failed_ids'])})" if s["failed"] else "")
                   + (f"; {s['negative']} answered before their trace time" if s["negative"] else "")
                   + ("" if side["acct"]["final"] else "; accounting not final after 3 minutes") + ".")
    if a:
        lag = max((o.get("lag", 0.0) for o in a["outcomes"].values()), default=0.0)
        usage = a.get("usage") or {}
        nh = sum(float(v.get("node_hours", 0) or 0) for v in (usage.get("aliases") or {}).values()) \
            if isinstance(usage.get("aliases"), dict) else None
        doc.append(f"- A: the latest send was {lag * 1000:.0f} ms after its trace time; the idle drain ended "
                   f"{(a.get('drained_after_s') or float('nan')):.0f} s after the last answer; the gateway exited "
                   f"{a.get('exit')}" + (f"; `gateway usage` counted {nh:.4f} node-hours" if nh is not None else "")
                   + ".")
    if b:
        waits = [x["wall_s"] for x in b["submits"] if isinstance(x.get("wall_s"), (int, float))]
        doc.append(f"- B: {len(b['submits'])} submits, exit codes {sorted(set(b['exits']))}; submit wall time "
                   f"median {statistics.median(waits) if waits else float('nan'):.1f} s "
                   f"(max {max(waits) if waits else float('nan'):.1f} s).")
    if a:
        doc += ["", "## A's decisions", "",
                "The gateway's `decision` log lines (and, in brackets, its replicas becoming ready and stopping), "
                "by when they were logged, in seconds of the trace:", "", *timeline(a)]
    return "\n".join(doc) + "\n"


def explain(verdict: dict[str, tp.Any], a: dict[str, tp.Any], b: dict[str, tp.Any]) -> str:
    """Where each side's node-time went, in figures, so that a goal missed says why."""
    ja, jb = per_job(a), per_job(b)
    held_a = sum(v["node_s"] for v in ja.values())
    held_b = sum(v["node_s"] for v in jb.values())
    nodes_b = sum(v["nodes"] for v in jb.values())
    ready = [e["after_s"] for _t, e in a["events"] if e.get("event") == "replica_ready"]
    drains = [e.get("why") for _t, e in a["events"] if e.get("decision") == "drain"]
    text = (f"Where the node-time went: A held {held_a:.0f} node-s in {len(ja)} replica job(s), drained "
            f"{drains.count('idle')} time(s) as idle and {drains.count('scaled down')} time(s) scaled down: a "
            f"replica stays while the users' interleaved bursts come closer together than the idle timeout, and "
            f"for the idle timeout after the last request before a quiet stretch. B held "
            f"{held_b:.0f} node-s in {len(jb)} job(s) of {statistics.median([v['elapsed_s'] for v in jb.values()]):.0f}"
            f" s each (median): start, one burst, stop.")
    if ready:
        text += (f" A replica of the tiny model was ready {statistics.median(ready):.1f} s after its job was "
                 "submitted, so a job per burst costs B little start-up.")
    if not verdict["node_hours"] and nodes_b:
        # The start-up per job (node-s per node of each B job) at which B would hold twice A's node-time.
        extra = max(0.0, (2 * held_a - held_b) / nodes_b)
        text += (f" B would hold twice A's node-time if each of its jobs took about {extra:.0f} s longer from job "
                 "start to the first answer (a model that loads that much slower; a 70B model over RPC takes "
                 "minutes), with A's replicas unchanged (each session's wake would wait that long too): an "
                 "arithmetic projection, not a measurement.")
    return text


# ------------------------------------------------------------------------------------------ main


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--make-trace", action="store_true", help=f"write {TRACE.relative_to(ROOT)} (seeded) and exit")
    ap.add_argument("--quick", action="store_true", default=os.environ.get("QUICK", "") not in ("", "0"),
                    help=f"replay only the trace's first {QUICK_S:.0f} s (also QUICK=1)")
    ap.add_argument("--sides", default="a,b", help="a, b or a,b (default)")
    ap.add_argument("--trace", type=Path, default=TRACE)
    ap.add_argument("--idle-timeout", default=IDLE_TIMEOUT)
    ap.add_argument("--no-doc", action="store_true", help=f"do not write {DOC.relative_to(ROOT)}")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the run's folder (logs, results files)")
    args = ap.parse_args()
    if args.make_trace:
        rows = make_trace()
        TRACE.parent.mkdir(parents=True, exist_ok=True)
        TRACE.write_text("".join(json.dumps(r) + "\n" for r in rows))
        d = describe_trace(load_trace(TRACE, None), bursts_of(load_trace(TRACE, None)))
        print(f"wrote {TRACE}: {json.dumps(d)}")
        return
    sides = set(args.sides.split(","))
    reqs = load_trace(args.trace, QUICK_S if args.quick else None)
    bursts = bursts_of(reqs)
    info = {"trace": describe_trace(reqs, bursts)}
    log(f"trace: {json.dumps(info['trace'])}")
    from devtools.testmodels import write_tiny_llama_gguf

    start = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="bench-gateway-day-", dir=os.environ.get("BENCH_TMP")))
    tmp.chmod(0o755)  # jobs on the bed's nodes read the model and write their run folders here
    a = b = None
    finished = False
    try:
        model = write_tiny_llama_gguf(tmp / "models" / "tiny-llama.gguf")
        if "a" in sides:
            a = side_a(tmp, model, reqs, args.idle_timeout)
            a["summary"] = summary(a, reqs)
            (tmp / "a" / "outcomes.json").write_text(json.dumps(a["outcomes"]))
            log(f"A: {json.dumps(a['summary'])}, node-s {a['acct']['node_s']:.0f}")
        if "b" in sides:
            b = side_b(tmp, model, reqs, bursts)
            b["summary"] = summary(b, reqs)
            (tmp / "b" / "outcomes.json").write_text(json.dumps(b["outcomes"]))
            log(f"B: {json.dumps(b['summary'])}, node-s {b['acct']['node_s']:.0f}")
        finished = True
    finally:
        for side in ("a", "b"):
            cancel(job_ids_under(tmp / side / "runs"))
        if args.keep_tmp or not finished:
            log(f"the run's folder is kept: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    wall = time.monotonic() - start
    doc = render(args, info, a, b, wall, reqs)
    print(doc)
    if not args.no_doc:
        DOC.write_text(doc)
        log(f"wrote {DOC}")


if __name__ == "__main__":
    main()
