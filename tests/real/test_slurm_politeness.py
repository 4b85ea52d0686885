"""Politeness to slurmctld (issue 11), measured on the real test bed.

Every Slurm command speedslurm runs goes through a shim in front of the real one (the shim logs the call, then
execs the command), so what is counted is what slurmctld and slurmdbd were asked. One test, the only long one
of this file: ``status`` with several old deployments in the run directory, an ``up`` whose job waits 20 s
in the queue, two minutes of a batch through ``run --deployment``, and ``status`` again. The counts are printed
(docs/reliability.md has those of the code before and after the change) and held to a budget.

The batch is long by construction (tests/longbatch.py: more than any machine answers in two minutes) and is
stopped with Ctrl-C once BATCH_S have passed: the calls are counted over a window the test sets, not over a
batch sized from a guess of the machine's speed.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import typing as tp
from pathlib import Path

import pytest
from longbatch import LONG, Output, count_lines, long_fields, wait_until

pytestmark = [pytest.mark.slurm, pytest.mark.llama]

SLURM_COMMANDS = ("squeue", "sacct", "scontrol", "sinfo", "sbatch", "scancel", "srun", "salloc", "sstat")
OLD_DEPLOYMENTS = 6
BATCH_S = 110.0          # how long the batch runs before it is stopped (the window its calls are counted over)
BEGIN_S = 20             # `up` submits a job that may start only this long after submission (sbatch --begin)
BATCH_PER_MIN = 10.0     # budget: Slurm commands per minute while a batch runs
UP_CALLS = 15            # budget: Slurm commands of one `up` whose job waits BEGIN_S in the queue
STATUS_AGAIN_CALLS = 1   # budget: `status` again, with only one live deployment among them


class Shims:
    """A folder of logging shims for the Slurm commands, and the log they write (one line per call)."""

    def __init__(self, folder: Path) -> None:
        self.bin = folder / "bin"
        self.bin.mkdir(parents=True)
        self.log = folder / "slurm-calls.log"
        self.log.touch()
        for name in SLURM_COMMANDS:
            real = shutil.which(name)
            if real is None:
                continue
            shim = self.bin / name
            shim.write_text("#!/bin/sh\n"
                            f"printf '%s %s %s\\n' \"$(date +%s.%N)\" {name} \"$*\" >> {shlex.quote(str(self.log))}\n"
                            f"exec {shlex.quote(real)} \"$@\"\n")
            shim.chmod(0o755)

    def calls(self, start: float = 0.0, end: float = float("inf")) -> list[tuple[float, str, str]]:
        out = []
        for line in self.log.read_text().splitlines():
            stamp, _, rest = line.partition(" ")
            command, _, args = rest.partition(" ")
            if start <= float(stamp) <= end:
                out.append((float(stamp), command, args))
        return out


def _ended_jobs(n: int) -> list[str]:
    """Ids of jobs that ended (any user's, from accounting): what old deployments in a run directory point at."""
    out = subprocess.run(["sacct", "-a", "-n", "-X", "-P", "-S", "now-7days", "-E", "now", "-s", "CA,CD,F,TO,NF",
                          "-o", "JobID"], capture_output=True, text=True, timeout=30).stdout
    ids = [j for j in dict.fromkeys(line.split("+")[0].strip() for line in out.splitlines()) if j.isdigit()]
    return ids[-n:]


def _old_deployment(runs: Path, name: str, job_id: str, age_s: float) -> None:
    from speedslurm.rundir.layout import make_private_dir
    from speedslurm.rundir.records import write_json_atomic

    rd = make_private_dir(runs / name)
    make_private_dir(rd / "r0")
    write_json_atomic(rd / "deployment.json", {
        "id": name, "created_at": time.time() - age_s, "replicas": 1, "executor": "slurm", "job_ids": [job_id],
        "model": {"name": "tiny"}, "nodes": 2, "submitted_by": "speedslurm up", "submitted_at": time.time() - age_s})


def _per_min(calls: tp.Sequence[tp.Any], seconds: float) -> float:
    return len(calls) * 60.0 / max(seconds, 1e-9)


def _prompts(path: Path, n: int) -> Path:
    path.write_text("".join(json.dumps({"custom_id": f"p{i}", "prompt": f"Count to {i}:", **long_fields()}) + "\n"
                            for i in range(n)))
    return path


@pytest.mark.slow
def test_slurm_commands_per_minute_of_status_up_and_a_two_minute_batch(shared_tmp: Path, tiny_gguf: Path) -> None:
    shims = Shims(shared_tmp / "shims")
    runs = shared_tmp / "runs"
    runs.mkdir(mode=0o700)
    env = {**os.environ, "PATH": f"{shims.bin}:{os.environ['PATH']}", "SPEEDSLURM_PROFILE": "testbed",
           "SPEEDSLURM_RUN__DIR": str(runs)}
    env.pop("SPEEDSLURM_CONFIG", None)

    def ss(*args: str, timeout: float = 600) -> tuple[subprocess.CompletedProcess[str], float, float]:
        start = time.time()
        res = subprocess.run([sys.executable, "-m", "speedslurm", *args], capture_output=True, text=True, env=env,
                             timeout=timeout, stdin=subprocess.DEVNULL, cwd=shared_tmp)
        end = time.time()
        assert res.returncode == 0, f"speedslurm {' '.join(args)} exited {res.returncode}\n{res.stdout}\n{res.stderr}"
        return res, start, end

    old = _ended_jobs(OLD_DEPLOYMENTS)
    old += [str(900000 + i) for i in range(OLD_DEPLOYMENTS - len(old))]  # ids Slurm never had, if too few ended
    for i, job in enumerate(old):
        _old_deployment(runs, f"old-{i}", job, age_s=3600.0 * (i + 1))

    report: dict[str, tp.Any] = {}
    _, t0, t1 = ss("status", "--all")
    report["status, 6 old deployments"] = len(shims.calls(t0, t1))

    # The job may start only BEGIN_S after submission: `up` waits for it as for a busy cluster's queue.
    up, t0, t1 = ss("--set", f"cluster.sbatch.begin=now+{BEGIN_S}", "up", "--model", str(tiny_gguf), "--nodes", "2",
                    "--executor", "slurm", "--timeout", "300", "--json")
    dep = json.loads(up.stdout)["deployment"]
    up_calls = shims.calls(t0, t1)
    report["up (calls)"] = len(up_calls)
    report["up (seconds)"] = round(t1 - t0, 1)
    try:
        prompts, out = _prompts(shared_tmp / "b.jsonl", LONG), shared_tmp / "b.results.jsonl"
        t0 = time.time()
        proc = subprocess.Popen([sys.executable, "-m", "speedslurm", "run", "--deployment", dep, "--prompts",
                                 str(prompts), "--out", str(out), "--json", "-q"], env=env, cwd=shared_tmp,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        output = Output(proc)
        try:
            wait_until("results", lambda: count_lines(out) > 0 or proc.poll() is not None)
            while time.time() - t0 < BATCH_S:  # the window: the batch runs on meanwhile (it is far longer)
                assert proc.poll() is None, f"the batch ended (exit {proc.returncode}):\n{output.stderr}"
                time.sleep(1)
            proc.send_signal(signal.SIGINT)
            rc = output.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        t1 = time.time()
        assert rc == 130, output.stderr
        summary = json.loads(output.stdout)
        assert summary["status"] == "interrupted" and 0 < summary["requests"]["ok"] < LONG, summary
        assert summary["requests"]["failed"] == 0, summary
        batch_calls = shims.calls(t0, t1)
        report["batch (requests ok)"] = summary["requests"]["ok"]
        report["batch (seconds)"] = round(t1 - t0, 1)
        report["batch (calls)"] = len(batch_calls)
        report["batch (calls per minute)"] = round(_per_min(batch_calls, t1 - t0), 1)
        _, t0, t1 = ss("status", "--all")
        report["status, 6 old + 1 live"] = len(shims.calls(t0, t1))
        _, t0, t1 = ss("status", "--all")
        status_again = shims.calls(t0, t1)
        report["status again"] = len(status_again)
    finally:
        ss("down", dep)
    by_command: dict[str, int] = {}
    for _, command, _ in shims.calls():
        by_command[command] = by_command.get(command, 0) + 1
    report["all calls by command"] = by_command
    print(json.dumps(report, indent=1))
    assert report["batch (calls per minute)"] <= BATCH_PER_MIN, (report, batch_calls)
    assert report["up (calls)"] <= UP_CALLS, (report, up_calls)
    assert report["status again"] <= STATUS_AGAIN_CALLS, (report, status_again)
