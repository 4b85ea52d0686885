"""Deployments as their run directories record them: create one, list them, find one by id or job id.

A deployment is a folder ``<run.dir>/<id>/`` (mode 0700) holding ``deployment.json`` (the plan, the settings the
nodes need, the job ids), the API key and the handshake files the nodes write (docs/architecture.md). Every
command that takes a deployment resolves it with :func:`find_deployment`.
"""

from __future__ import annotations

import dataclasses
import os
import re
import secrets
import time
import typing as tp
from pathlib import Path

from ..cluster import slurm
from ..cluster.slurm_executor import find_submitted_job, needs_job_ids
from ..errors import UsageError
from ..rundir.layout import Deployment, RunDir, check_parent_not_world_writable, make_private_dir
from ..rundir.records import ContractError

if tp.TYPE_CHECKING:
    from ..planning.plan import Plan
    from ..settings.settings import Settings

_ID_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def runs_root(settings: Settings) -> Path:
    return settings.run.root


def new_deployment_id(model_name: str) -> str:
    safe = _ID_SAFE.sub("-", model_name).strip("-").lower()[:32] or "model"
    return f"{safe}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def binaries_record(binaries: tp.Any) -> dict[str, tp.Any]:
    """The binaries as deployment.json records them for the job side."""
    from ..node.binaries import job_record

    return job_record(binaries)


def deployment_record(settings: Settings, plan: Plan, binaries: dict[str, tp.Any], deployment_id: str, *,
                      submitted_by: str = "speedslurm up", now: float | None = None) -> dict[str, tp.Any]:
    """The content of ``deployment.json``: what the job side reads and ``status`` shows."""
    return {
        "id": deployment_id, "created_at": time.time() if now is None else now, "uid": os.getuid(),
        "model": plan.model.to_json(), "plan": plan.to_json(), "nodes": plan.nodes, "replicas": plan.replicas,
        "ctx": plan.ctx, "parallel": plan.parallel, "executor": plan.executor, "job_ids": [],
        "node_addresses": {n: e.address for n, e in settings.cluster.nodes.items() if e.address},
        "llama": dataclasses.asdict(settings.llama), "binaries": binaries,
        "follower_timeout_s": settings.run.follower_timeout_s, "health_timeout_s": settings.run.health_timeout_s,
        "poll_interval_s": settings.run.poll_interval_s, "submitted_by": submitted_by,
    }


def create_run_dir(root: Path, record: dict[str, tp.Any], replicas: int) -> RunDir:
    """Make the run directory (0700, refusing a world-writable parent) with its API key and deployment.json."""
    check_parent_not_world_writable(root.parent)
    if (root / "deployment.json").exists():
        raise UsageError(f"{root} already holds a deployment", fix="choose a new run directory, or leave it out")
    rd = RunDir(make_private_dir(root))
    make_private_dir(rd.submitit_dir)  # Slurm opens the job's output files there before the script runs
    for r in range(replicas):
        make_private_dir(rd.replica_dir(r))  # mkdir's parents=True would give r<R> the umask's mode
        make_private_dir(rd.log_dir(r))
    fd = os.open(rd.root / "api_key", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_urlsafe(32) + "\n")
    rd.write_deployment({**record, "id": rd.deployment_id})
    return rd


# ----------------------------------------------------------------------------------------------------------
# Finding deployments


def list_deployments(settings: Settings) -> list[Deployment]:
    root = runs_root(settings)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        try:
            info = RunDir(child).deployment() if child.is_dir() else None
        except ContractError:
            continue  # written by another version of speedslurm: not a deployment this one can read
        if info:
            found.append(Deployment(RunDir(child), info))
    return sorted(found, key=lambda d: float(d.info.get("created_at", 0)))


def find_deployment(settings: Settings, ident: str) -> Deployment:
    """By deployment id, a unique prefix of it, or a Slurm job id (123, 123_4, 123+1: what sbatch, squeue and
    sacct print). Every command that takes a deployment (status, endpoint, logs, down, run) resolves it here."""
    deps = list_deployments(settings)
    exact = [d for d in deps if d.id == ident] or _by_job_id(deps, ident)
    if not exact and slurm.job_key(ident) and slurm.have_slurm():
        # A script from `render` records its job id once it runs; a job still queued is found by its output folder.
        for dep in deps:
            if needs_job_ids(dep):
                find_submitted_job(dep)
        exact = _by_job_id(deps, ident)
    if not exact:
        exact = [d for d in deps if d.id.startswith(ident)]
    if len(exact) == 1:
        return exact[0]
    if not exact:
        recent = ", ".join(d.id for d in deps[-5:]) or "none"
        raise UsageError(f"unknown deployment {ident!r}: no deployment id and no job id of one (in "
                         f"{runs_root(settings)})",
                         fix=f"pass a deployment id or a Slurm job id from `speedslurm status` (recent: {recent})")
    raise UsageError(f"{ident!r} matches several deployments: {', '.join(d.id for d in exact)}",
                     fix="pass the full deployment id")


def _by_job_id(deps: tp.Sequence[Deployment], ident: str) -> list[Deployment]:
    """Deployments with a job ``ident``: 123 matches every task of array 123 and every component of hetjob 123."""
    key = slurm.job_key(ident)
    if key is None or key[0] == "":
        return []
    base, task = key
    found = []
    for dep in deps:
        keys = [slurm.job_key(j) for j in dep.job_ids if j]
        if any(k and k[0] == base and (not task or k[1] == task) for k in keys):
            found.append(dep)
    return found
