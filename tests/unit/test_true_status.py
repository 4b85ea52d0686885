"""What a user sees is true: why a deployment ended, a rendered script not yet submitted, Slurm job ids accepted
wherever a deployment id is, and a batch with failed requests told apart by its exit status.

On real components: tests/real/test_true_status_real.py.
"""

from __future__ import annotations

import json
import sys
import time
import typing as tp
from pathlib import Path

import pytest
from inprocess import speedslurm
from repo import REPO

from devtools.stubserver import StubServer

KEY = "true-key"


# ------------------------------------------------------------------------------------------------------------
# A batch with failed requests exits 3


def _prompts(path: Path, long_ids: tp.Sequence[int] = ()) -> Path:
    path.write_text("".join(json.dumps({"custom_id": f"c{i}", "prompt": "x" * (500 if i in long_ids else 5)}) + "\n"
                            for i in range(6)))
    return path


def test_a_batch_with_failed_requests_exits_3_and_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = _prompts(tmp_path / "p.jsonl", long_ids=[2, 4])
    with StubServer(api_key=KEY, max_prompt_chars=100) as stub:  # c2 and c4 exceed the context: 400, no retry
        code, out, err = speedslurm(["run", "--base-url", stub.url, "--api-key", KEY, "--prompts", str(p)], capsys)
        assert code == 3, err
        assert "Error: the batch finished, but 2 of 6 request(s) failed" in err
        assert "Fix: run the same command again to retry them" in err
        code, out, err = speedslurm(["run", "--base-url", stub.url, "--api-key", KEY, "--prompts", str(p), "--json"],
                                    capsys)
        assert code == 3 and json.loads(out)["requests"]["failed"] == 2  # stdout stays the JSON summary
    with StubServer(api_key=KEY) as stub:  # a bigger context: the retry succeeds
        code, out, err = speedslurm(["run", "--base-url", stub.url, "--api-key", KEY, "--prompts", str(p)], capsys)
        assert code == 0, err
        assert "2 ok, 0 failed, 4 skipped" in err


