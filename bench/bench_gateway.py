"""The gateway's cost, side by side with going to the servers directly; prints a table, writes docs/gateway-benchmarks.md.

* P8 overhead against a zero-latency stub: requests/s through ``speedslurm gateway`` vs straight to the stub at the
  same concurrency, the p50 latency each adds, and the time to the first streamed chunk, interleaved A B A B;
  then the same against a real deployment on the test bed (gemma-3-270m, one node; the gateway fronts its URL).
* P9 cold start on the test bed: the first request to a cold alias until its answer, against the hand procedure's
  ``speedslurm up`` and then the same request, interleaved.
* Load: 10,000 requests from 3 keys at once through 2 replicas (stub processes): every request answered exactly
  once (each answer checked against its own prompt, the stubs' counts summed), per-key counts of ``gateway usage``
  equal to what was sent, and the gateway's peak RSS.

Every server, the gateway and each load generator run in processes of their own; on a small machine they share its
cores, which the report states. Medians over ``--reps`` repetitions, with min-max.

    python bench/bench_gateway.py                  # every part (about 10 minutes)
    python bench/bench_gateway.py --quick          # fewer requests and repetitions
    python bench/bench_gateway.py --parts p8,load  # no test bed needed for these
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import typing as tp
import urllib.request
from pathlib import Path

PY = sys.executable
ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


# ------------------------------------------------------------------------------------------ load generator


async def _request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes, body: bytes,
                   stream: bool) -> tuple[int, bytes, float]:
    """One request on a kept-alive connection: (status, body, seconds to the first body byte of an event)."""
    t0 = time.perf_counter()
    writer.write(head + body)
    status_line = await reader.readline()
    status = int(status_line.split()[1])
    length, chunked = 0, False
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b""):
            break
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    first = 0.0
    if not chunked:
        data = await reader.readexactly(length)
        return status, data, time.perf_counter() - t0
    parts = []
    while True:
        size = int((await reader.readline()).split(b";")[0], 16)
        if size == 0:
            await reader.readline()
            break
        chunk = await reader.readexactly(size)
        await reader.readexactly(2)
        if not first and b"data:" in chunk:
            first = time.perf_counter() - t0
        parts.append(chunk)
    return status, b"".join(parts), first if stream else time.perf_counter() - t0


async def _load(url: str, key: str, n: int, concurrency: int, stream: bool, tag: str) -> dict[str, tp.Any]:
    host, port = url.split("//")[1].split(":")
    queue = list(range(n))
    latencies: list[float] = []
    wrong: list[int] = []

    async def worker() -> None:
        reader, writer = await asyncio.open_connection(host, int(port))
        while queue:
            i = queue.pop()
            text = f"{tag}-{i}"
            body = json.dumps({"model": "m", "messages": [{"role": "user", "content": text}], "max_tokens": 4,
                               "stream": stream}).encode()
            head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {key}\r\n"
                    f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
            status, data, seconds = await _request(reader, writer, head, body, stream)
            latencies.append(seconds)
            if status != 200 or (not stream and f"echo: {text}".encode() not in data):
                wrong.append(i)
        writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - t0
    return {"n": n, "rps": n / elapsed, "p50_ms": statistics.median(latencies) * 1000, "wrong": len(wrong)}


def worker_main(argv: list[str]) -> None:
    url, key, n, concurrency, mode, tag = argv
    print(json.dumps(asyncio.run(_load(url, key, int(n), int(concurrency), mode == "stream", tag))))


def load(url: str, key: str, n: int, concurrency: int, stream: bool = False, tag: str = "q") -> dict[str, tp.Any]:
    out = subprocess.run([PY, __file__, "--worker", url, key, str(n), str(concurrency),
                          "stream" if stream else "plain", tag], capture_output=True, text=True, env=ENV,
                         timeout=900, check=True)
    return tp.cast("dict[str, tp.Any]", json.loads(out.stdout))


# ------------------------------------------------------------------------------------------ processes


class Proc:
    """A server process that prints its URL on a line of stderr or stdout (``pattern``)."""

    def __init__(self, argv: list[str], pattern: str, env: dict[str, str] | None = None) -> None:
        self.p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  env=env or ENV, stdin=subprocess.DEVNULL)
        self.lines: list[str] = []
        found = threading.Event()
        self.url = ""

        def read() -> None:
            assert self.p.stdout is not None
            for line in self.p.stdout:
                self.lines.append(line)
                m = re.search(pattern, line)
                if m and not self.url:
                    self.url = m.group(1)
                    found.set()
            found.set()

        threading.Thread(target=read, daemon=True).start()
        found.wait(600)
        if not self.url:
            raise RuntimeError(f"{argv[:4]} did not start:\n{''.join(self.lines[-30:])}")

    def peak_rss_mb(self) -> float:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{self.p.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(120)
            except subprocess.TimeoutExpired:
                self.p.kill()


def stub(slots: int = 64, latency: float = 0.0) -> Proc:
    return Proc([PY, "-m", "devtools.stubserver", "--port", "0", "--slots", str(slots), "--latency", str(latency)],
                r"listening on (http://\S+)")


def gateway(folder: Path, models: list[str], *sets: str, env: dict[str, str] | None = None) -> tuple[Proc, str]:
    base = {**(env or ENV), "SPEEDSLURM_GATEWAY__DIR": str(folder),
            "SPEEDSLURM_GATEWAY__ACCESS_LOG": str(folder / "access.log")}
    key = subprocess.run([PY, "-m", "speedslurm", "gateway", "keys", "add", "bench"], capture_output=True,
                         text=True, env=base, check=True).stdout.strip()
    argv = [PY, "-m", "speedslurm", *[a for s in sets for a in ("--set", s)], "gateway", "--listen", "127.0.0.1:0",
            *[a for m in models for a in ("--model", m)]]
    return Proc(argv, r"serves (http://\S+)/v1", base), key


def med(values: list[float]) -> str:
    return f"{statistics.median(values):.3g} ({min(values):.3g}-{max(values):.3g})"


# ------------------------------------------------------------------------------------------ parts


def p8_stub(reps: int, n: int, rows: list[list[str]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        s = stub()
        g, key = gateway(Path(tmp), [f"m={s.url}"], "gateway.models.m.slots=64")
        try:
            load(s.url, key, 500, 8)  # warm both up
            load(g.url, key, 500, 8)
            for conc in (1, 8, 32):
                direct, through = [], []
                for _ in range(reps):
                    direct.append(load(s.url, key, n, conc))
                    through.append(load(g.url, key, n, conc))
                ratio = [t["rps"] / d["rps"] for d, t in zip(direct, through, strict=True)]
                added = [t["p50_ms"] - d["p50_ms"] for d, t in zip(direct, through, strict=True)]
                rows.append([f"P8 stub, concurrency {conc}", f"{med([d['rps'] for d in direct])} req/s",
                             f"{med([t['rps'] for t in through])} req/s", f"{med(ratio)}x", f"+{med(added)} ms p50",
                             ">= 0.90x, <= +1 ms"])
            firsts_d, firsts_t = [], []
            for _ in range(reps):
                firsts_d.append(load(s.url, key, 200, 1, stream=True))
                firsts_t.append(load(g.url, key, 200, 1, stream=True))
            added = [t["p50_ms"] - d["p50_ms"] for d, t in zip(firsts_d, firsts_t, strict=True)]
            rows.append(["P8 stub, first streamed chunk", f"{med([d['p50_ms'] for d in firsts_d])} ms",
                         f"{med([t['p50_ms'] for t in firsts_t])} ms", "", f"+{med(added)} ms", "<= +5 ms"])
        finally:
            g.stop()
            s.stop()


def _bed_env(tmp: Path) -> dict[str, str]:
    return {**ENV, "SPEEDSLURM_PROFILE": "testbed", "SPEEDSLURM_RUN__DIR": str(tmp / "runs")}


def _up(env: dict[str, str], model: str) -> dict[str, tp.Any]:
    out = subprocess.run([PY, "-m", "speedslurm", "up", "--model", model, "--nodes", "1", "--json", "--timeout", "600"],
                         capture_output=True, text=True, env=env, timeout=900, check=True)
    dep = json.loads(out.stdout)
    shown = subprocess.run([PY, "-m", "speedslurm", "endpoint", dep["deployment"], "--json", "--show-key"],
                           capture_output=True, text=True, env=env, check=True)
    return {"id": dep["deployment"], **json.loads(shown.stdout)[0]}


def _down(env: dict[str, str], ident: str) -> None:
    subprocess.run([PY, "-m", "speedslurm", "down", ident], capture_output=True, env=env, timeout=300)


def _ask(url: str, key: str, model: str, timeout: float = 900) -> float:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}).encode()
    req = urllib.request.Request(url + "/v1/chat/completions", data=body, headers={
        "Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        resp.read()
    return time.perf_counter() - t0


def p8_real(reps: int, n: int, rows: list[list[str]], model: str) -> None:
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as t:
        tmp = Path(t)
        env = _bed_env(tmp)
        ep = _up(env, model)
        try:
            keyfile = tmp / "backend.key"
            keyfile.write_text(ep["api_key"])
            g, key = gateway(tmp / "gw", [f"m={ep['url']}"], f"gateway.models.m.api_key_file={keyfile}", env=env)
            try:
                conc = int(ep.get("parallel") or 4)
                direct, through = [], []
                for _ in range(reps):
                    direct.append(_real_load(ep["url"], ep["api_key"], n, conc))
                    through.append(_real_load(g.url, key, n, conc))
                ratio = [b / a for a, b in zip(direct, through, strict=True)]
                rows.append([f"P8 real deployment ({model}, 1 node), concurrency {conc}",
                             f"{med(direct)} req/s", f"{med(through)} req/s", f"{med(ratio)}x", "", ">= 0.90x"])
            finally:
                g.stop()
        finally:
            _down(env, ep["id"])


def _real_load(url: str, key: str, n: int, concurrency: int) -> float:
    import concurrent.futures

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(lambda _i: _ask(url, key, "m"), range(n)))
    return n / (time.perf_counter() - t0)


def p9(reps: int, rows: list[list[str]], model: str) -> None:
    hand, cold = [], []
    for _ in range(reps):
        with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as t:
            tmp = Path(t)
            env = _bed_env(tmp)
            t0 = time.perf_counter()
            ep = _up(env, model)
            _ask(ep["url"], ep["api_key"], "x")
            hand.append(time.perf_counter() - t0)
            _down(env, ep["id"])
            g, key = gateway(tmp / "gw", [f"m={model}"], "gateway.models.m.nodes=1", env=env)
            try:
                cold.append(_ask(g.url, key, "m"))
            finally:
                g.stop()
    ratio = [c / h for h, c in zip(hand, cold, strict=True)]
    rows.append([f"P9 cold start ({model}, 1 node)", f"{med(hand)} s (up, then the request)",
                 f"{med(cold)} s (first request, cold)", f"{med(ratio)}x", "", "<= 1.10x"])


def load_part(n: int, rows: list[list[str]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        a, b = stub(), stub()
        g, first = gateway(folder, [f"m={a.url},{b.url}"], "gateway.models.m.slots=16")
        try:
            env = {**ENV, "SPEEDSLURM_GATEWAY__DIR": str(folder)}
            keys = [first] + [subprocess.run([PY, "-m", "speedslurm", "gateway", "keys", "add", f"user{i}"],
                                             capture_output=True, text=True, env=env, check=True).stdout.strip()
                              for i in (2, 3)]
            per = [n // 3 + (1 if i < n % 3 else 0) for i in range(3)]
            t0 = time.perf_counter()
            procs = [subprocess.Popen([PY, __file__, "--worker", g.url, k, str(c), "16", "plain", f"k{i}"],
                                      stdout=subprocess.PIPE, text=True, env=ENV)
                     for i, (k, c) in enumerate(zip(keys, per, strict=True))]
            results = [json.loads(p.communicate()[0]) for p in procs]
            elapsed = time.perf_counter() - t0
            usage = json.loads(subprocess.run([PY, "-m", "speedslurm", "gateway", "usage", "--json"],
                                              capture_output=True, text=True, env=env, check=True).stdout)
            served = _stub_completions(a) + _stub_completions(b)
            counted = sorted(int(row["requests"]) for row in usage["keys"].values())
            wrong = sum(r["wrong"] for r in results)
            rows.append([f"Load: {n} requests, 3 keys at once, 2 stub replicas",
                         f"{served} answered by the replicas", f"{n - wrong} right answers in {elapsed:.1f} s",
                         f"per-key counts {counted} (sent {sorted(per)})", f"gateway peak RSS {g.peak_rss_mb():.0f} MB",
                         "each answered once, counts equal"])
        finally:
            g.stop()
            a.stop()
            b.stop()


def _stub_completions(s: Proc) -> int:
    """The stub's own count of answered completions (``GET /stats``)."""
    with urllib.request.urlopen(s.url + "/stats", timeout=10) as resp:
        return int(json.loads(resp.read())["completions"])


