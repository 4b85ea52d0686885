"""Idle release without a cluster: durations, the activity rule over llama-server's /metrics, the leader's and a
follower's supervision ending cleanly, the client's check of the setting and ``status`` saying why it ended."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import typing as tp
from pathlib import Path

import localhttp
import pytest
import records
from repo import REPO

from speedslurm.cluster import slurm
from speedslurm.deployments.status import statuses_of
from speedslurm.errors import CommandError
from speedslurm.node.children import Child, Stop
from speedslurm.node.idle import (
    IdleWatch,
    check_interval,
    format_duration,
    is_active,
    parse_duration,
    parse_metrics,
)
from speedslurm.rundir.layout import Deployment, RunDir, make_private_dir
from speedslurm.rundir.records import Failed

# ------------------------------------------------------------------------------------------------ durations


@pytest.mark.parametrize(("text", "seconds"), [("90s", 90), ("30m", 1800), ("2h", 7200), ("1d", 86400),
                                               ("1h30m", 5400), ("0", 0), ("20", 20), (45, 45), ("1.5m", 90),
                                               (" 2H ", 7200)])
def test_durations_in_seconds_minutes_and_hours(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "5x", "m", "30 minutes", "-5", "1h-30m", "h30"])
def test_a_bad_duration_is_refused_with_the_forms(text: str) -> None:
    with pytest.raises(ValueError, match=r"not a duration|negative"):
        parse_duration(text)


def test_durations_print_in_their_shortest_form() -> None:
    assert [format_duration(s) for s in (20, 90, 1800, 5400, 7200)] == ["20s", "1m30s", "30m", "1h30m", "2h"]


# ------------------------------------------------------------------------------------------ activity rule

PAGE = """# HELP llamacpp:prompt_tokens_total Number of prompt tokens processed.
# TYPE llamacpp:prompt_tokens_total counter
llamacpp:prompt_tokens_total {prompt}
llamacpp:tokens_predicted_total {predicted}
llamacpp:n_decode_total {decode}
llamacpp:requests_processing {processing}
llamacpp:requests_deferred {deferred}
"""


def page(prompt: int = 0, predicted: int = 0, decode: int = 0, processing: int = 0, deferred: int = 0) -> str:
    return PAGE.format(prompt=prompt, predicted=predicted, decode=decode, processing=processing, deferred=deferred)


def sample(**kw: int) -> dict[str, float]:
    return parse_metrics(page(**kw))


def test_activity_is_a_request_in_flight_or_waiting_or_a_counter_that_grew() -> None:
    quiet = sample(prompt=10, predicted=20, decode=5)
    assert not is_active(None, quiet)
    assert not is_active(quiet, quiet)
    assert is_active(quiet, sample(prompt=10, predicted=20, decode=5, processing=1))  # a long prompt, no token yet
    assert is_active(quiet, sample(prompt=10, predicted=20, decode=5, deferred=2))    # waiting for a slot
    # A request that came and went between two samples: only its counters tell.
    assert is_active(quiet, sample(prompt=17, predicted=20, decode=5))
    assert is_active(quiet, sample(prompt=10, predicted=21, decode=6))
    assert is_active(None, sample(processing=1))
    assert not is_active(quiet, {})  # a page without the metrics is no activity


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Ticks(Clock):
    """A clock that moves on by ``step`` each time it is read."""

    def __init__(self, step: float) -> None:
        super().__init__()
        self.step = step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def run_watch(timeout_s: float, pages: tp.Callable[[float], dict[str, float]], until: float,
              step: float = 0.5) -> tuple[float | None, int]:
    """Drive an IdleWatch as the supervision loop does (a check every ``step`` s) with the metrics ``pages(t)``
    gives at time t; (the time it said idle or None, the number of /metrics reads)."""
    clock = Clock()
    reads = []

    def read() -> dict[str, float]:
        reads.append(clock.now)
        return pages(clock.now)

    watch = IdleWatch(timeout_s, read, clock)
    while clock.now <= until:
        if watch.idle():
            return clock.now, len(reads)
        clock.now += step
    return None, len(reads)


def test_a_replica_nobody_uses_is_idle_once_the_timeout_passed_and_not_before() -> None:
    at, reads = run_watch(20, lambda t: sample(prompt=100, predicted=50), until=60)
    assert at is not None and 20 <= at <= 20 + check_interval(20)
    assert reads <= at / check_interval(20) + 1  # sampled every 2 s, not every loop turn


def test_requests_coming_keep_it_alive_and_the_clock_starts_again_after_the_last() -> None:
    # A request every 8 s until t=60 (tokens counted), then nothing.
    def pages(t: float) -> dict[str, float]:
        n = int(min(t, 60) // 8)
        return sample(prompt=10 * n, predicted=5 * n, decode=5 * n)

    at, _ = run_watch(20, pages, until=200)
    assert at is not None and 56 + 20 <= at <= 60 + 20 + 2 * check_interval(20)


def test_a_batch_with_a_long_request_in_flight_is_not_idle() -> None:
    # One request processes for 100 s with no counter moving (a huge prompt): requests_processing says so.
    at, _ = run_watch(20, lambda t: sample(prompt=5, processing=1 if t < 100 else 0), until=200)
    assert at is not None and 100 + 20 - check_interval(20) <= at <= 100 + 20 + check_interval(20)


def test_unreadable_metrics_are_not_taken_for_idleness() -> None:
    def pages(t: float) -> dict[str, float]:
        raise OSError("connection refused")

    assert run_watch(20, pages, until=200)[0] is None


def test_timeout_zero_never_reads_metrics() -> None:
    assert run_watch(0, lambda t: sample(), until=10_000) == (None, 0)


# ------------------------------------------------------------------------------------------ supervision


class Metrics(localhttp.Handler):
    pages: tp.ClassVar[list[str]] = []
    keys: tp.ClassVar[list[str]] = []

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.keys.append(self.headers.get("Authorization", ""))
        body = (self.pages[0] if self.path == "/metrics" and self.pages else "").encode()
        self.reply(200 if self.path == "/metrics" else 404, body)


@pytest.fixture
def metrics_server() -> tp.Iterator[str]:
    Metrics.pages[:] = [page(prompt=3)]
    Metrics.keys.clear()
    with localhttp.serving(Metrics) as url:
        yield url


def test_the_leader_stops_its_server_and_records_idle_then_a_follower_ends_cleanly(
        tmp_path: Path, metrics_server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from speedslurm.node import roles as jobside
    from speedslurm.node.idle import read_metrics

    monkeypatch.setenv("SPEEDSLURM_JOB_ID", "77")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    rd = RunDir(make_private_dir(tmp_path / "dep"))
    make_private_dir(rd.replica_dir(0))
    server = Child([sys.executable, "-c", "import time; time.sleep(60)"], tmp_path / "server.log", {})
    follower = Child([sys.executable, "-c", "import time; time.sleep(60)"], tmp_path / "rpc.log", {})
    clock = Ticks(0.25)  # the watch's clock: a quarter of a second more at each look, whatever the machine
    watch = IdleWatch(2.0, lambda: read_metrics(metrics_server, "sekrit"), clock)
    with pytest.raises(jobside.Ended) as ended:
        jobside._supervise(server, rd, 0, Stop(), "llama-server", 0.05, idle=watch)
    assert ended.value.cause == "idle" and "no request for 2s" in ended.value.reason
    assert 2.0 <= clock.now <= 2.0 + check_interval(2.0) + clock.step, clock.now
    assert server.poll() is not None  # llama-server stopped
    assert Metrics.keys and set(Metrics.keys) == {"Bearer sekrit"}  # read with the API key
    jobside._fail(rd, 0, "leader", 0, ended.value, cause=ended.value.cause)
    record = rd.failure(0)
    assert isinstance(record, Failed) and record.cause == "idle" and record.job_id == "77"
    # The follower's loop sees the leader's record: it stops its rpc-server and ends as an end, not a failure.
    with pytest.raises(jobside.Ended, match=r"the replica ended \(idle\)"):
        jobside._supervise(follower, rd, 0, Stop(), "rpc-server", 0.05)
    assert follower.poll() is not None


def test_requests_keep_the_leader_serving(tmp_path: Path, metrics_server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from speedslurm.node import roles as jobside
    from speedslurm.node.idle import read_metrics

    monkeypatch.setenv("SPEEDSLURM_JOB_ID", "78")
    rd = RunDir(make_private_dir(tmp_path / "dep"))
    make_private_dir(rd.replica_dir(0))
    server = Child([sys.executable, "-c", "import time; time.sleep(60)"], tmp_path / "server.log", {})
    stop = Stop()
    done: list[BaseException | None] = []
    clock = Clock()  # the watch's clock, moved by the test: one second per request
    reads = Metrics.keys  # one entry per page read

    def supervise() -> None:
        try:
            jobside._supervise(server, rd, 0, stop, "llama-server", 0.05,
                               idle=IdleWatch(1.5, lambda: read_metrics(metrics_server, "k"), clock))
            done.append(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            done.append(exc)

    thread = threading.Thread(target=supervise)
    thread.start()
    _wait_reads(reads, 1, done)
    assert check_interval(1.5) == 1.0  # so that the watch samples the page at each second
    for n in range(1, 9):  # 8 s of requests, each counted by llama-server's token counter
        Metrics.pages[:] = [page(prompt=3 + n)]
        clock.now = float(n)
        _wait_reads(reads, 1 + n, done)  # the watch saw it
    assert not done and server.poll() is None  # still serving, well past the 1.5 s timeout
    stop(15, None)
    thread.join(5)
    assert done == [None]


def _wait_reads(reads: list[str], n: int, done: list[BaseException | None]) -> None:
    """Until the watch has read the metrics page ``n`` times (a guard against a hang only)."""
    deadline = time.monotonic() + 30
    while len(reads) < n:
        assert not done, done
        assert time.monotonic() < deadline, f"the watch read the page {len(reads)} times, not {n}"
        time.sleep(0.01)


# ------------------------------------------------------------------------------------------ client side


def test_up_refuses_a_bad_idle_timeout_before_anything_is_queued(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, "-m", "speedslurm", "--set", f"run.dir={tmp_path}/runs", "up", "-m",
                          "nothing-of-the-kind", "--executor", "local", "--idle-timeout", "5 minutes"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2, run.stderr
    assert "llama.idle_timeout" in run.stderr and "'5 minutes' is not a duration" in run.stderr
    assert "--idle-timeout 30m" in run.stderr  # the fix
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_the_setting_has_a_default_of_30m_on_the_lab_cluster_and_never_elsewhere() -> None:
    from speedslurm.settings.settings import load_settings

    assert parse_duration(load_settings(profile="gorgonas").llama.idle_timeout) == 1800
    assert parse_duration(load_settings(profile="testbed").llama.idle_timeout) == 0
    flag = load_settings(profile="gorgonas", cli={"llama.idle_timeout": "90s"})
    assert flag.llama.idle_timeout == "90s"


def test_status_says_a_replica_ended_because_idle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def call(argv: list[str], **kw: tp.Any) -> str:
        if argv[0] == "squeue":
            raise CommandError(argv, 1, "", "slurm_load_jobs error: Invalid job id specified")
        return "".join(f"{j}|COMPLETED|0:0|n1\n" for j in ("300", "301"))

    monkeypatch.setattr(slurm, "call", call)
    deps = []
    for name, job in (("idle-one", "300"), ("done-one", "301")):
        rd = RunDir(make_private_dir(tmp_path / name))
        info = records.deployment(rd.root, job_ids=[job], nodes=2)
        make_private_dir(rd.replica_dir(0))
        deps.append(Deployment(rd, info))
    rd = deps[0].run_dir
    rd.failed_path(0).write_text(json.dumps(records.failed(
        job_id="300", cause="idle", reason="no request for 20s (llama.idle_timeout): llama-server and its "
        "rpc-servers stopped, the job ends and frees its nodes")))
    rows = statuses_of(deps)
    assert (rows[0][0].state, rows[0][0].why) == ("ENDED", "idle")
    assert rows[0][0].to_json()["failure"]["cause"] == "idle"
    assert (rows[1][0].state, rows[1][0].why) == ("ENDED", "completed")


def test_the_templates_idle_timeout_reaches_the_job_side_and_a_bad_one_is_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from speedslurm.node.roles import idle_timeout_s
    from speedslurm.node.template import parser, prepare

    base = ["hetjob", "--model", str(tmp_path / "m.gguf"), "--run-dir", str(tmp_path / "dep")]
    rd = prepare(parser().parse_args([*base, "--idle-timeout", "30m"]), 0, ["41"], 2, {})
    dep = rd.deployment_record()
    assert dep is not None and idle_timeout_s(dep.llama) == 1800
    assert idle_timeout_s({}) == 0  # a deployment.json without the key (an older client's): never
    with pytest.raises(SystemExit):
        parser().parse_args([*base, "--idle-timeout", "half an hour"])
    assert "IDLE_TIMEOUT: 'half an hour' is not a duration" in capsys.readouterr().err
    for name in ("llama-rpc-hetjob.sbatch", "llama-rpc-array.sbatch"):
        text = (REPO / "sbatch_templates" / name).read_text()
        assert ': "${IDLE_TIMEOUT:=0}"' in text and '--idle-timeout "$IDLE_TIMEOUT"' in text