def test_exit_statuses_are_in_the_help_of_run_and_submit(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("run", "submit"):
        code, out, _ = speedslurm([command, "--help"], capsys)
        assert code == 0
        assert "Exit status:" in out and "3    the batch finished, but some requests failed" in out
    readme = (REPO / "README.md").read_text()
    assert "exit 3 when the batch ran to its end" in readme


def test_the_exit_status_contract_lives_in_errors() -> None:
    from speedslurm import errors

    assert errors.RequestsFailed.exit_code == 3
    assert "* 3: a batch ran to its end, but some requests failed" in (errors.__doc__ or "")
    assert sys.modules["speedslurm.errors"] is errors


# ------------------------------------------------------------------------------------------------------------
# Why a deployment ended, and what a rendered one waits for, as `status` shows it (Slurm faked at its commands)


class FakeSlurm:
    """squeue, sacct and scancel as speedslurm calls them, answering from ``queue`` and ``accounting``.

    ``queue``: squeue rows (id, state, reason, nodes, stdout path); ``accounting``: sacct rows (id, state,
    submit line, workdir).
    """

    def __init__(self) -> None:
        self.queue: list[tuple[str, str, str, str, str]] = []
        self.accounting: list[tuple[str, str, str, str]] = []
        self.cancelled: list[str] = []

    def __call__(self, argv: list[str], **kw: tp.Any) -> str:
        from speedslurm.errors import CommandError

        if argv[0] == "scancel":
            self.cancelled += argv[1:]
            for row in self.queue:
                if row[0].split("+")[0].split("_")[0] in argv[1:]:
                    self.accounting.append((row[0], "CANCELLED by 0", "", ""))
            self.queue = [r for r in self.queue if r[0].split("+")[0].split("_")[0] not in argv[1:]]
            return ""
        if argv[0] == "squeue" and "-j" in argv:
            ids = argv[argv.index("-j") + 1].split(",")
            rows = [r for r in self.queue if r[0].split("+")[0].split("_")[0] in ids]
            if not rows:
                raise CommandError(argv, 1, "", "slurm_load_jobs error: Invalid job id specified")
            return "".join(f"{r[0]}|{r[1]}|{r[2]}|{r[3]}\n" for r in rows)
        if argv[0] == "squeue":
            return "".join(f"{r[0]}|{r[4]}|\n" for r in self.queue)
        if argv[0] == "sacct" and "-j" in argv:
            ids = argv[argv.index("-j") + 1].split(",")
            return "".join(f"{r[0]}|{r[1]}|0:0|n1\n" for r in self.accounting
                           if r[0].split("+")[0].split("_")[0] in ids)
        if argv[0] == "sacct":
            return "".join(f"{r[0]}|{r[2]}|{r[3]}\n" for r in self.accounting)
        raise AssertionError(argv)


@pytest.fixture
def fake_slurm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeSlurm:
    from speedslurm.cluster import slurm

    fake = FakeSlurm()
    monkeypatch.setattr(slurm, "call", fake)
    monkeypatch.setattr(slurm, "have_slurm", lambda: True)
    monkeypatch.setenv("SPEEDSLURM_RUN__DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("SPEEDSLURM_PROFILE", "testbed")
    return fake


def _deployment(tmp_path: Path, name: str, job_ids: list[str], replicas: int = 1,
                submitted_by: str = "speedslurm up", **extra: tp.Any) -> Path:
    from speedslurm.rundir.layout import make_private_dir

    root = make_private_dir(tmp_path / "runs")
    rd = make_private_dir(root / name)
    for r in range(replicas):
        make_private_dir(rd / f"r{r}")
    import records

    records.deployment(rd, replicas=replicas, executor="slurm", job_ids=job_ids, model={"name": "tiny", "path": ""},
                       nodes=2, submitted_by=submitted_by, **extra)
    return rd


def _failed(rd: Path, job_id: str, replica: int = 0, **extra: tp.Any) -> None:
    import records

    from speedslurm.rundir.records import write_json_atomic

    fields = {"job_id": job_id, "role": "leader", "rank": 0, "node": "n1", "exit_code": 1,
              "reason": "llama-server on n1 exited with code 1", "log_tail": "", "time": 1_700_000_100.0, **extra}
    write_json_atomic(rd / f"r{replica}" / "failed.json", records.failed(**fields))


def _status(capsys: pytest.CaptureFixture[str], ident: str) -> dict[str, tp.Any]:
    code, out, err = speedslurm(["status", ident, "--json"], capsys)
    assert code == 0, err
    return tp.cast(dict[str, tp.Any], json.loads(out)[0])


def test_a_job_the_user_cancelled_shows_ended_cancelled_even_after_its_servers_failed(
        tmp_path: Path, fake_slurm: FakeSlurm, capsys: pytest.CaptureFixture[str]) -> None:
    rd = _deployment(tmp_path, "dep-scancel", ["70"])
    # scancel killed the followers first; the leader saw its llama-server die before its own SIGTERM came.
    _failed(rd, "70")
    fake_slurm.accounting = [("70+0", "CANCELLED by 0", "", ""), ("70+1", "CANCELLED by 0", "", "")]
    row = _status(capsys, "dep-scancel")
    assert (row["state"], row["why"]) == ("ENDED", "cancelled")
    code, out, _ = speedslurm(["status"], capsys)
    line = next(ln for ln in out.splitlines() if ln.startswith("dep-scancel"))
    assert line.split()[2] == "ENDED" and line.rstrip().endswith("cancelled"), out
    assert "WHY" in out.splitlines()[0]
    code, out, _ = speedslurm(["down", "dep-scancel"], capsys)
    assert code == 0 and out.strip() == "deployment dep-scancel: job(s) 70 had ended already; state ENDED (cancelled)"


def test_down_cancels_and_says_so(tmp_path: Path, fake_slurm: FakeSlurm,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    _deployment(tmp_path, "dep-live", ["71"])
    fake_slurm.queue = [("71+0", "RUNNING", "None", "n1", ""), ("71+1", "RUNNING", "None", "n2", "")]
    code, out, err = speedslurm(["down", "dep-live"], capsys)
    assert code == 0, err
    assert out.strip() == "deployment dep-live: cancelled job(s) 71; state ENDED (cancelled)"
    assert fake_slurm.cancelled == ["71"]


def test_a_failure_that_down_found_stays_the_reason(tmp_path: Path, fake_slurm: FakeSlurm,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    rd = _deployment(tmp_path, "dep-broken", ["72"])
    fake_slurm.queue = [("72+0", "RUNNING", "None", "n1", ""), ("72+1", "RUNNING", "None", "n2", "")]
    _failed(rd, "72", reason="model file /m.gguf does not exist on n1")
    code, out, err = speedslurm(["down", "dep-broken"], capsys)  # what `up` does after a failure
    assert code == 0, err
    row = _status(capsys, "dep-broken")
    assert row["state"] == "FAILED" and "model file /m.gguf does not exist on n1" in row["why"]


@pytest.mark.parametrize(("slurm_state", "failure", "state", "why"), [
    ("TIMEOUT", None, "ENDED", "time limit"),
    ("COMPLETED", {"cause": "time limit", "reason": "the job is reaching its time limit"}, "ENDED", "time limit"),
    ("NODE_FAIL", None, "FAILED", "node failure"),
    ("OUT_OF_MEMORY", None, "FAILED", "out of memory"),
    ("FAILED", {}, "FAILED", "llama-server on n1 exited with code 1"),
    ("COMPLETED", None, "ENDED", "completed"),
])
def test_status_says_why_a_job_ended(tmp_path: Path, fake_slurm: FakeSlurm, capsys: pytest.CaptureFixture[str],
                                     slurm_state: str, failure: dict[str, tp.Any] | None, state: str,
                                     why: str) -> None:
    rd = _deployment(tmp_path, "dep-x", ["73"])
    if failure is not None:
        _failed(rd, "73", **failure)
    fake_slurm.accounting = [("73", slurm_state, "", "")]
    row = _status(capsys, "dep-x")
    assert (row["state"], row["why"]) == (state, why)


def test_a_rendered_script_shows_unsubmitted_until_sbatch_then_its_job(
        tmp_path: Path, fake_slurm: FakeSlurm, capsys: pytest.CaptureFixture[str]) -> None:
    rd = _deployment(tmp_path, "dep-rendered", [], submitted_by="sbatch (speedslurm render)",
                     script=str(tmp_path / "my job.sbatch"))
    row = _status(capsys, "dep-rendered")
    assert row["state"] == "UNSUBMITTED"
    assert row["why"] == f"rendered, not submitted: sbatch {tmp_path / 'my job.sbatch'}"
    code, _, err = speedslurm(["run", "--deployment", "dep-rendered", "--prompts", str(_prompts(tmp_path / "p.jsonl"))],
                              capsys)
    assert code == 2 and "was rendered but not submitted" in err and "sbatch " in err
    code, out, _ = speedslurm(["down", "dep-rendered"], capsys)
    assert code == 0 and "nothing to cancel; state UNSUBMITTED" in out and fake_slurm.cancelled == []

    # `sbatch` printed "Submitted batch job 74"; the job waits in the queue, its id not recorded yet
    fake_slurm.queue = [("74+0", "PENDING", "Resources", "", f"{rd}/submitit/%j_0_log.out"),
                        ("74+1", "PENDING", "Resources", "", "")]
    for ident in ("74", "74+0"):
        row = _status(capsys, ident)
        assert row["id"] == "dep-rendered" and row["job_ids"] == ["74"]
        assert (row["state"], row["why"]) == ("PENDING", "Resources")
    assert json.loads((rd / "deployment.json").read_text())["job_ids"] == ["74"]  # recorded: found from now on
    code, _, err = speedslurm(["endpoint", "74"], capsys)
    assert code == 2 and "deployment dep-rendered has no ready endpoint (state PENDING: Resources)" in err


def test_a_rendered_job_that_ended_before_it_recorded_its_id_is_found_in_accounting(
        tmp_path: Path, fake_slurm: FakeSlurm, capsys: pytest.CaptureFixture[str]) -> None:
    rd = _deployment(tmp_path, "dep-gone", [], submitted_by="sbatch (speedslurm render)")
    fake_slurm.accounting = [("80", "COMPLETED", "sbatch other.sbatch", str(tmp_path)),
                             ("81", "CANCELLED by 0", "sbatch job.sbatch", str(rd))]
    row = _status(capsys, "81")
    assert row["id"] == "dep-gone" and (row["state"], row["why"]) == ("ENDED", "cancelled")


def test_a_rendered_array_knows_every_task_once_one_has_started(
        tmp_path: Path, fake_slurm: FakeSlurm, capsys: pytest.CaptureFixture[str]) -> None:
    _deployment(tmp_path, "dep-array", ["75_0", ""], replicas=2, submitted_by="sbatch (speedslurm render)")
    fake_slurm.queue = [("75_0", "RUNNING", "None", "n1", ""), ("75_1", "PENDING", "Resources", "", "")]
    row = _status(capsys, "75_1")
    assert row["job_ids"] == ["75_0", "75_1"]
    assert [r["state"] for r in row["replicas"]] == ["STARTING", "PENDING"]


@pytest.mark.parametrize("ident", ["76", "76_1", "76_[0-1]", "dep-arr"])
def test_every_command_takes_a_slurm_job_id(tmp_path: Path, fake_slurm: FakeSlurm,
                                            capsys: pytest.CaptureFixture[str], ident: str) -> None:
    from speedslurm.deployments.record import find_deployment
    from speedslurm.settings.settings import load_settings

    _deployment(tmp_path, "dep-arr", ["76_0", "76_1"], replicas=2)
    _deployment(tmp_path, "dep-other", ["77"])
    assert find_deployment(load_settings(), ident).id == "dep-arr"
    fake_slurm.queue = [("76_0", "RUNNING", "None", "n1", ""), ("76_1", "RUNNING", "None", "n3", "")]
    for command in (["status"], ["endpoint"], ["logs"]):
        code, out, err = speedslurm([*command, ident], capsys)
        assert "unknown deployment" not in err, (command, err)
    code, out, err = speedslurm(["status", "78"], capsys)
    assert code == 2 and "unknown deployment '78': no deployment id and no job id of one" in err


def test_accounting_finds_a_script_whose_name_has_a_space(tmp_path: Path, fake_slurm: FakeSlurm) -> None:
    from speedslurm.cluster import slurm

    # sacct keeps the submit line without the shell's quotes
    fake_slurm.accounting = [("90+0", "CANCELLED by 0", "sbatch --parsable my job.sbatch", str(tmp_path)),
                             ("91", "COMPLETED", "sbatch job.sbatch", str(tmp_path / "elsewhere")),
                             ("92", "COMPLETED", "sbatch ../job.sbatch", str(tmp_path / "elsewhere"))]
    assert slurm.accounted_jobs_submitted_from(tmp_path / "my job.sbatch", time.time()) == ["90+0"]
    # unquoted, "sbatch my job.sbatch" may also have been script "my" with argument job.sbatch: both count
    assert slurm.accounted_jobs_submitted_from(tmp_path / "job.sbatch", time.time()) == ["90+0", "92"]


# ------------------------------------------------------------------------------------------------------------
# On the test bed: real Slurm, real llama.cpp


# ------------------------------------------------------------------------------------------------------------
# The demo asks its base model for what a base model does well: continue text

EXAMPLES = REPO / "examples" / "prompts.jsonl"


def test_the_demo_prompts_are_text_completions() -> None:
    lines = [json.loads(line) for line in EXAMPLES.read_text().splitlines()]
    assert len(lines) == 12
    for line in lines:
        body = line.get("body", line)
        assert "messages" not in body, line  # a chat turn: the base model would not follow it
        assert isinstance(body.get("prompt"), str) and line.get("url", "/v1/completions") == "/v1/completions"
        assert body.get("max_tokens"), line  # continuations end where the answer does
