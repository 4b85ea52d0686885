"""Plain `sbatch` on the test bed: a script from `speedslurm render`, and the two templates in sbatch_templates/.

Each reaches READY (endpoint.json appears, mode 0600, with every field of speedslurm.rundir.layout.Endpoint), serves a
small batch through `speedslurm run`, and is cancelled at the end.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import stat
import subprocess
import sys
import time
import typing as tp
from pathlib import Path

import pytest

from speedslurm.rundir.records import Endpoint

pytestmark = [pytest.mark.slurm, pytest.mark.llama]

READY_TIMEOUT_S = 600  # includes waiting in the queue behind other jobs on the bed


def speedslurm(args: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "speedslurm", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def sbatch(args: list[str], cwd: Path) -> str:
    res = subprocess.run(["sbatch", "--parsable", *args], capture_output=True, text=True, cwd=cwd, timeout=60)
    assert res.returncode == 0, res.stderr
    m = re.match(r"^(\d+)", res.stdout.strip())
    assert m, res.stdout
    return m.group(1)


def job_state(job_id: str) -> str:
    out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True).stdout.split()
    if out:
        return out[0]
    acct = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"], capture_output=True,
                          text=True).stdout.split()
    return acct[0] if acct else "UNKNOWN"


def cancel(job_id: str) -> None:
    subprocess.run(["scancel", job_id], capture_output=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and job_state(job_id) in ("PENDING", "RUNNING", "COMPLETING", "CONFIGURING"):
        time.sleep(0.5)


def wait_endpoints(paths: list[Path], job_id: str, logs: tp.Callable[[], str]) -> list[Endpoint]:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not all(p.exists() for p in paths):
        state = job_state(job_id)
        failed = [p.parent / "failed.json" for p in paths if (p.parent / "failed.json").exists()]
        if failed or state in ("FAILED", "CANCELLED", "TIMEOUT", "COMPLETED", "NODE_FAIL", "OUT_OF_MEMORY"):
            pytest.fail(f"job {job_id} {state}; failed.json: {[f.read_text() for f in failed]}\n{logs()}")
        if time.monotonic() > deadline:
            pytest.fail(f"no endpoint after {READY_TIMEOUT_S}s (job {job_id} {state})\n{logs()}")
        time.sleep(0.3)
    eps = []
    fields = {f.name for f in dataclasses.fields(Endpoint)} | {"schema"}
    for p in paths:
        assert stat.S_IMODE(p.stat().st_mode) == 0o600
        data = json.loads(p.read_text())
        assert set(data) == fields, set(data) ^ fields
        eps.append(Endpoint.from_json(data))
    return eps


def read_logs(run_dir: Path) -> str:
    parts = []
    for p in sorted(run_dir.rglob("*.log")) + sorted(run_dir.rglob("*.out")) + sorted(run_dir.rglob("*.err")):
        parts.append(f"==> {p} <==\n" + p.read_text(errors="replace")[-3000:])
    return "\n".join(parts)


def send_batch(env: dict[str, str], tmp: Path, target: list[str], n: int = 4) -> dict[str, tp.Any]:
    tmp.mkdir(parents=True, exist_ok=True)
    prompts = tmp / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say hello number {i}."}) + "\n" for i in range(n)))
    out = tmp / "results.jsonl"
    res = speedslurm(["run", *target, "--prompts", str(prompts), "--out", str(out), "--max-tokens", "8",
                      "--json"], env)
    assert res.returncode == 0, res.stdout + res.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == n
    assert all(line["error"] is None and line["response"]["status_code"] == 200 for line in lines), lines
    return tp.cast(dict[str, tp.Any], json.loads(res.stdout))


@pytest.fixture
def node_templates(shared_tmp: Path) -> Path:
    return write_node_templates(shared_tmp / "templates")


def write_node_templates(folder: Path) -> Path:
    """The templates and speedslurm-node.pyz as a user gets them: `speedslurm templates DIR`."""
    res = subprocess.run([sys.executable, "-m", "speedslurm", "templates", str(folder)], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert (folder / "speedslurm-node.pyz").is_file() and (folder / "llama-rpc-hetjob.sbatch").is_file()
    return folder


@pytest.fixture
def bed_env(shared_tmp: Path) -> dict[str, str]:
    runs = shared_tmp / "runs"
    runs.mkdir(mode=0o700)
    env = {**os.environ, "SPEEDSLURM_PROFILE": "testbed", "SPEEDSLURM_RUN__DIR": str(runs)}
    env.pop("SPEEDSLURM_CONFIG", None)
    return env


@pytest.mark.parametrize(("nodes", "replicas"), [(3, 1), (2, 2)], ids=["hetjob", "array"])
def test_rendered_script_with_plain_sbatch(testbed: tp.Any, tiny_gguf: Path, llama_bins: tp.Any, shared_tmp: Path,
                                           bed_env: dict[str, str], nodes: int, replicas: int) -> None:
    res = speedslurm(["render", "--model", str(tiny_gguf), "--nodes", str(nodes), "--replicas", str(replicas),
                      "--time", "10", "--json"], bed_env)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    run_dir, dep_id = Path(out["run_dir"]), out["deployment"]
    assert stat.S_IMODE(run_dir.stat().st_mode) == 0o700
    assert run_dir.parent == Path(bed_env["SPEEDSLURM_RUN__DIR"])
    job_id = sbatch([out["script_path"]], shared_tmp)
    try:
        files = [run_dir / f"r{r}" / "endpoint.json" for r in range(replicas)]
        eps = wait_endpoints(files, job_id, lambda: read_logs(run_dir))
        expected_ids = [job_id] if replicas == 1 else [f"{job_id}_{r}" for r in range(replicas)]
        for r, ep in enumerate(eps):
            assert ep.deployment_id == dep_id and ep.replica == r and len(ep.follower_nodes) == nodes - 1
            assert ep.url.startswith("http://10.77.0.") and all(x.startswith("10.77.0.") for x in ep.rpc_servers)
            assert ep.api_key == (run_dir / "api_key").read_text().strip()
            assert ep.job_id == expected_ids[r]
        info = json.loads((run_dir / "deployment.json").read_text())
        assert info["job_ids"] == expected_ids
        status = speedslurm(["status", dep_id, "--json"], bed_env)
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)[0]["state"] == "READY"
        summary = send_batch(bed_env, shared_tmp / "batch", ["--deployment", dep_id], n=4 * replicas)
        assert summary
    finally:
        cancel(job_id)
    status = speedslurm(["status", dep_id, "--json"], bed_env)
    assert json.loads(status.stdout)[0]["state"] in ("ENDED", "FAILED")


def test_hetjob_template(testbed: tp.Any, tiny_gguf: Path, llama_bins: tp.Any, shared_tmp: Path,
                         bed_env: dict[str, str], node_templates: Path) -> None:
    run_dir = Path(bed_env["SPEEDSLURM_RUN__DIR"]) / "tiny-hetjob"
    bins = Path(llama_bins.llama_server).parent
    job_id = sbatch([f"--export=ALL,MODEL={tiny_gguf},LLAMA_BIN_DIR={bins},RUN_DIR={run_dir},THREADS=1,CTX=1024",
                     "--time=10", str(node_templates / "llama-rpc-hetjob.sbatch")], shared_tmp)
    try:
        (ep,) = wait_endpoints([run_dir / "r0" / "endpoint.json"], job_id,
                               lambda: read_logs(run_dir) + read_logs(shared_tmp))
        assert ep.job_id == job_id and ep.ctx == 1024 and len(ep.rpc_servers) == 1
        assert ep.leader_node != ep.follower_nodes[0]
        assert stat.S_IMODE(run_dir.stat().st_mode) == 0o700
        send_batch(bed_env, shared_tmp / "batch", ["--endpoint-file", str(run_dir / "r0" / "endpoint.json")])
        status = speedslurm(["status", "tiny-hetjob", "--json"], bed_env)
        assert json.loads(status.stdout)[0]["state"] == "READY", status.stdout
    finally:
        cancel(job_id)


def test_array_template_two_replicas(testbed: tp.Any, tiny_gguf: Path, llama_bins: tp.Any, shared_tmp: Path,
                                     bed_env: dict[str, str], node_templates: Path) -> None:
    run_dir = Path(bed_env["SPEEDSLURM_RUN__DIR"]) / "tiny-array"
    bins = Path(llama_bins.llama_server).parent
    job_id = sbatch([f"--export=ALL,MODEL={tiny_gguf},LLAMA_BIN_DIR={bins},RUN_DIR={run_dir},THREADS=1",
                     "--array=0-1", "--nodes=2", "--time=10", str(node_templates / "llama-rpc-array.sbatch")], shared_tmp)
    files = [run_dir / "r0" / "endpoint.json", run_dir / "r1" / "endpoint.json"]
    try:
        eps = wait_endpoints(files, job_id, lambda: read_logs(run_dir) + read_logs(shared_tmp))
        assert [e.replica for e in eps] == [0, 1]
        assert {e.job_id for e in eps} == {f"{job_id}_0", f"{job_id}_1"}
        assert eps[0].api_key == eps[1].api_key  # one key per deployment
        nodes = {eps[0].leader_node, *eps[0].follower_nodes, eps[1].leader_node, *eps[1].follower_nodes}
        assert len(nodes) == 4  # 2 replicas x 2 nodes, no node shared
        send_batch(bed_env, shared_tmp / "batch1", ["--endpoint-file", str(files[0]), "--endpoint-file", str(files[1])], n=8)
        status = speedslurm(["status", "tiny-array", "--json"], bed_env)
        assert [r["state"] for r in json.loads(status.stdout)[0]["replicas"]] == ["READY", "READY"], status.stdout
        summary = send_batch(bed_env, shared_tmp / "batch2", ["--deployment", "tiny-array"], n=4)
        assert summary
    finally:
        cancel(job_id)


def test_render_cli_with_hostile_paths(testbed: tp.Any, tiny_gguf: Path, llama_bins: tp.Any, shared_tmp: Path,
                                       bed_env: dict[str, str]) -> None:
    """`render` itself, with a hostile model file name and run directory: quoted, nothing executed."""
    model = shared_tmp / "m $(touch pwned1) `touch pwned2` 'q' \"d\";x.gguf"
    model.write_bytes(tiny_gguf.read_bytes())
    run_dir = Path(bed_env["SPEEDSLURM_RUN__DIR"]) / "r $(touch pwned3) `touch pwned4` 'q' \"d\""
    res = subprocess.run([sys.executable, "-m", "speedslurm", "render", "--model", str(model), "--nodes", "2",
                          "--run-dir", str(run_dir), "--json"], capture_output=True, text=True, env=bed_env,
                         cwd=shared_tmp, timeout=300)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["run_dir"] == str(run_dir) and Path(out["script_path"]).parent == run_dir
    assert subprocess.run(["bash", "-n", out["script_path"]]).returncode == 0
    info = json.loads((run_dir / "deployment.json").read_text())
    assert info["model"]["path"] == str(model) and info["id"] == run_dir.name
    assert not list(shared_tmp.glob("pwned*"))
    bad = subprocess.run([sys.executable, "-m", "speedslurm", "render", "--model", str(model), "--run-dir",
                          str(shared_tmp / "a\nb")], capture_output=True, text=True, env=bed_env, timeout=300)
    assert bad.returncode == 2 and "line break" in bad.stderr