# ------------------------------------------------------------------------------------------ main


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker_main(sys.argv[2:])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", default="p8,p8r,p9,load")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--model", default="gemma-3-270m", help="the bed's model for p8r and p9")
    ap.add_argument("--no-doc", action="store_true")
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    reps = args.reps or (1 if args.quick else 3)
    rows: list[list[str]] = []
    if "p8" in parts:
        p8_stub(reps, 2000 if args.quick else 10000, rows)
    if "p8r" in parts:
        p8_real(reps, 32 if args.quick else 96, rows, args.model)
    if "p9" in parts:
        p9(reps if not args.quick else 1, rows, args.model)
    if "load" in parts:
        load_part(3000 if args.quick else 10000, rows)
    head = ["figure", "direct / by hand", "through the gateway", "ratio", "added", "goal"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    table = "\n".join(lines)
    print(table)
    if not args.no_doc:
        when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        doc = (f"# Gateway benchmarks\n\n`python bench/bench_gateway.py{' --quick' if args.quick else ''}` on "
               f"{platform.node() and 'this machine'} ({os.cpu_count()} cores, {platform.python_version()}), {when}. "
               "The servers, the gateway and the load generators share the machine's cores.\n\n"
               f"{(__doc__ or '').split(chr(10) + chr(10))[0]}\n\n{table}\n")
        (ROOT / "docs" / "gateway-benchmarks.md").write_text(doc)


if __name__ == "__main__":
    main()
