"""The run directory's files as typed records: the one contract between the client and the job side.

Every file the client and the nodes share is one record below, read and written only through this module:

=================================  ==========================  ===================================================
file                               record                      written by
=================================  ==========================  ===================================================
``deployment.json``                :class:`DeploymentRecord`   the client (``up``, ``render``), or the job side's
                                                               ``prepare`` for a plain-sbatch template
``r<R>/follower-<rank>.json``      :class:`Follower`           a follower, once its rpc-server listens
``r<R>/loading.json``              :class:`Loading`            the leader, once llama-server started
``r<R>/endpoint.json``             :class:`Endpoint`           the leader, once ``/health`` answers 200 (0600)
``r<R>/failed.json``               :class:`Failed`             either role, when it gives up
=================================  ==========================  ===================================================

Each record carries ``schema`` (:data:`SCHEMA`); ``from_json`` refuses a file of another schema or one that
lacks a field, naming the file's problem, so a client never acts on a file it misreads. Handshake files also
carry the job id (:class:`JobId`) and the start (``epoch``, Slurm's restart count) that wrote them.

Standard library only: the job side imports it on the nodes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import typing as tp
from pathlib import Path

from ..errors import UsageError

# The version of every record's layout; a reader refuses files of another one.
SCHEMA = 1

_FIX = ("the file was written by another version of speedslurm, or edited: start the deployment again with this "
        "version (speedslurm down ID; speedslurm up ...)")


class ContractError(UsageError):
    """A run-directory file that is not the record it should be (wrong schema, a field missing or mistyped)."""

    def __init__(self, message: str, fix: str | None = _FIX) -> None:
        super().__init__(message, fix)


# ----------------------------------------------------------------------------------------------------------
# Job ids


@dataclasses.dataclass(frozen=True)
class JobId:
    """A job id in every form speedslurm meets: ``123`` (a job, or a local controller's pid), ``123_4`` (array
    task 4), ``123+1`` (hetjob component 1), ``123_[0-3]`` (a pending array as squeue prints it), ``123.0``
    (a step). ``str()`` gives back the form parsed."""

    base: str            # the digits before any suffix: what scancel, squeue -j and sacct -j take
    task: str = ""       # array task id, or "[0-3]" for a pending array's range
    component: str = ""  # hetjob component
    step: str = ""

    @classmethod
    def parse(cls, text: str) -> JobId:
        """Parse ``text``; :class:`ValueError` naming it when it is not a job id."""
        s = str(text).strip()
        head, _, step = s.partition(".")
        head, _, comp = head.partition("+")
        base, sep, task = head.partition("_")
        ok = (base.isdigit() and (not sep or task.isdigit() or (task.startswith("[") and task.endswith("]")))
              and (not comp or comp.isdigit()) and (not step or step.replace("_", "").isalnum())
              and ("+" not in s or comp) and ("." not in s or step))
        if not ok:
            raise ValueError(f"{text!r} is not a Slurm job id (forms: 123, 123_4, 123+1, 123_[0-3], 123.0)")
        return cls(base, task, comp, step)

    @classmethod
    def base_of(cls, text: str) -> str:
        """The base id of ``text`` (``123`` for ``123_4`` or ``123+1``); ``text`` itself when it is not a job id."""
        try:
            return cls.parse(text).base
        except ValueError:
            return str(text)

    @property
    def array_task(self) -> int | None:
        """The array task number (None for a job that is not one array task)."""
        return int(self.task) if self.task.isdigit() else None

    @property
    def pending_array(self) -> bool:
        return self.task.startswith("[")

    @property
    def job(self) -> JobId:
        """The job as speedslurm records it: without hetjob component and step (``123``, ``123_4``)."""
        return JobId(self.base, self.task)

    def __str__(self) -> str:
        return (self.base + (f"_{self.task}" if self.task else "") + (f"+{self.component}" if self.component else "")
                + (f".{self.step}" if self.step else ""))

    @classmethod
    def from_env(cls, environ: tp.Mapping[str, str] | None = None) -> str:
        """This task's job id as the client records it: ``123`` (a job; a hetjob's leader id, which the batch
        script exports as SPEEDSLURM_JOB_ID), ``123_4`` (array task), or the local controller's pid; "" outside
        a job."""
        env = os.environ if environ is None else environ
        array, task = env.get("SLURM_ARRAY_JOB_ID"), env.get("SLURM_ARRAY_TASK_ID")
        if array and task:
            return str(cls(array, task))
        return env.get("SPEEDSLURM_JOB_ID") or env.get("SLURM_JOB_ID") or env.get("SUBMITIT_LOCAL_JOB_ID", "")


def current_epoch(environ: tp.Mapping[str, str] | None = None) -> int:
    """Which start of this job this is: Slurm's ``SLURM_RESTART_COUNT`` (0 when unset). A requeued job keeps its
    job id, so the job id alone would take its earlier start's files for this one's: every handshake file
    carries both."""
    env = os.environ if environ is None else environ
    try:
        return int(env.get("SLURM_RESTART_COUNT") or 0)
    except ValueError:
        return 0


# ----------------------------------------------------------------------------------------------------------
# Records

R = tp.TypeVar("R", bound="Record")
_TYPES: dict[str, tuple[type, ...]] = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,),
                                       "int | None": (int, type(None)), "float | None": (int, float, type(None)),
                                       "list[str]": (list,), "list[int]": (list,), "list[dict[str, tp.Any]]": (list,),
                                       "dict[str, tp.Any]": (dict,), "dict[str, str]": (dict,)}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Record:
    """Base of every record: ``schema`` and the strict JSON round trip."""

    FILE: tp.ClassVar[str] = ""
    # Fields a file must hold even though the constructor has a default for them.
    REQUIRED: tp.ClassVar[frozenset[str]] = frozenset()

    def to_json(self) -> dict[str, tp.Any]:
        return {"schema": SCHEMA, **dataclasses.asdict(self)}

    @classmethod
    def from_json(cls: type[R], data: tp.Any, where: str = "") -> R:
        """The record in ``data``; :class:`ContractError` for another schema, a missing or mistyped field."""
        name = where or cls.FILE
        if not isinstance(data, dict):
            raise ContractError(f"{name} does not hold a JSON object")
        if data.get("schema") != SCHEMA:
            raise ContractError(f"{name} has schema {data.get('schema')!r}; this version of speedslurm reads "
                                f"schema {SCHEMA}")
        values: dict[str, tp.Any] = {}
        missing = []
        for f in dataclasses.fields(cls):
            if f.name not in data:
                if f.name in cls.REQUIRED or (f.default is dataclasses.MISSING
                                              and f.default_factory is dataclasses.MISSING):
                    missing.append(f.name)
                continue
            value = data[f.name]
            allowed = _TYPES.get(str(f.type))
            if allowed and (not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed)):
                raise ContractError(f"{name}: field {f.name!r} is {value!r}, not {f.type}")
            values[f.name] = value
        if missing:
            raise ContractError(f"{name} lacks the field(s) {', '.join(missing)}")
        return cls(**values)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Handshake(Record):
    """A file a role writes while the job runs: which job and which start of it wrote it."""

    REQUIRED: tp.ClassVar[frozenset[str]] = frozenset({"epoch"})
    job_id: str
    epoch: int = 0  # the job's start (SLURM_RESTART_COUNT) that wrote it: a requeued job keeps its job id


@dataclasses.dataclass(frozen=True, kw_only=True)
class Follower(Handshake):
    """``r<R>/follower-<rank>.json``: where follower ``rank``'s rpc-server listens."""

    FILE: tp.ClassVar[str] = "follower-<rank>.json"
    rank: int
    node: str
    host: str            # its cluster address
    port: int            # rpc-server's port
    pid: int
    version: str         # the build id of its rpc-server (GNU build-id of libggml-rpc): must match the leader's
    heartbeat_port: int  # answers "ok" while the follower lives (0: none)
    started_at: float


