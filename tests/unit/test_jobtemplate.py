"""The templates' job without a cluster: the replica and job ids from Slurm's environment, and the run directory
prepared as the client prepares it."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from speedslurm.node.template import job_shape, parser, prepare
from speedslurm.rundir.layout import RunDir


def test_the_shape_comes_from_slurms_environment() -> None:
    assert job_shape("hetjob", {"SLURM_JOB_ID": "40", "SLURM_JOB_NUM_NODES_HET_GROUP_1": "2"}) == (0, "40", ["40"], 3)
    env = {"SLURM_JOB_ID": "43", "SLURM_ARRAY_JOB_ID": "41", "SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "2",
           "SLURM_ARRAY_TASK_MIN": "0", "SLURM_JOB_NUM_NODES": "2"}
    assert job_shape("array", env) == (1, "41_1", ["41_0", "41_1"], 2)
    with pytest.raises(SystemExit, match="--array must count from 0"):
        job_shape("array", {**env, "SLURM_ARRAY_TASK_MIN": "1"})
    with pytest.raises(SystemExit, match="not inside a Slurm job"):
        job_shape("hetjob", {})


def test_the_run_directory_is_prepared_as_the_client_prepares_it(tmp_path: Path) -> None:
    root = tmp_path / "runs" / "dep"
    (root / "r1").mkdir(parents=True)
    (root / "r1" / "endpoint.json").write_text("{}")  # an earlier job's: removed
    (root / "r1" / "follower-1.json").write_text("{}")
    args = parser().parse_args(["array", "--model", str(tmp_path / "m.gguf"), "--run-dir", str(root), "--ctx", "512",
                                "--extra-server-args", "--foo 'a b'"])
    rd = prepare(args, 1, ["41_0", "41_1"], 2, {"llama_server": "/b/llama-server", "rpc_server": "/b/rpc-server",
                                               "kv_unified": True})
    assert rd.root == root and stat.S_IMODE(root.stat().st_mode) == 0o700
    assert stat.S_IMODE((root / "api_key").stat().st_mode) == 0o600 and len((root / "api_key").read_text()) > 40
    assert not (root / "r1" / "endpoint.json").exists() and not (root / "r1" / "follower-1.json").exists()
    dep = RunDir(root).deployment_record()
    assert dep is not None and dep.job_ids == ["41_0", "41_1"] and dep.replicas == 2 and dep.nodes == 2
    assert dep.model == {"name": "m", "path": str(tmp_path / "m.gguf")} and dep.ctx == 512
    assert dep.llama["extra_server_args"] == ["--foo", "a b"] and dep.binaries["kv_unified"] is True
    key = (root / "api_key").read_text()
    prepare(args, 0, ["41_0", "41_1"], 2, {})
    assert (root / "api_key").read_text() == key  # the first replica's key stays
