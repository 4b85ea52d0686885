"""The live view's reading of llama-server (``/metrics``, ``/slots``: text captured from the real server while two
requests ran and two waited), the batch progress files, the choice of deployment, and what ``top`` prints."""

from __future__ import annotations

import io
import json
import os
import re
import stat
import threading
import time
import typing as tp
from pathlib import Path

import localhttp
import pytest
from rich.console import Console

from speedslurm.deployments import live
from speedslurm.errors import UsageError
from speedslurm.rundir.batches import (
    PROGRESS_KEEP_S,
    PROGRESS_STALE_S,
    BatchProgressInfo,
    progress_dir,
    read_progress,
    write_progress,
)

GOLDEN = Path(__file__).parent / "golden"
METRICS = (GOLDEN / "llama-metrics-busy.txt").read_text()
SLOTS = json.loads((GOLDEN / "llama-slots-busy.json").read_text())


def test_metrics_text_of_the_real_server_is_parsed() -> None:
    m = live.parse_metrics(METRICS)
    assert m["llamacpp:requests_processing"] == 2
    assert m["llamacpp:requests_deferred"] == 2
    assert m["llamacpp:prompt_tokens_seconds"] == pytest.approx(860.215)
    assert m["llamacpp:predicted_tokens_seconds"] == 0
    assert "# HELP" not in " ".join(m)


def test_slots_of_the_real_server_give_busy_total_and_tokens_held() -> None:
    s = live.slots_from(SLOTS)
    assert (s.busy, s.total, s.n_ctx) == (2, 2, 256)
    assert s.tokens == 2 * (121 + 105)  # prompt + decoded so far, per busy slot


def test_slots_that_are_not_a_list_are_refused() -> None:
    with pytest.raises(ValueError, match="list of slots"):
        live.slots_from({"error": "x"})


def test_replica_numbers_put_together_with_the_kv_use_estimated_from_slots() -> None:
    m = live.metrics_from(0, "http://n1:8080", live.parse_metrics(METRICS), live.slots_from(SLOTS), ctx=512)
    assert (m.slots_busy, m.slots_total, m.requests_waiting) == (2, 2, 2)
    assert m.prompt_tok_s_per_slot == pytest.approx(860.215) and m.generation_tok_s_per_slot == 0
    assert m.prompt_tok_s == pytest.approx(2 * 860.215) and m.generation_tok_s == 0  # the server: x busy slots
    assert m.kv_cache_used == pytest.approx(452 / 512) and m.kv_cache_source == "slots (estimate)"


def test_kv_ratio_from_a_build_that_exports_it_wins() -> None:
    metrics = live.parse_metrics(METRICS + "llamacpp:kv_cache_usage_ratio 0.25\n")
    m = live.metrics_from(0, "u", metrics, live.slots_from(SLOTS), ctx=512)
    assert (m.kv_cache_used, m.kv_cache_source) == (0.25, "metrics")


class _Server(localhttp.Handler):
    key = "sekret"

    def do_GET(self) -> None:  # noqa: N802
        if self.headers.get("Authorization") != f"Bearer {self.key}":
            self.reply(401)
            return
        self.reply(200, METRICS.encode() if self.path == "/metrics" else json.dumps(SLOTS).encode())


@pytest.fixture
def server() -> tp.Iterator[str]:
    with localhttp.serving(_Server) as url:
        yield url


class _Endpoint(tp.NamedTuple):
    url: str
    api_key: str
    replica: int = 0


def test_a_replica_is_asked_with_the_api_key(server: str) -> None:
    m = live.replica_metrics(tp.cast(tp.Any, _Endpoint(server, "sekret")), ctx=512)
    assert m.error == "" and (m.slots_busy, m.slots_total, m.requests_waiting) == (2, 2, 2)


def test_a_wrong_key_is_named_not_shown_as_zero_load(server: str) -> None:
    m = live.replica_metrics(tp.cast(tp.Any, _Endpoint(server, "wrong")))
    assert m.error == "/metrics: HTTP 401" and m.slots_busy is None


def test_progress_is_private_and_read_back(tmp_path: Path) -> None:
    write_progress(tmp_path, results="r.jsonl", total=10, done=4, failed=1, completion_tok_s=12.5,
                   started_at=time.time() - 3)
    files = list(progress_dir(tmp_path).glob("*.json"))
    assert len(files) == 1 and stat.S_IMODE(files[0].stat().st_mode) == 0o600
    (info,) = read_progress(tmp_path)
    assert (info.done, info.total, info.failed, info.status, info.pid) == (4, 10, 1, "running", os.getpid())


