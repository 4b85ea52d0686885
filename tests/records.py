"""Run-directory records for tests: the contract's records with every field a test does not care about filled in."""

from __future__ import annotations

import time
import typing as tp
from pathlib import Path

from speedslurm.rundir.layout import RunDir
from speedslurm.rundir.records import SCHEMA, DeploymentRecord, Failed, Loading


def deployment(root: Path, **fields: tp.Any) -> dict[str, tp.Any]:
    """Write ``root/deployment.json`` as the client would (``fields`` over defaults); returns it as a dict."""
    data = {"schema": SCHEMA, "id": Path(root).name, "created_at": time.time(), "executor": "slurm",
            "model": {"name": "m", "path": ""}, "nodes": 1, "replicas": 1, "ctx": 1024, "parallel": 1,
            "job_ids": [], "submitted_by": "speedslurm up", **fields}
    return RunDir(Path(root)).write_deployment(DeploymentRecord.from_json(data)).to_json()


def failed(**fields: tp.Any) -> dict[str, tp.Any]:
    """A failed.json record (``fields`` over defaults) as a dict."""
    return Failed(**{"job_id": "", "role": "leader", "rank": 0, "node": "", "exit_code": None, "reason": "",
                     "log_tail": "", "time": time.time(), **fields}).to_json()


def loading(**fields: tp.Any) -> dict[str, tp.Any]:
    return Loading(**{"job_id": "", "url": "http://10.77.0.11:8080", "node": "n1", "pid": 1, "time": time.time(),
                      **fields}).to_json()
