"""Handover under traffic: requests without pause through ``speedslurm gateway`` across three of a deployment's
time limits, on the test bed; prints the timeline and writes docs/gateway-handover.md.

Replicas of the tiny random-weight llama on 1 node with a 2-minute Slurm time limit (``gateway.models.tiny.time=2``;
Slurm's warning may stop the servers a minute before the end) and ``gateway.handover_before_s=30``. Two clients
send non-streamed requests one after the other, each its own, for three time limits (6 minutes) and at least
three handovers, until a deployment that was not handed over answered. Reported: every request's outcome (goal: 0 failed), the most deployments alive at once (goal:
<= 2; ``gateway status`` looked at every 0.5 s), and for each handover when the successor was started, when it
took over (the old one drained), when the old one's job was cancelled, and the longest gap between two answers
around it.

    flock /tmp/bed.lock .venv/bin/python bench/bench_gateway_handover.py      # about 5 minutes
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import threading
import time
import typing as tp
from pathlib import Path

from bench_gateway_day import ENV, ROOT, GatewayProc, accounting, cancel, cli, job_ids_under, log, pct

DOC = ROOT / "docs" / "gateway-handover.md"
TIME_LIMIT = "2"
BEFORE_S = 30
HANDOVERS = 3
LIMITS = 3  # the load lasts this many of a job's time limits
MAX_TOKENS = 8
CLIENTS = 2
GUARD_S = 900.0  # against a hang only: the load lasts 6 minutes


def run(tmp: Path, model: Path) -> dict[str, tp.Any]:
    import openai

    env = {**ENV, "SPEEDSLURM_PROFILE": "testbed", "SPEEDSLURM_RUN__DIR": str(tmp / "runs"),
           "SPEEDSLURM_GATEWAY__DIR": str(tmp / "gw")}
    key = cli(env, "gateway", "keys", "add", "steady").strip()
    sets = {"gateway.models.tiny.nodes": "1", "gateway.models.tiny.time": TIME_LIMIT,
            "gateway.handover_before_s": str(BEFORE_S), "gateway.idle_timeout": "0"}
    gw = GatewayProc(env, [*[a for k, v in sets.items() for a in ("--set", f"{k}={v}")], "gateway", "--listen",
                           "127.0.0.1:0", "--model", f"tiny={model}"])
    t0 = time.time()
    answers: list[tuple[float, int]] = []  # (wall time answered, status or 0 for an exception)
    failures: list[str] = []
    stop = threading.Event()
    lock = threading.Lock()

    def client() -> None:
        c = openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0, timeout=300)
        while not stop.is_set():
            try:
                r = c.chat.completions.with_raw_response.create(
                    model="tiny", messages=[{"role": "user", "content": "Say something"}], max_tokens=MAX_TOKENS)
                status = r.http_response.status_code
            except openai.OpenAIError as exc:
                status = 0
                with lock:
                    failures.append(repr(exc)[:200])
            with lock:
                answers.append((time.time(), status))

    alive_most = 0
    samples: list[tuple[float, int]] = []
    handed: list[dict[str, tp.Any]] = []
    status: dict[str, tp.Any] = {}
    threads = [threading.Thread(target=client, daemon=True) for _ in range(CLIENTS)]
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + GUARD_S
        while time.monotonic() < deadline:
            status = json.loads(cli(env, "gateway", "status", "--json"))
            deps = status["aliases"][0]["deployments"]
            alive = len([d for d in deps if d["state"] not in ("ENDED", "FAILED")])
            alive_most = max(alive_most, alive)
            samples.append((time.time(), alive))
            handed = [d for d in status["decisions"] if d["decision"] == "drain" and d["why"] == "handed over"]
            if len(handed) >= HANDOVERS and time.time() - t0 >= LIMITS * int(TIME_LIMIT) * 60 and any(d["state"] == "READY" and d["served"] > 0 and d["deployment"]
                                                not in {h["deployment"] for h in handed} for d in deps):
                break
            time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join(300)
        code = gw.stop()
        ids = job_ids_under(tmp / "runs")
        cancel(ids)
    acct = accounting(ids)
    starts = [d for d in status.get("decisions", []) if d["decision"] == "handover"]
    stopped = {e["deployment"]: t for t, e in gw.named("replica_stopped")}
    mono_to_wall = time.time() - time.monotonic()
    done = sorted(t for t, _s in answers)
    rows = []
    for h in handed:
        old = h["deployment"]
        start = next((d["time"] for d in starts if d["deployment"] == old), None)
        end = stopped[old] + mono_to_wall if old in stopped else h["time"]
        window = [t for t in done if (start or h["time"]) - 1 <= t <= end + 1]
        gap = max((b - a for a, b in zip(window, window[1:], strict=False)), default=float("nan"))
        rows.append({"old": old, "new": h.get("successor"), "successor_started_s": None if start is None
                     else round(start - t0, 1), "took_over_s": round(h["time"] - t0, 1),
                     "old_cancelled_s": round(end - t0, 1), "in_flight_at_drain": h.get("in_flight"),
                     "longest_gap_s": round(gap, 3)})
    every_gap = [b - a for a, b in zip(done, done[1:], strict=False)]
    return {"answers": len(answers), "ok": sum(1 for _t, s in answers if s == 200),
            "failed": sum(1 for _t, s in answers if s != 200), "failures": failures[:5],
            "alive_most": alive_most, "handovers": rows, "wall_s": round(time.time() - t0, 1),
            "gap_p50_s": round(pct(every_gap, 50), 3), "gap_max_s": round(max(every_gap, default=0), 3),
            "gateway_exit": code, "jobs": [{k: r[k] for k in ("job", "state", "elapsed_s")} for r in acct["rows"]]}


def render(res: dict[str, tp.Any]) -> str:
    lines = [
        "# Handover under traffic",
        "",
        f"Measured {datetime.date.today().isoformat()} on the test bed (4 nodes in network namespaces sharing "
        f"{os.cpu_count()} cores of {platform.processor() or platform.machine()}) by `bench/bench_gateway_handover.py`.",
        "",
        f"Replicas of the tiny llama on 1 node, Slurm time limit {TIME_LIMIT} minutes (the servers may stop a minute "
        f"before it, at Slurm's warning), `gateway.handover_before_s={BEFORE_S}`; {CLIENTS} clients sending "
        f"non-streamed requests ({MAX_TOKENS} tokens) one after the other for {LIMITS} time limits "
        f"({LIMITS * int(TIME_LIMIT)} minutes), until a deployment that was not handed over answered. Each deployment "
        "serves about 30 s: its successor starts `handover_before_s` before the servers may stop (a minute before "
        "the limit) and takes over once ready.",
        "",
        "| figure | measured | goal |",
        "|---|---|---|",
        f"| requests answered | {res['answers']} in {res['wall_s']:.0f} s | |",
        f"| failed requests | {res['failed']} | 0 |",
        f"| deployments alive at once, most | {res['alive_most']} | <= 2 |",
        f"| gap between two answers: median, longest over the run | {res['gap_p50_s'] * 1000:.0f} ms, "
        f"{res['gap_max_s'] * 1000:.0f} ms | |",
        "",
        "Each handover (seconds since the first request; the successor is started `handover_before_s` before the "
        "old replica's servers may stop, takes over once ready, and the old one is cancelled when its last "
        "request is done):",
        "",
        "| old -> new | successor started | took over | old cancelled | in flight at the switch | "
        "longest gap between answers |",
        "|---|---|---|---|---|---|",
    ]
    for r in res["handovers"]:
        lines.append(f"| {r['old']} -> {r['new']} | {r['successor_started_s']} s | {r['took_over_s']} s | "
                     f"{r['old_cancelled_s']} s | {r['in_flight_at_drain']} | {r['longest_gap_s'] * 1000:.0f} ms |")
    lines += ["", "Jobs (Slurm's accounting): " + ", ".join(f"{j['job']} {j['state']} {j['elapsed_s']} s"
                                                          for j in res["jobs"]) + ".", ""]
    met = res["failed"] == 0 and res["alive_most"] <= 2 and len(res["handovers"]) >= HANDOVERS
    lines.append(f"Goal (0 failed, at most 2 alive, {LIMITS} time limits, {len(res['handovers'])} handovers): "
                 f"{'met' if met else 'NOT met'}.")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--no-doc", action="store_true", help=f"do not write {DOC.relative_to(ROOT)}")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from devtools.testmodels import write_tiny_llama_gguf

    tmp = Path(tempfile.mkdtemp(prefix="bench-gateway-handover-", dir=os.environ.get("BENCH_TMP")))
    tmp.chmod(0o755)  # the bed's nodes read the model and write their run folders here
    model = write_tiny_llama_gguf(tmp / "models" / "tiny-llama.gguf")
    res = run(tmp, model)
    log(json.dumps(res))
    text = render(res)
    print(text)
    if not args.no_doc:
        DOC.write_text(text)


if __name__ == "__main__":
    main()
