"""A job that sbatch refuses leaves nothing behind, on the test bed: `up` with a feature no node has exits 2
with sbatch's own words and lists no deployment (the unit tests: tests/unit/test_sbatch_refusal.py).
"""

from __future__ import annotations

import json
import typing as tp
from pathlib import Path

import pytest


@pytest.mark.slurm
@pytest.mark.llama
@pytest.mark.parametrize("replicas", ["1", "2"], ids=["hetjob", "array"])
def test_bed_up_with_a_feature_no_node_has_exits_2_and_lists_no_deployment(
        speedslurm_cli: tp.Callable[..., tp.Any], tiny_gguf: Path, replicas: str) -> None:
    cli = speedslurm_cli()
    res = cli("--set", "cluster.sbatch.constraint=nosuchfeature", "up", "--model", str(tiny_gguf), "--nodes", "2",
              "--replicas", replicas, "--executor", "slurm", "--timeout", "120", check=False)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    flat = " ".join(res.stderr.split())
    assert "Error: sbatch refused the job: sbatch: error:" in flat and "Invalid feature specification" in flat, \
        res.stderr
    assert "Fix: check cluster.sbatch.constraint (set in --set cluster.sbatch.constraint)" in flat, res.stderr
    assert flat.count("Invalid feature specification") == 1, res.stderr  # said once
    status = cli("status", "--all", "--json")
    assert json.loads(status.stdout) == [], status.stdout
    assert not cli.runs.exists() or list(cli.runs.iterdir()) == []
