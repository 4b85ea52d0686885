"""What a user sees is true, on real components: a job cancelled with scancel shows cancelled, a rendered
script is unsubmitted until sbatch and its job id works everywhere, the demo's answers read sensibly (the unit
tests: tests/unit/test_true_status.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import typing as tp
from pathlib import Path

import pytest
from longbatch import LONG, count_lines, long_fields, wait_until
from repo import REPO


@pytest.fixture
def bed(shared_tmp: Path) -> tp.Iterator[tp.Callable[..., subprocess.CompletedProcess[str]]]:
    """The speedslurm CLI as a user runs it against the bed; jobs the test made are cancelled at the end."""
    runs = shared_tmp / "runs"
    runs.mkdir(mode=0o700)
    env = {**os.environ, "SPEEDSLURM_PROFILE": "testbed", "SPEEDSLURM_RUN__DIR": str(runs)}
    env.pop("SPEEDSLURM_CONFIG", None)
    jobs: list[str] = []

    def run(*args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        res = subprocess.run([sys.executable, "-m", "speedslurm", *args], capture_output=True, text=True, env=env,
                             timeout=timeout, stdin=subprocess.DEVNULL, cwd=shared_tmp)
        if check and res.returncode != 0:
            raise AssertionError(f"speedslurm {' '.join(args)} exited {res.returncode}\n{res.stdout}\n{res.stderr}")
        return res

    run.jobs = jobs  # type: ignore[attr-defined]
    yield run
    if jobs:
        subprocess.run(["scancel", *jobs], capture_output=True)


def _line(out: str, dep_id: str) -> list[str]:
    """The status table's row of ``dep_id``, split into its columns (WHY last, maybe several words)."""
    head = out.splitlines()[0].split()
    row = next(ln for ln in out.splitlines() if ln.startswith(dep_id)).split()
    return row[:len(head) - 1] + [" ".join(row[len(head) - 1:])]


def _wait_state(bed: tp.Any, ident: str, want: str, timeout: float = 300) -> dict[str, tp.Any]:
    deadline = time.monotonic() + timeout
    while True:
        row = tp.cast(dict[str, tp.Any], json.loads(bed("status", ident, "--json").stdout)[0])
        if row["state"] == want or time.monotonic() > deadline:
            assert row["state"] == want, row
            return row
        time.sleep(0.5)


def _write_prompts(path: Path, n: int, fields: dict[str, tp.Any] | None = None) -> Path:
    fields = {"max_tokens": 24} if fields is None else fields
    path.write_text("".join(json.dumps({"prompt": f"Count to {i}:", **fields}) + "\n" for i in range(n)))
    return path