def test_progress_not_renewed_is_marked_and_old_ones_dropped(tmp_path: Path) -> None:
    write_progress(tmp_path, results="r", total=10, done=4, failed=0, completion_tok_s=0, started_at=0)
    now = time.time()
    assert read_progress(tmp_path, now + PROGRESS_STALE_S + 1)[0].status == "stopped (no news)"
    assert read_progress(tmp_path, now + PROGRESS_KEEP_S + 1) == []


class _Dep(tp.NamedTuple):
    id: str


class _St(tp.NamedTuple):
    state: str
    why: str = ""


def test_without_an_id_the_only_running_deployment_is_chosen_or_the_choice_named() -> None:
    a, b, c = _Dep("a1"), _Dep("b2"), _Dep("c3")
    pick = tp.cast(tp.Any, live.pick_live)
    assert pick([a, b], [[_St("ENDED")], [_St("READY")]]) is b
    with pytest.raises(UsageError, match=r"2 deployments are running: a1 \(READY\), c3 \(PENDING\)") as exc:
        pick([a, b, c], [[_St("READY")], [_St("FAILED")], [_St("PENDING")]])
    assert "speedslurm top ID" in (exc.value.fix or "")
    with pytest.raises(UsageError, match="no deployment is running"):
        pick([a], [[_St("ENDED")]])


def test_the_view_shows_each_replica_and_the_batch() -> None:
    from speedslurm.cli.top_cmd import render_snapshot

    m = live.metrics_from(0, "http://n1:8080", live.parse_metrics(METRICS), live.slots_from(SLOTS), ctx=512)
    snap = {"deployment": "d-1", "model": "tiny", "state": "READY", "why": "", "time": time.time(),
            "replicas": [{"replica": 0, "state": "READY", "why": "", "job_id": "77", "nodes": "n[1-2]",
                          "metrics": m.to_json()},
                         {"replica": 1, "state": "PENDING", "why": "Resources", "job_id": "78", "nodes": "",
                          "metrics": None}],
            "batches": [{"done": 40, "total": 300, "failed": 0, "completion_tok_s": 55.0, "status": "running",
                         "results": "out.jsonl", "pid": 12, "host": "login"}]}
    con = Console(file=io.StringIO(), width=120)
    con.print(render_snapshot(snap))
    text = tp.cast(io.StringIO, con.file).getvalue()
    assert "deployment d-1  model tiny  READY" in text
    row = next(line for line in text.splitlines() if line.startswith("0 "))
    assert row.split() == ["0", "READY", "77", "2/2", "2", "1720.4", "0.0", "88%", "(est.)"]
    assert "Resources" in next(line for line in text.splitlines() if line.startswith("1 "))
    assert "40/300 done (13%), 0 failed, 55.0 completion tok/s, running  out.jsonl" in text


