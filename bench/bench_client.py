"""Client-side cost of ``speedslurm run`` against stub servers (no GPU, no Slurm); prints a table.

* P3 — the runner against a zero-latency stub: requests/s and the runner's peak RSS, for each HTTP client
  (goals: >= 2,000 requests/s on 2 cores, <= 150 MB at 100k prompts);
* P5 — 1, 2 and 3 replicas of latency-bound stubs (fixed latency per request, few slots each): throughput
  relative to one replica (goal >= 0.9 x R).

Each stub runs in its own process; the runner runs as ``python -m speedslurm run`` in another, and its peak
RSS is read from ``wait4``. Medians over ``--reps`` repetitions, with min-max spread.

    python bench/bench_client.py                 # full: 100k prompts
    python bench/bench_client.py --quick         # 20k prompts, 1 repetition
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import typing as tp
from pathlib import Path

PY = sys.executable
STUB = Path(__file__).resolve().parents[1] / "devtools" / "stubserver.py"  # standard library only
LIB_TRANSPORTS = Path(__file__).resolve().parent / "lib_transports.py"
LIBRARIES = ("httpx", "aiohttp")  # P3 clients that replace the built-in one (same runner); "raw", "openai": built in
KEY = "bench-key"


def write_prompts(path: Path, n: int) -> None:
    with open(path, "w") as fh:
        for i in range(n):
            if i % 2:
                fh.write(json.dumps({"custom_id": f"p{i}", "messages": [
                    {"role": "user", "content": f"Question {i}: what is {i} plus {i}?"}], "max_tokens": 8}) + "\n")
            else:
                fh.write(json.dumps({"custom_id": f"p{i}", "prompt": f"Prompt number {i} says",
                                     "max_tokens": 8}) + "\n")


@contextlib.contextmanager
def stub(latency: float, slots: int) -> tp.Iterator[str]:
    proc = subprocess.Popen([PY, str(STUB), "--port", "0", "--latency", str(latency),
                             "--slots", str(slots), "--api-key", KEY], stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        if not line.startswith("listening on "):
            raise RuntimeError(f"stub server did not start: {line!r}")
        yield line.split()[-1]
    finally:
        proc.terminate()
        proc.wait()


def run_client(args: list[str], library: str | None = None) -> tuple[dict[str, tp.Any], float, float, float]:
    """Run ``speedslurm run`` and return (summary JSON, wall seconds, peak RSS in MB, CPU seconds of the process).
    ``library``: ``httpx`` or ``aiohttp`` in place of the built-in HTTP client (bench/lib_transports.py)."""
    t0 = time.perf_counter()
    cmd = [PY, "-m", "speedslurm"] if library is None else [PY, str(LIB_TRANSPORTS), library]
    proc = subprocess.Popen([*cmd, "run", *args, "--quiet", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out_r = proc.stdout
    assert out_r is not None
    out = out_r.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read() if proc.stderr else b""
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"speedslurm run failed ({proc.returncode}): {err.decode()[-2000:]}")
    return json.loads(out), wall, usage.ru_maxrss / 1024.0, usage.ru_utime + usage.ru_stime


def endpoint_file(folder: Path, replica: int, url: str, slots: int) -> Path:
    from speedslurm.rundir.layout import RunDir
    from speedslurm.rundir.records import Endpoint, write_json_atomic

    rd = RunDir(folder)
    rd.replica_dir(replica).mkdir(parents=True, exist_ok=True)
    ep = Endpoint(url=url, api_key=KEY, model="stub-model", deployment_id=folder.name, replica=replica,
                  job_id="bench", leader_node="127.0.0.1", follower_nodes=[], rpc_servers=[], llama_version="stub",
                  parallel=slots, ctx=4096, started_at=time.time(), ready_at=time.time())
    write_json_atomic(rd.endpoint_path(replica), ep.to_json())
    return rd.endpoint_path(replica)


def bench_p3(tmp: Path, n: int, reps: int, clients: list[str], concurrency: int) -> list[dict[str, tp.Any]]:
    prompts = tmp / "p3.jsonl"
    write_prompts(prompts, n)
    rates: dict[str, list[float]] = {c: [] for c in clients}
    rss: dict[str, list[float]] = {c: [] for c in clients}
    cpu: dict[str, list[float]] = {c: [] for c in clients}  # the client's CPU time per request (us): what a
    # busy machine changes least, and what bounds requests/s when the client has a core to itself
    with stub(0.0, concurrency) as url:
        for _ in range(reps):  # interleaved: client A, B, C, A, B, C ... so that drift and neighbours cancel
            for client in clients:
                out = tmp / f"p3-{client}.results.jsonl"
                out.unlink(missing_ok=True)
                library = client if client in LIBRARIES else None
                summary, wall, peak, cpu_s = run_client(["--base-url", url, "--api-key", KEY, "--prompts", str(prompts),
                                                  "--out", str(out), "--client", "raw" if library else client,
                                                  "--concurrency", str(concurrency)], library)
                assert summary["requests"]["ok"] == n, summary
                rates[client].append(n / summary["wall_s"])
                rss[client].append(peak)
                cpu[client].append(cpu_s / n * 1e6)
                print(f"  P3 {client}: {n / summary['wall_s']:.0f} req/s (process wall {wall:.1f} s), "
                      f"peak RSS {peak:.0f} MB, {cpu_s / n * 1e6:.0f} us CPU per request", file=sys.stderr)
    return [{"client": c, "n": n, "req_s": rates[c], "rss_mb": rss[c], "cpu_us": cpu[c]} for c in clients]


def bench_p5(tmp: Path, reps: int, latency: float, slots: int, seconds: float, client: str) -> list[dict[str, tp.Any]]:
    rows = []
    base = None
    per_replica_rate = slots / latency
    for replicas in (1, 2, 3):
        n = int(per_replica_rate * replicas * seconds)
        prompts = tmp / f"p5-{replicas}.jsonl"
        write_prompts(prompts, n)
        rates = []
        for _ in range(reps):
            with contextlib.ExitStack() as stack:
                urls = [stack.enter_context(stub(latency, slots)) for _ in range(replicas)]
                # one endpoint file per replica, as a deployment of R replicas writes them
                folder = Path(tempfile.mkdtemp(dir=tmp))
                for r, url in enumerate(urls):
                    endpoint_file(folder, r, url, slots)
                out = tmp / f"p5-{replicas}.results.jsonl"
                out.unlink(missing_ok=True)
                files = [a for r in range(replicas) for a in ("--endpoint-file", str(folder / f"r{r}" / "endpoint.json"))]
                summary, _, _, _ = run_client([*files, "--prompts", str(prompts), "--out", str(out), "--client", client])
                assert summary["requests"]["ok"] == n, summary
                rates.append(n / summary["wall_s"])
                print(f"  P5 R={replicas}: {rates[-1]:.1f} req/s, per replica {summary['replicas']}",
                      file=sys.stderr)
        med = statistics.median(rates)
        base = base or med
        rows.append({"replicas": replicas, "n": n, "req_s": rates, "ratio": med / base})
    return rows


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):,.0f} ({min(values):,.0f}-{max(values):,.0f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="20k prompts, 1 repetition")
    parser.add_argument("-n", type=int, default=None, help="prompts for P3 [100000; 20000 with --quick]")
    parser.add_argument("--reps", type=int, default=None, help="repetitions [3; 1 with --quick]")
    parser.add_argument("--clients", default="raw,openai", help="HTTP clients to compare in P3: raw, openai (built "
                        "in), httpx, aiohttp (libraries in place of the built-in client; aiohttp must be installed)")
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight in P3")
    parser.add_argument("--latency", type=float, default=0.05, help="P5 stub latency per request (s)")
    parser.add_argument("--slots", type=int, default=4, help="P5 slots per stub")
    parser.add_argument("--seconds", type=float, default=5.0, help="P5 target duration per run")
    parser.add_argument("--skip", default="", help="comma list of parts to skip: p3,p5")
    parser.add_argument("--json-out", default=None, help="also write the rows and the table as JSON to this file")
    args = parser.parse_args()
    n = args.n or (20_000 if args.quick else 100_000)
    reps = args.reps or (1 if args.quick else 3)
    skip = set(filter(None, args.skip.split(",")))
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
          file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="bench-client-") as t:
        tmp = Path(t)
        raw: dict[str, tp.Any] = {}
        lines = [f"# bench_client: {os.cpu_count()} CPUs, Python {platform.python_version()}, reps={reps}", ""]
        if "p3" not in skip:
            rows = bench_p3(tmp, n, reps, args.clients.split(","), args.concurrency)
            raw["p3"] = rows
            lines += ["P3 zero-latency stub (median (min-max))", "",
                      "| client | prompts | requests/s | peak RSS MB | client CPU per request (us) | goal |",
                      "|---|---|---|---|---|---|"]
            for row in rows:
                lines.append(f"| {row['client']} | {row['n']:,} | {spread(row['req_s'])} | {spread(row['rss_mb'])} "
                             f"| {spread(row['cpu_us'])} | >= 2,000 req/s, <= 150 MB |")
            lines.append("")
        if "p5" not in skip:
            rows = bench_p5(tmp, reps, args.latency, args.slots, args.seconds, "raw")
            raw["p5"] = rows
            lines += [f"P5 replicas ({args.latency * 1000:.0f} ms per request, {args.slots} slots each)", "",
                      "| replicas | prompts | requests/s | ratio vs 1 | goal |", "|---|---|---|---|---|"]
            for row in rows:
                lines.append(f"| {row['replicas']} | {row['n']:,} | {spread(row['req_s'])} | {row['ratio']:.2f} "
                             f"| >= {0.9 * row['replicas']:.1f} |")
        print("\n".join(lines))
        if args.json_out:
            Path(args.json_out).write_text(json.dumps({**raw, "table": "\n".join(lines)}, indent=1))


if __name__ == "__main__":
    main()