@pytest.mark.slurm
@pytest.mark.llama
def test_bed_a_job_cancelled_with_scancel_shows_cancelled(bed: tp.Any, tiny_gguf: Path, shared_tmp: Path) -> None:
    up = json.loads(bed("up", "--model", str(tiny_gguf), "--nodes", "3", "--executor", "slurm", "--timeout", "240",
                        "--json").stdout)
    dep_id, job = up["deployment"], up["replicas"][0]["job_id"]
    bed.jobs.append(job)
    # The user cancels the job while a batch runs through it: the servers die under the requests. The batch is one
    # no machine finishes while the test runs (tests/longbatch.py), so it still runs when the job is cancelled.
    prompts = _write_prompts(shared_tmp / "p.jsonl", LONG, long_fields())
    batch = subprocess.Popen([sys.executable, "-m", "speedslurm", "run", "--deployment", job, "--prompts",
                              str(prompts), "-q"], env={**os.environ, "SPEEDSLURM_PROFILE": "testbed",
                                                       "SPEEDSLURM_RUN__DIR": str(shared_tmp / "runs")},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    results = shared_tmp / "p.results.jsonl"
    wait_until("5 results", lambda: count_lines(results) >= 5 or batch.poll() is not None)
    assert batch.poll() is None, batch.communicate()[1]
    subprocess.run(["scancel", job], check=True)
    _, err = batch.communicate(timeout=300)
    assert batch.returncode == 1, err  # the batch could not go on
    deadline = time.monotonic() + 60
    while "CANCELLED" not in subprocess.run(["sacct", "-n", "-X", "-P", "-j", job, "-o", "State"],
                                            capture_output=True, text=True).stdout and time.monotonic() < deadline:
        time.sleep(0.5)
    row = _wait_state(bed, dep_id, "ENDED", timeout=60)
    assert row["why"] == "cancelled", row
    table = bed("status", job).stdout
    print(table)
    cols = _line(table, dep_id)
    assert cols[2] == "ENDED" and cols[3] == job and cols[-1] == "cancelled", table
    down = bed("down", job).stdout.strip()
    print(down)
    assert down == f"deployment {dep_id}: job(s) {job} had ended already; state ENDED (cancelled)"


@pytest.mark.slurm
@pytest.mark.llama
def test_bed_a_rendered_script_is_unsubmitted_until_sbatch_and_its_job_id_works_everywhere(
        bed: tp.Any, tiny_gguf: Path, shared_tmp: Path) -> None:
    rendered = json.loads(bed("render", "--model", str(tiny_gguf), "--nodes", "2", "--time", "10", "--json").stdout)
    dep_id, script = rendered["deployment"], rendered["script_path"]
    table = bed("status").stdout
    print(table)
    cols = _line(table, dep_id)
    assert cols[2] == "UNSUBMITTED" and cols[-1] == f"rendered, not submitted: sbatch {script}", table
    res = bed("run", "--deployment", dep_id, "--prompts", str(_write_prompts(shared_tmp / "q.jsonl", 2)),
              check=False)
    assert res.returncode == 2 and "was rendered but not submitted" in res.stderr, res.stderr

    # Plain sbatch, held in the queue: the job is found before it runs and records its own id
    sub = subprocess.run(["sbatch", "--hold", script], capture_output=True, text=True, check=True, cwd=shared_tmp)
    job = sub.stdout.split()[-1]
    assert sub.stdout.strip() == f"Submitted batch job {job}"
    bed.jobs.append(job)
    table = bed("status", job).stdout
    print(table)
    cols = _line(table, dep_id)
    assert cols[2] == "PENDING" and cols[3] == job and cols[-1] == "JobHeldUser", table
    subprocess.run(["scontrol", "release", job], check=True)
    _wait_state(bed, job, "READY")
    run = bed("run", "--deployment", job, "--prompts", str(shared_tmp / "q.jsonl"), "--json")
    assert json.loads(run.stdout)["requests"]["ok"] == 2
    assert bed("endpoint", job).stdout.startswith("replica 0: http://10.77.0.")
    assert "==> r0/logs/leader.log <==" in bed("logs", job, "-n", "2").stdout
    down = bed("down", job).stdout.strip()
    print(down)
    assert down == f"deployment {dep_id}: cancelled job(s) {job}; state ENDED (cancelled)"
    res = bed("status", "999999", check=False)
    assert res.returncode == 2 and "unknown deployment '999999'" in res.stderr


@pytest.mark.llama
def test_the_demo_answers_read_sensibly(gemma_270m: Path, shared_tmp: Path) -> None:
    """What `make demo` shows: the demo prompts through gemma-3-270m on two local roles over RPC."""
    runs = shared_tmp / "runs"
    runs.mkdir(mode=0o700)
    env = {**os.environ, "SPEEDSLURM_PROFILE": "local", "SPEEDSLURM_RUN__DIR": str(runs)}
    out = shared_tmp / "demo.results.jsonl"
    res = subprocess.run([sys.executable, "-m", "speedslurm", "submit", "--model", str(gemma_270m), "--nodes", "2",
                          "--executor", "local", "--prompts", str(REPO / "examples" / "prompts.jsonl"), "--out", str(out), "--max-tokens", "64",
                          "--json"], capture_output=True, text=True, env=env, timeout=600, stdin=subprocess.DEVNULL)
    assert res.returncode == 0, res.stderr
    shown = subprocess.run([sys.executable, "-m", "speedslurm", "show", str(out), "--json"], capture_output=True,
                           text=True, env=env, timeout=60, check=True).stdout
    answers = {k: v.strip() for k, v in json.loads(shown).items()}
    print("\n".join(f"{k}: {v}" for k, v in answers.items()))
    assert len(answers) == 12 and all(answers.values()), answers
    expected = {"capital-fr": "Paris", "largest-ocean": "Pacific", "weekdays": "Thursday", "counting": "five",
                "planets": "Earth", "boiling-point": "100", "translate-fr": "Merci", "python-add": "a + b"}
    for cid, word in expected.items():
        assert word in answers[cid], (cid, answers[cid])