@dataclasses.dataclass(frozen=True, kw_only=True)
class Loading(Handshake):
    """``r<R>/loading.json``: the leader started llama-server, which loads the model."""

    FILE: tp.ClassVar[str] = "loading.json"
    url: str
    node: str
    pid: int
    time: float


@dataclasses.dataclass(frozen=True, kw_only=True)
class Failed(Handshake):
    """``r<R>/failed.json``: why a role gave up (the replica's first failure is kept)."""

    FILE: tp.ClassVar[str] = "failed.json"
    role: str              # leader or follower
    rank: int
    node: str
    exit_code: int | None  # the server's exit code (None: it did not exit, e.g. a timeout)
    reason: str
    log_tail: str
    time: float
    # "time limit" or "idle" (no request for llama.idle_timeout): the replica came to an end (the client shows
    # ENDED, not FAILED)
    cause: str = "failed"

    def describe(self) -> str:
        """One line: ``follower 1 on n2: reason (exit code 1)``."""
        who = self.role if self.role == "leader" or not self.rank else f"{self.role} {self.rank}"
        text = f"{who} on {self.node}" if self.node else who
        text = f"{text}: {self.reason}" if self.reason else text
        return f"{text} (exit code {self.exit_code})" if self.exit_code is not None else text


@dataclasses.dataclass(frozen=True, kw_only=True)
class Endpoint(Handshake):
    """``r<R>/endpoint.json``: what a client needs to reach one ready replica."""

    FILE: tp.ClassVar[str] = "endpoint.json"
    url: str  # base URL without /v1, e.g. http://10.77.0.11:8080
    api_key: str
    model: str
    deployment_id: str
    replica: int
    leader_node: str
    follower_nodes: list[str]
    rpc_servers: list[str]
    llama_version: str
    parallel: int
    ctx: int
    started_at: float
    ready_at: float
    pid: int = 0

    @property
    def openai_base_url(self) -> str:
        return self.url.rstrip("/") + "/v1"

    def public(self, show_key: bool = False) -> dict[str, tp.Any]:
        """The fields safe to print: the API key is masked unless asked for."""
        data = self.to_json()
        if not show_key:
            data["api_key"] = "***"
        return data


