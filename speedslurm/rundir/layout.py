"""Run directory layout: where each file of the contract (:mod:`speedslurm.rundir.records`) lies, and typed access to it.

One deployment = one run directory (mode 0700) on the shared filesystem::

    <runs_root>/<deployment_id>/
        deployment.json          what was submitted: plan, job ids, executor, created_at (and, for the local
                                 executor, each controller process's identity: pid, start time, boot id, host)
        jobs-ended.json          the final Slurm state of each job once a client saw it end: never asked again
        submitit/                submitit's folder (pickles, Slurm stdout/stderr)
        r<R>/                    one folder per replica R
            follower-<rank>.json rendezvous: where follower <rank>'s rpc-server listens
            loading.json         the leader started llama-server (state LOADING)
            endpoint.json        mode 0600, written atomically once /health answers 200 (state READY)
            failed.json          why a role gave up: role, rank, node, exit code, last log lines
            logs/leader.log, logs/follower-<rank>.log   the children's output

Every handshake file carries ``job_id`` and ``epoch`` (which start of the job wrote it: Slurm's restart count,
0 for a first start): a requeued job keeps its id, and its earlier start's files must not be taken for current.
"""

from __future__ import annotations

import dataclasses
import os
import stat
import typing as tp
from pathlib import Path

from ..errors import UsageError
from .records import (
    SCHEMA,
    DeploymentRecord,
    Endpoint,
    Failed,
    Follower,
    Loading,
    read_record,
    write_record,
)

__all__ = ["DEPLOYMENT", "ENDPOINT", "FAILED", "JOBS_ENDED", "LOADING", "RunDir",
           "check_parent_not_world_writable", "make_private_dir"]

ENDPOINT = "endpoint.json"
FAILED = "failed.json"
LOADING = "loading.json"
DEPLOYMENT = "deployment.json"
JOBS_ENDED = "jobs-ended.json"


