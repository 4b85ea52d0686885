"""The local executor's process identity (issue 11): a deployment's controller is known by pid + start time +
boot id + host, so a pid that another process took over (after the controller ended, or after a reboot) is
neither shown as running nor signalled.

Real processes throughout: the "unrelated process" is a ``sleep`` this test starts, and the CLI runs as a user
runs it. Local roles started inside a Slurm job: tests/real/test_local_identity_real.py.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import time
import typing as tp
from pathlib import Path

import pytest
from cliproc import local_env, speedslurm_proc

from speedslurm.cluster.local_executor import local_environment
from speedslurm.cluster.localproc import ProcessIdentity, check, identify, signal_process

_ss = functools.partial(speedslurm_proc, timeout=120)


@pytest.fixture
def sleeper() -> tp.Iterator[subprocess.Popen[bytes]]:
    """An unrelated live process: what a reused pid names."""
    proc = subprocess.Popen(["sleep", "300"])
    yield proc
    proc.kill()
    proc.wait()


@pytest.fixture
def runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "runs"
    root.mkdir(mode=0o700)
    return root


def _local_deployment(runs: Path, name: str, pid: int, identity: dict[str, tp.Any] | None) -> Path:
    import records

    from speedslurm.rundir.layout import make_private_dir

    rd = make_private_dir(runs / name)
    make_private_dir(rd / "r0")
    record: dict[str, tp.Any] = {"id": name, "created_at": time.time() - 60, "replicas": 1, "executor": "local",
                                 "job_ids": [str(pid)], "model": {"name": "tiny"}, "nodes": 2,
                                 "submitted_by": "speedslurm up"}
    if identity is not None:
        record["local_processes"] = [identity]
    records.deployment(rd, **{k: v for k, v in record.items() if k != "id"})
    return rd


def _status(env: dict[str, str], ident: str, cwd: Path) -> dict[str, tp.Any]:
    res = _ss(env, "status", ident, "--json", cwd=cwd)
    assert res.returncode == 0, res.stderr
    return tp.cast(dict[str, tp.Any], json.loads(res.stdout)[0])


# ------------------------------------------------------------------------------------------------------------
# localproc


def test_an_identity_names_one_process_until_it_ends() -> None:
    proc = subprocess.Popen(["sleep", "300"])
    ident = identify(proc.pid)
    assert ident is not None and check(ident) == ""
    assert check(ProcessIdentity(proc.pid, ident.start_ticks + 1, ident.boot_id, ident.host)) == "gone"
    assert check(ProcessIdentity(proc.pid, ident.start_ticks, "another-boot", ident.host)) == "rebooted"
    assert check(ProcessIdentity(proc.pid, ident.start_ticks, ident.boot_id, "another-host")) == "other host"
    proc.kill()
    os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)  # until it has exited, leaving it unreaped
    assert check(ident) == "gone"  # a zombie, not yet reaped: it holds the pid but runs nothing
    assert not signal_process(ident, signal.SIGTERM)
    proc.wait()
    assert check(ident) == "gone" and identify(proc.pid) is None


def test_signal_process_signals_only_the_process_it_names(sleeper: subprocess.Popen[bytes]) -> None:
    ident = identify(sleeper.pid)
    assert ident is not None
    assert not signal_process(ProcessIdentity(sleeper.pid, ident.start_ticks - 1, ident.boot_id, ident.host))
    assert sleeper.poll() is None
    assert signal_process(ident, signal.SIGTERM)
    assert sleeper.wait(5) == -signal.SIGTERM


def test_local_roles_get_no_slurm_job_variables() -> None:
    env = local_environment({"SLURM_JOB_ID": "12345", "SLURM_ARRAY_JOB_ID": "7", "SLURM_ARRAY_TASK_ID": "1",
                             "SLURMD_NODENAME": "n1", "SLURM_PROCID": "3", "SPEEDSLURM_JOB_ID": "12345",
                             "SLURM_CONF": "/etc/slurm/slurm.conf", "PATH": "/usr/bin", "HOME": "/root"})
    assert env == {"SLURM_CONF": "/etc/slurm/slurm.conf", "PATH": "/usr/bin", "HOME": "/root"}


# ------------------------------------------------------------------------------------------------------------
# status and down, through the CLI, with a real unrelated process at the recorded pid


@pytest.mark.parametrize(("change", "why"), [
    ("start_ticks", "its processes are gone"),
    ("boot_id", "its processes are gone (the machine restarted)"),
    ("none", "its processes are gone"),  # recorded by an older version: the pid alone, not a controller's
])
def test_a_reused_pid_is_not_the_deployment_and_down_leaves_it_alone(
        runs: Path, tmp_path: Path, sleeper: subprocess.Popen[bytes], change: str, why: str) -> None:
    ident = identify(sleeper.pid)
    assert ident is not None
    record: dict[str, tp.Any] | None = ident.to_json()
    if change == "none":
        record = None
    else:
        assert record is not None
        record[change] = record[change] + 1 if change == "start_ticks" else "0" * 32
    _local_deployment(runs, "dep-reused", sleeper.pid, record)
    env = local_env(runs)
    row = _status(env, "dep-reused", tmp_path)
    assert (row["state"], row["why"]) == ("ENDED", why), row
    res = _ss(env, "down", "dep-reused", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"deployment dep-reused: job(s) {sleeper.pid} had ended already; state ENDED ({why})"
    time.sleep(0.3)
    assert sleeper.poll() is None, "down signalled a process that is not the deployment's"


def test_a_deployment_on_another_host_is_not_called_ended_nor_signalled(
        runs: Path, tmp_path: Path, sleeper: subprocess.Popen[bytes]) -> None:
    ident = identify(sleeper.pid)
    assert ident is not None
    _local_deployment(runs, "dep-elsewhere", sleeper.pid, {**ident.to_json(), "host": "login2"})
    env = local_env(runs)
    row = _status(env, "dep-elsewhere", tmp_path)
    assert row["state"] == "STARTING" and row["why"] == "runs on login2: its processes can only be checked there"
    res = _ss(env, "down", "dep-elsewhere", cwd=tmp_path)
    assert res.returncode == 2 and "runs its processes on login2" in res.stderr and "on login2" in res.stderr
    time.sleep(0.3)
    assert sleeper.poll() is None


def test_the_recorded_process_is_running_and_down_stops_it(
        runs: Path, tmp_path: Path, sleeper: subprocess.Popen[bytes]) -> None:
    ident = identify(sleeper.pid)
    assert ident is not None
    _local_deployment(runs, "dep-live", sleeper.pid, ident.to_json())
    env = local_env(runs)
    row = _status(env, "dep-live", tmp_path)
    assert row["state"] == "STARTING" and row["replicas"][0]["job_state"] == "RUNNING", row
    res = _ss(env, "down", "dep-live", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert sleeper.wait(5) == -signal.SIGTERM
    assert res.stdout.startswith(f"deployment dep-live: cancelled job(s) {sleeper.pid}; state ENDED"), res.stdout