@dataclasses.dataclass(frozen=True, kw_only=True)
class JobsEnded(Record):
    """``jobs-ended.json``, kept by the client: Slurm's last word on each job of the deployment it saw end, so that
    the job is never asked about again. Job id -> its ``state``, ``reason``, ``exit_code``, ``nodes``,
    ``elapsed_s``, ``node_s``, ``gpu_s`` (as Slurm gave them) and ``seen_at``."""

    FILE: tp.ClassVar[str] = "jobs-ended.json"
    jobs: dict[str, tp.Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DeploymentRecord(Record):
    """``deployment.json``: what was submitted, and what the job side needs to start its role.

    ``llama`` holds the llama.* settings (ngl, threads, rpc_cache, extra args, ports, ...), ``binaries`` the
    paths of llama-server and rpc-server (``llama_server``, ``rpc_server``, ``env``, ``version``), ``model``
    its ``name`` and ``path`` (and ``chat_template``).
    """

    FILE: tp.ClassVar[str] = "deployment.json"
    id: str
    created_at: float
    executor: str  # slurm or local
    model: dict[str, tp.Any]
    nodes: int
    replicas: int
    ctx: int
    parallel: int
    job_ids: list[str]
    submitted_by: str
    uid: int = -1
    llama: dict[str, tp.Any] = dataclasses.field(default_factory=dict)
    binaries: dict[str, tp.Any] = dataclasses.field(default_factory=dict)
    node_addresses: dict[str, str] = dataclasses.field(default_factory=dict)
    follower_timeout_s: float = 300.0
    health_timeout_s: float = 1800.0
    poll_interval_s: float = 0.5
    plan: dict[str, tp.Any] = dataclasses.field(default_factory=dict)
    # Written once jobs are known, or by down:
    local_processes: list[dict[str, tp.Any]] = dataclasses.field(default_factory=list)
    submitted_at: float | None = None
    cancelled_at: float | None = None
    failed_before_cancel: list[int] = dataclasses.field(default_factory=list)
    stopped_because: str | None = None  # why whoever cancelled it did: idle, scaled down, handed over (gateway)
    script: str = ""  # a rendered script's path

    @property
    def on_this_machine(self) -> bool:
        """Every role runs on the machine it was started from (the local executor): all on 127.0.0.1, and never
        requeued by Slurm. What the job side must know of its executor, said once here."""
        return self.executor == "local"

    def to_json(self) -> dict[str, tp.Any]:
        data = super().to_json()
        for key in ("submitted_at", "cancelled_at", "stopped_because"):  # absent until it happened
            if data[key] is None:
                del data[key]
        if not self.failed_before_cancel and self.cancelled_at is None:
            del data["failed_before_cancel"]
        return data


# ----------------------------------------------------------------------------------------------------------
# Reading and writing


def write_json_atomic(path: Path, data: tp.Any, mode: int = 0o600) -> None:
    """Write JSON to ``path`` so that readers see either nothing or the whole file (temp + rename)."""
    write_text_atomic(path, json.dumps(data, indent=1, sort_keys=True) + "\n", mode)


def write_text_atomic(path: Path, text: str, mode: int = 0o600) -> None:
    """Write ``text`` to ``path`` so that readers see either nothing or the whole file (temp + rename)."""
    path = Path(path)
    import tempfile  # here: the job side's start does not pay for it

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
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


def write_record(path: Path, record: Record, mode: int = 0o600) -> None:
    write_json_atomic(path, record.to_json(), mode)


def read_record(path: Path, kind: type[R]) -> R | None:
    """The record of type ``kind`` in ``path``; None when absent; :class:`ContractError` when it is not one."""
    try:
        data = read_json(path)
    except ValueError as exc:
        raise ContractError(f"{path} is not JSON ({exc})") from None
    return None if data is None else kind.from_json(data, where=str(path))