def make_private_dir(path: Path, what: str = "run directory", setting: str = "run.dir") -> Path:
    """Create ``path`` (and parents) with mode 0700 for the leaf, and make an existing leaf 0700; refuse one that
    someone else owns or that cannot be made. The errors call it ``what`` and name the ``setting`` that moves it."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        st = path.stat()
    except OSError as exc:
        raise UsageError(f"cannot use the {what} {path}: {exc.strerror or exc}",
                         fix=f"set {setting} to a folder you can write (--set {setting}=PATH)") from None
    if st.st_uid != os.getuid():
        raise UsageError(f"{what} {path} is owned by uid {st.st_uid}, not you (uid {os.getuid()})",
                         fix=f"choose a {what} of your own with --set {setting}=PATH")
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)
    return path


def check_parent_not_world_writable(path: Path) -> None:
    """Refuse a runs root inside a folder that other users can write without the sticky bit.

    Others could then replace our run directory (and the endpoint file in it) with their own.
    """
    p = Path(path).resolve()
    for parent in [p, *p.parents]:
        if not parent.exists():
            continue
        st = parent.stat()
        if st.st_mode & stat.S_IWOTH and not st.st_mode & stat.S_ISVTX:
            raise UsageError(f"run directory {path} is inside {parent}, which any user can write",
                             fix="set run.dir to a folder only you can write (e.g. under your home on the shared filesystem)")


@dataclasses.dataclass(frozen=True)
class RunDir:
    """Paths inside one deployment's run directory."""

    root: Path

    @property
    def deployment_id(self) -> str:
        return self.root.name

    @property
    def submitit_dir(self) -> Path:
        return self.root / "submitit"

    @property
    def jobs_ended_path(self) -> Path:
        return self.root / JOBS_ENDED

    def replica_dir(self, replica: int) -> Path:
        return self.root / f"r{replica}"

    def endpoint_path(self, replica: int) -> Path:
        return self.replica_dir(replica) / ENDPOINT

    def failed_path(self, replica: int) -> Path:
        return self.replica_dir(replica) / FAILED

    def loading_path(self, replica: int) -> Path:
        return self.replica_dir(replica) / LOADING

    def follower_path(self, replica: int, rank: int) -> Path:
        return self.replica_dir(replica) / f"follower-{rank}.json"

    def log_dir(self, replica: int) -> Path:
        return self.replica_dir(replica) / "logs"

    def log_path(self, replica: int, role: str, rank: int = 0) -> Path:
        name = "leader.log" if role == "leader" else f"follower-{rank}.log"
        return self.log_dir(replica) / name

    @property
    def deployment_path(self) -> Path:
        return self.root / DEPLOYMENT

    def deployment(self) -> dict[str, tp.Any] | None:
        """deployment.json as a dict (checked against :class:`DeploymentRecord`); None when absent."""
        record = self.deployment_record()
        return None if record is None else record.to_json()

    def deployment_record(self) -> DeploymentRecord | None:
        return read_record(self.deployment_path, DeploymentRecord)

    def write_deployment(self, info: tp.Mapping[str, tp.Any] | DeploymentRecord) -> DeploymentRecord:
        """Write deployment.json (atomically); a dict is checked against :class:`DeploymentRecord` first."""
        record = info if isinstance(info, DeploymentRecord) else \
            DeploymentRecord.from_json({"schema": SCHEMA, **info},
                                       where=str(self.deployment_path))
        write_record(self.deployment_path, record)
        return record

    def endpoint(self, replica: int) -> Endpoint | None:
        return read_record(self.endpoint_path(replica), Endpoint)

    def failure(self, replica: int) -> Failed | None:
        return read_record(self.failed_path(replica), Failed)

    def loading(self, replica: int) -> Loading | None:
        return read_record(self.loading_path(replica), Loading)

    def follower(self, replica: int, rank: int) -> Follower | None:
        return read_record(self.follower_path(replica, rank), Follower)

    def write(self, path: Path, record: Endpoint | Failed | Follower | Loading) -> None:
        write_record(path, record)

    def record_job(self, job_id: str, replica: int) -> None:
        """Put ``job_id`` at index ``replica`` of deployment.json's job_ids (a rendered script does this as it
        starts; array tasks do it concurrently, under a lock)."""
        import fcntl
        import time

        with open(self.root / ".deployment.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            record = self.deployment_record()
            if record is None:
                raise UsageError(f"{self.root} holds no {DEPLOYMENT}", fix="render the script again")
            ids = list(record.job_ids) + [""] * (record.replicas - len(record.job_ids))
            if replica < len(ids):
                ids[replica] = job_id
            self.write_deployment(dataclasses.replace(record, job_ids=ids,
                                                      submitted_at=record.submitted_at or time.time()))

    def endpoints(self, replicas: int) -> list[Endpoint]:
        return [ep for r in range(replicas) if (ep := self.endpoint(r)) is not None]


# ----------------------------------------------------------------------------------------------------------
# A deployment, as the client reads it


@dataclasses.dataclass
class Deployment:
    """A deployment as its run directory records it (``deployment.json``)."""

    run_dir: RunDir
    info: dict[str, tp.Any]

    @property
    def id(self) -> str:
        return self.run_dir.deployment_id

    @property
    def replicas(self) -> int:
        return int(self.info.get("replicas", 1))

    @property
    def executor(self) -> str:
        return str(self.info.get("executor", "slurm"))

    @property
    def job_ids(self) -> list[str]:
        return [str(j) for j in self.info.get("job_ids", [])]

    def replica_job_id(self, replica: int) -> str:
        """The job id of ``replica`` ("" before it is known): one per replica, or one for all."""
        ids = self.job_ids
        if not ids:
            return ""
        return ids[replica] if replica < len(ids) else ids[0]

    def reload(self) -> Deployment:
        self.info = self.run_dir.deployment() or self.info
        return self


def script_path(dep: Deployment) -> Path:
    """The job script ``render`` wrote for the deployment."""
    return Path(dep.info.get("script") or dep.run_dir.root / "job.sbatch")