def test_a_refreshing_view_asks_slurm_less_and_less_while_nothing_changes(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import records

    from speedslurm.cluster import slurm
    from speedslurm.rundir.layout import Deployment, RunDir, make_private_dir

    calls: list[str] = []

    def fake(argv: list[str], **kw: tp.Any) -> str:
        calls.append(argv[0])
        return "42|PENDING|Resources|(null)|0|0:00|2\n"

    monkeypatch.setattr(slurm, "call", fake)
    rd = RunDir(make_private_dir(tmp_path / "d"))
    dep = Deployment(rd, records.deployment(rd.root, replicas=1, job_ids=["42"], nodes=2))
    make_private_dir(rd.replica_dir(0))
    now = [0.0]
    probe = live.StatusesProbe(clock=lambda: now[0])
    for _ in range(120):  # `status --watch --interval 1` for two minutes, the job waiting in the queue
        (statuses,) = probe([dep])
        assert statuses[0].state == "PENDING"
        now[0] += 1.0
    assert calls == ["squeue"] * len(calls) and 5 <= len(calls) <= 8  # 1, 2, 4, 8, 16, 30, 30, ... s apart


def test_status_watch_refreshes_without_asking_slurm_each_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    import records

    from speedslurm.cli import main
    from speedslurm.cluster import slurm
    from speedslurm.rundir.layout import Deployment, RunDir, make_private_dir

    calls: list[str] = []

    def fake(argv: list[str], **kw: tp.Any) -> str:
        calls.append(argv[0])
        return "42|PENDING|Resources|(null)|0|0:00|2\n"

    monkeypatch.setattr(slurm, "call", fake)
    monkeypatch.setenv("SPEEDSLURM_RUN__DIR", str(tmp_path))
    monkeypatch.setenv("SPEEDSLURM_PROFILE", "testbed")
    rd = RunDir(make_private_dir(tmp_path / "d"))
    dep = Deployment(rd, records.deployment(rd.root, replicas=1, job_ids=["42"], nodes=2))
    make_private_dir(rd.replica_dir(0))
    try:
        main(["status", dep.id, "--watch", "--count", "3", "--interval", "0.2", "--json"])
    except SystemExit as exc:
        assert exc.code in (0, None)
    out = capsys.readouterr().out
    views = [json.loads(chunk) for chunk in out.replace("]\n[", "]\x00[").split("\x00")]
    assert len(views) == 3 and all(v[0]["state"] == "PENDING" and v[0]["why"] == "Resources" for v in views)
    assert calls == ["squeue"]  # 0.4 s of views: Slurm was asked once (next after 1 s, then 2, 4, ... 30)


def test_a_batch_publishes_its_progress_in_the_run_directory(tmp_path: Path) -> None:
    from test_batch_runner import KEY, endpoint, prompts_file, run, write_endpoint

    from devtools.stubserver import StubServer
    from speedslurm.batch.sources import RunDirSource
    from speedslurm.rundir.layout import RunDir

    prompts = prompts_file(tmp_path, 60)
    rd = RunDir(tmp_path / "dep")
    server = StubServer(api_key=KEY, latency=0.05, slots=2).start()
    write_endpoint(rd, endpoint(server.url, 0))
    seen: list[BatchProgressInfo] = []

    def watch() -> None:
        while not seen or seen[-1].status == "running":
            seen.extend(read_progress(rd.root))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    source = RunDirSource(rd, 1)
    source.usage = lambda start, end: {"node_hours": (end - start) * 2 / 3600, "gpu_hours": None,
                                       "node_hours_source": "slurm (running)"}
    try:
        s = run(source, prompts)
    finally:
        server.stop()
    watcher.join(timeout=5)
    running = [p for p in seen if p.status == "running"]
    assert running and any(0 < p.done < 60 for p in running) and all(p.total == 60 for p in seen)
    assert seen[-1].status == "completed" and seen[-1].done == 60
    (path,) = progress_dir(rd.root).glob("*.json")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert s.usage is not None and s.to_json()["node_hours"] == pytest.approx(2 * s.wall_s / 3600, rel=0.2)


@pytest.mark.parametrize("term", ["dumb", "xterm-256color"])
def test_top_on_a_terminal_shows_every_view(tmp_path: Path, term: str) -> None:
    """``top --count 3`` on a terminal shows three views: redrawn in place where the terminal moves the cursor,
    one after another on a dumb one (TERM=dumb), where a live display would show only the last."""
    import sys

    import records
    from terminal import on_a_terminal

    from speedslurm.rundir.layout import RunDir, make_private_dir

    bin_dir = tmp_path / "bin"  # Slurm, as squeue answers for a job waiting in the queue
    bin_dir.mkdir()
    (bin_dir / "squeue").write_text("#!/bin/sh\necho '42|PENDING|Resources|(null)|0|0:00|2|10:00'\n")
    (bin_dir / "squeue").chmod(0o755)
    rd = RunDir(make_private_dir(tmp_path / "runs" / "d-top"))
    records.deployment(rd.root, replicas=1, job_ids=["42"], nodes=2)
    make_private_dir(rd.replica_dir(0))
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(tmp_path), "TERM": term, "LANG": "C.UTF-8",
           "SPEEDSLURM_RUN__DIR": str(tmp_path / "runs"), "SPEEDSLURM_PROFILE": "testbed"}
    code, screen = on_a_terminal([sys.executable, "-m", "speedslurm", "top", "d-top", "--count", "3",
                                  "--interval", "0.2"], env)
    assert code == 0, screen
    rows = re.findall(r"^0\s+PENDING\s+42\s+Resources", re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen), re.M)
    if term == "dumb":
        assert screen.count("REPLICA") == 3 and len(rows) == 3, screen
    else:  # the live display draws the last view once more as it ends
        assert screen.count("REPLICA") >= 3 and len(rows) >= 3, screen
    moves = re.search(r"\x1b\[\d*A", screen)  # cursor up: the view is redrawn over the last one
    assert bool(moves) == (term != "dumb"), screen
