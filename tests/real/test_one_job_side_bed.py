"""One job side, one contract, on the test bed: the same model through `up`, `render` + sbatch and each plain-sbatch
template writes the same records (follower, loading, endpoint; failed where a start fails), every file holding
exactly the contract's fields."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import typing as tp
from pathlib import Path

import pytest
from test_render_slurm import cancel, job_state, read_logs, sbatch, write_node_templates

from speedslurm.rundir.layout import RunDir
from speedslurm.rundir.records import SCHEMA, DeploymentRecord, Endpoint, Failed, Follower, Loading, Record

pytestmark = [pytest.mark.slurm, pytest.mark.llama]
TIMEOUT_S = 300


def _speedslurm(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    res = subprocess.run([sys.executable, "-m", "speedslurm", *args], capture_output=True, text=True, env=env,
                         timeout=300, stdin=subprocess.DEVNULL)
    assert res.returncode == 0, f"speedslurm {' '.join(args)}: {res.stdout}\n{res.stderr}"
    return res


def _wait(path: Path, job_id: str, run_dir: Path) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not path.exists():
        state = job_state(job_id)
        assert state in ("PENDING", "RUNNING", "CONFIGURING", "UNKNOWN"), f"job {job_id} {state}\n{read_logs(run_dir)}"
        assert time.monotonic() < deadline, f"no {path.name} after {TIMEOUT_S}s\n{read_logs(run_dir)}"
        time.sleep(0.3)


def _exact(path: Path, kind: type[Record]) -> Record:
    """The file parses as ``kind`` and holds exactly its fields (no field of another writer's own)."""
    data = json.loads(path.read_text())
    record = kind.from_json(data, where=str(path))
    assert data["schema"] == SCHEMA and set(data) <= set(record.to_json()) | {"schema"}, set(data) ^ set(
        record.to_json())
    return record


def _records(run_dir: Path, job_id: str) -> dict[str, tp.Any]:
    """The handshake of replica 0 of a ready 2-node deployment, checked against the contract."""
    rd = RunDir(run_dir)
    dep = _exact(rd.deployment_path, DeploymentRecord)
    follower = _exact(rd.follower_path(0, 1), Follower)
    loading = _exact(rd.loading_path(0), Loading)
    endpoint = _exact(rd.endpoint_path(0), Endpoint)
    assert isinstance(dep, DeploymentRecord) and isinstance(follower, Follower)
    assert isinstance(loading, Loading) and isinstance(endpoint, Endpoint)
    assert follower.job_id == loading.job_id == endpoint.job_id == job_id and dep.job_ids[0] == job_id
    assert follower.heartbeat_port > 0  # every path runs the heartbeat the leader's watchdog probes
    assert follower.version.startswith("ggml-rpc build-id ")  # one build identity: the GNU build-id
    assert endpoint.rpc_servers == [f"{follower.host}:{follower.port}"] and loading.url == endpoint.url
    return {"follower": follower, "endpoint": endpoint}


def test_up_render_and_both_templates_write_the_same_records(
        testbed: tp.Any, tiny_gguf: Path, llama_bins: tp.Any, shared_tmp: Path) -> None:
    node_templates = write_node_templates(shared_tmp / "templates")
    runs = shared_tmp / "runs"
    runs.mkdir(mode=0o700)
    env = {**os.environ, "SPEEDSLURM_PROFILE": "testbed", "SPEEDSLURM_RUN__DIR": str(runs)}
    env.pop("SPEEDSLURM_CONFIG", None)
    bins = Path(llama_bins.llama_server).parent
    seen: dict[str, dict[str, tp.Any]] = {}

    # 1. up (submitit)
    up = json.loads(_speedslurm(env, "up", "--model", str(tiny_gguf), "--nodes", "2", "--executor", "slurm",
                                "--timeout", "180", "--json").stdout)
    try:
        run_dir = runs / up["deployment"]
        seen["up"] = _records(run_dir, up["replicas"][0]["job_id"])
    finally:
        _speedslurm(env, "down", up["deployment"])

    # 2. render + plain sbatch
    out = json.loads(_speedslurm(env, "render", "--model", str(tiny_gguf), "--nodes", "2", "--time", "10",
                                 "--json").stdout)
    job = sbatch([out["script_path"]], shared_tmp)
    try:
        _wait(Path(out["run_dir"]) / "r0" / "endpoint.json", job, Path(out["run_dir"]))
        seen["render"] = _records(Path(out["run_dir"]), job)
    finally:
        cancel(job)

    # 3. and 4. the templates, with plain sbatch and no speedslurm on the nodes' path
    for name, extra, job_form in (("llama-rpc-hetjob.sbatch", [], "{}"),
                                  ("llama-rpc-array.sbatch", ["--array=0-0", "--nodes=2"], "{}_0")):
        run_dir = runs / name.split(".")[0]
        job = sbatch([f"--export=ALL,MODEL={tiny_gguf},LLAMA_BIN_DIR={bins},RUN_DIR={run_dir},THREADS=1,CTX=1024",
                      "--time=10", *extra, str(node_templates / name)], shared_tmp)
        try:
            _wait(run_dir / "r0" / "endpoint.json", job, run_dir)
            seen[name] = _records(run_dir, job_form.format(job))
        finally:
            cancel(job)
    assert sorted(seen) == sorted(["up", "render", "llama-rpc-hetjob.sbatch", "llama-rpc-array.sbatch"])

    # failed.json: a template's leader that cannot start writes the same record, with its job id
    run_dir = runs / "broken"
    job = sbatch([f"--export=ALL,MODEL={shared_tmp / 'missing.gguf'},LLAMA_BIN_DIR={bins},RUN_DIR={run_dir}",
                  "--time=5", str(node_templates / "llama-rpc-hetjob.sbatch")], shared_tmp)
    try:
        _wait(run_dir / "r0" / "failed.json", job, run_dir)
        failed = _exact(run_dir / "r0" / "failed.json", Failed)
        assert isinstance(failed, Failed) and failed.job_id == job and failed.role == "leader"
        assert "missing.gguf does not exist" in failed.reason
        status = json.loads(_speedslurm(env, "status", "broken", "--json").stdout)[0]
        assert status["state"] == "FAILED" and "missing.gguf does not exist" in status["replicas"][0]["why"]
    finally:
        cancel(job)
