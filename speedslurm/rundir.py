"""Run directory layout and the files that carry the handshake between the job side and the client.

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

import contextlib
import dataclasses
import json
import os
import stat
import tempfile
import typing as tp
from pathlib import Path

from .errors import UsageError

ENDPOINT = "endpoint.json"
FAILED = "failed.json"
LOADING = "loading.json"
DEPLOYMENT = "deployment.json"
JOBS_ENDED = "jobs-ended.json"


@dataclasses.dataclass(frozen=True)
class Endpoint:
    """What a client needs to reach one ready replica (the content of endpoint.json)."""

    url: str  # base URL without /v1, e.g. http://10.77.0.11:8080
    api_key: str
    model: str
    deployment_id: str
    replica: int
    job_id: str
    leader_node: str
    follower_nodes: list[str]
    rpc_servers: list[str]
    llama_version: str
    parallel: int
    ctx: int
    started_at: float
    ready_at: float
    pid: int = 0
    epoch: int = 0  # the job's start (SLURM_RESTART_COUNT) that wrote it: a requeued job keeps its job id

    @property
    def openai_base_url(self) -> str:
        return self.url.rstrip("/") + "/v1"

    def to_json(self) -> dict[str, tp.Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, tp.Any]) -> Endpoint:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def public(self, show_key: bool = False) -> dict[str, tp.Any]:
        """The fields safe to print: the API key is masked unless asked for."""
        data = self.to_json()
        if not show_key:
            data["api_key"] = "***"
        return data


def write_json_atomic(path: Path, data: tp.Any, mode: int = 0o600) -> None:
    """Write JSON to ``path`` so that readers see either nothing or the whole file (temp + rename)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=1, sort_keys=True)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def read_json(path: Path) -> dict[str, tp.Any] | None:
    """Read a JSON file written by :func:`write_json_atomic`; None when absent."""
    try:
        with open(path) as fh:
            return tp.cast(dict[str, tp.Any], json.load(fh))
    except FileNotFoundError:
        return None


def file_epoch(data: tp.Mapping[str, tp.Any]) -> int:
    """The start of its job a handshake file belongs to (files without one were written by a first start)."""
    try:
        return int(data.get("epoch") or 0)
    except (TypeError, ValueError):
        return -1


def make_private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) with mode 0700 for the leaf; refuse a leaf others can write."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = path.stat()
    if st.st_uid != os.getuid():
        raise UsageError(f"run directory {path} is owned by uid {st.st_uid}, not you (uid {os.getuid()})",
                         fix="choose a run directory of your own with --set run.dir=PATH")
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

    def deployment(self) -> dict[str, tp.Any] | None:
        return read_json(self.root / DEPLOYMENT)

    def endpoint(self, replica: int) -> Endpoint | None:
        data = read_json(self.endpoint_path(replica))
        return Endpoint.from_json(data) if data else None

    def failure(self, replica: int) -> dict[str, tp.Any] | None:
        return read_json(self.failed_path(replica))

    def endpoints(self, replicas: int) -> list[Endpoint]:
        return [ep for r in range(replicas) if (ep := self.endpoint(r)) is not None]
