"""The other workflows of the CLI, as functions a notebook can call too: the settings described, the registry
with a plan per model, a plan and its job script, a rendered script, the deployments' status rows, a
deployment's logs, doctor, a model's download, the plain-sbatch templates, and the sources a batch runs against
(an endpoint file, a base URL)."""

from __future__ import annotations

import dataclasses
import shutil
import sys
import time
import typing as tp
from pathlib import Path

from ..errors import UsageError

if tp.TYPE_CHECKING:
    from ..batch.sources import EndpointSource, StaticSource
    from ..deployments.live import StatusesProbe
    from ..deployments.status import ReplicaStatus
    from ..model.pull import PullFile
    from ..node.binaries import LlamaBinaries
    from ..ops.buildllama import BuildOptions
    from ..ops.doctor import Check
    from ..planning.plan import Plan
    from ..rundir.layout import Deployment as DeploymentRecord
    from ..settings.settings import Settings

# ----------------------------------------------------------------------------------------------------------
# settings, executors, models, plans


def executor_names() -> tuple[str, ...]:
    """The executors a deployment can run on (``--executor``'s choices, besides "auto")."""
    from ..cluster.registry import NAMES

    return NAMES


def describe_settings(settings: Settings) -> list[tuple[str, tp.Any, str]]:
    """Every setting as (dotted key, value, where it came from)."""
    from ..settings.settings import describe

    return describe(settings)


def models(settings: Settings) -> list[dict[str, tp.Any]]:
    """The model registry, one row per model (name, files, size, present, host, ctx, description), with the
    nodes one replica needs at the model's context (``nodes``; None and ``problem`` when it cannot be planned)."""
    from ..cluster.registry import get
    from ..model.registry import model_rows, resolve_model
    from ..planning.plan import make_plan

    rows = model_rows(settings)
    runs_on = get("slurm")  # the nodes a replica needs on the cluster, wherever the listing is asked
    for row in rows:
        try:
            plan = make_plan(settings, resolve_model(settings, row["name"]), runs_on=runs_on)
            row["nodes"] = plan.nodes
        except UsageError as exc:
            row["nodes"] = None
            row["problem"] = exc.message
    return rows


@dataclasses.dataclass(frozen=True)
class Planned:
    """What ``speedslurm plan`` shows: the plan, the job script it would submit (None: processes are started)
    and llama.cpp's binaries (None: not found, ``up`` would stop there)."""

    plan: Plan
    script: str | None
    binaries: LlamaBinaries | None

    def describe(self) -> list[str]:
        """The plan in lines a person reads."""
        from ..planning.plan import describe_plan

        return describe_plan(self.plan)


def plan(settings: Settings, model: str, *, nodes: int | None = None, replicas: int = 1, ctx: int | None = None,
         time_limit: str | None = None, executor: str | None = None) -> Planned:
    """The plan of a deployment and its exact job, validated as ``up`` would; submits nothing."""
    from ..cluster.registry import get
    from ..deployments import lifecycle
    from ..rundir.layout import RunDir

    planned, binaries = lifecycle.prepare(settings, model, nodes=nodes, replicas=replicas, ctx=ctx,
                                          time_limit=time_limit, executor=executor, require_binaries=False)
    script = get(planned.executor).job_script(planned, RunDir(settings.run.root / "<deployment-id>"))
    return Planned(planned, script, binaries)


# ----------------------------------------------------------------------------------------------------------
# render


@dataclasses.dataclass(frozen=True)
class Rendered:
    """A job script for plain sbatch and the run directory it runs from."""

    plan: Plan
    deployment_id: str
    run_dir: Path
    script_path: Path
    script: str
    endpoint_files: list[Path]


def render(settings: Settings, model: str, *, nodes: int | None = None, replicas: int = 1, ctx: int | None = None,
           time_limit: str | None = None, output: Path | None = None, run_dir: Path | None = None,
           python: str | None = None) -> Rendered:
    """Write the job script ``up`` would submit, for plain ``sbatch``, and create the run directory it needs
    (``run_dir``, default a new one under run.dir); the script goes to ``output`` (default RUN_DIR/job.sbatch).
    ``python``: the interpreter the nodes run the job side with (default this one)."""
    from ..deployments import lifecycle
    from ..deployments import render as rn
    from ..deployments.record import binaries_record
    from ..rundir.layout import RunDir

    planned, binaries = lifecycle.prepare(settings, model, nodes=nodes, replicas=replicas, ctx=ctx,
                                          time_limit=time_limit, executor="slurm", place=False)
    root = run_dir.expanduser().absolute() if run_dir else rn.default_run_dir(settings, planned.model.name)
    python = python or sys.executable
    # Render before creating anything: a value the script cannot carry stops here.
    rn.render_script(planned, RunDir(root), python)
    path = output or root / "job.sbatch"
    # status names the script to submit while no job of it is found, and finds a job by it in accounting.
    record = {**rn.deployment_record(settings, planned, binaries_record(binaries), root.name),
              "script": str(path.absolute())}
    rd = rn.create_run_dir(root, record, planned.replicas)
    script = rn.render_script(planned, rd, python)
    path.write_text(script)
    return Rendered(planned, rd.deployment_id, rd.root, path, script,
                    [rd.endpoint_path(r) for r in range(planned.replicas)])


# ----------------------------------------------------------------------------------------------------------
# status, logs


def statuses_probe() -> StatusesProbe:
    """A refreshing view's way to ask for many deployments' statuses: Slurm is asked less often while nothing
    changes. Call it with a list of deployment records."""
    from ..deployments.live import StatusesProbe

    return StatusesProbe()


def status_rows(settings: Settings, ident: str | None = None, show_all: bool = False,
                probe: tp.Callable[[list[DeploymentRecord]], list[list[ReplicaStatus]]] | None = None,
                with_metrics: bool = False) -> list[dict[str, tp.Any]]:
    """``speedslurm status``'s rows: one per deployment (``ident``'s alone, else all but those ended over a day
    ago unless ``show_all``), with each replica's state, endpoint and node-hours (and, ``with_metrics``, the
    ready ones' load). ``probe``: a refreshing view's (:func:`statuses_probe`)."""
    from ..deployments.nodehours import deployment_usage, replica_usage
    from ..deployments.record import find_deployment, list_deployments
    from ..deployments.status import deployment_state, deployment_why, statuses_of

    deps = [find_deployment(settings, ident)] if ident else list_deployments(settings)
    rows = []
    # One squeue for the live jobs of every deployment; those already seen ended are not asked about again
    # (``probe``: a refreshing view's, which asks less often while nothing changes).
    for dep, statuses in zip(deps, (probe or statuses_of)(deps), strict=True):
        state = deployment_state(statuses)
        if not ident and not show_all and state in ("ENDED",) and time.time() - dep.info.get("created_at", 0) > 86400:
            continue
        rows.append({
            "id": dep.id, "model": dep.info.get("model", {}).get("name"), "state": state,
            "why": deployment_why(statuses),
            "executor": dep.executor, "job_ids": dep.job_ids, "nodes": dep.info.get("nodes"),
            "replicas": [s.to_json() for s in statuses], "age_s": round(time.time() - dep.info.get("created_at", 0), 1),
            "endpoints": [s.endpoint.openai_base_url for s in statuses if s.endpoint and s.state == "READY"],
            "run_dir": str(dep.run_dir.root),
            **deployment_usage(dep, statuses),
        })
        for rep, st in zip(rows[-1]["replicas"], statuses, strict=True):
            held = replica_usage(dep, st)
            rep.update(node_hours=round(held["node_hours"], 4), gpu_hours=held["gpu_hours"],
                       node_hours_source=held["source"])
        if with_metrics and state == "READY":
            from ..deployments.live import snapshot

            load = {r["replica"]: r["metrics"] for r in snapshot(dep, statuses)["replicas"]}
            for rep in rows[-1]["replicas"]:
                rep["metrics"] = load.get(rep["replica"])
    return rows


@dataclasses.dataclass(frozen=True)
class Logs:
    """A deployment's log files (llama-server's of the leaders, rpc-server's of the followers)."""

    record: DeploymentRecord
    files: list[Path]

    @property
    def root(self) -> Path:
        return self.record.run_dir.root

    def state(self) -> str:
        """The deployment's state now (asks the executor)."""
        from ..deployments.status import deployment_state, replica_statuses

        return deployment_state(replica_statuses(self.record))


def logs(settings: Settings, ident: str, role: str = "all", replica: int | None = None) -> Logs:
    """The log files of deployment ``ident``: of ``role`` (leader, follower or all), of one replica or all."""
    from ..deployments.record import find_deployment

    dep = find_deployment(settings, ident)
    if replica is not None and not 0 <= replica < dep.replicas:
        raise UsageError(f"deployment {dep.id} has no replica {replica}",
                         fix=f"give --replica from 0 to {dep.replicas - 1}, or leave it out for all")
    files = []
    for r in range(dep.replicas) if replica is None else [replica]:
        folder = dep.run_dir.log_dir(r)
        for path in sorted(folder.glob("*.log")) if folder.is_dir() else []:
            if role == "all" or path.name.startswith(role):
                files.append(path)
    return Logs(dep, files)


def log_tail(path: Path, lines: int) -> str:
    """The last ``lines`` lines of a log file."""
    from ..node.children import log_tail as tail

    return tail(path, lines)


# ----------------------------------------------------------------------------------------------------------
# doctor, build options, models pull, templates


def doctor(settings: Settings, *, on_nodes: bool = True) -> list[Check]:
    """Is this cluster ready for a deployment: one check each (``ok``, ``detail``, ``fix``)."""
    from ..ops.doctor import run_checks

    return run_checks(settings, on_nodes=on_nodes)


def build_options(**fields: tp.Any) -> BuildOptions:
    """The options of :func:`speedslurm.api.build_llama` (prefix, source, git_url, git_ref, cuda, cuda_archs,
    partition, cpus, time, extra_cmake_args)."""
    from ..ops.buildllama import BuildOptions

    return BuildOptions(**fields)


def pull_model(settings: Settings, name: str, dest_dir: Path | None = None, *, revision: str | None = None,
               progress: bool = True,
               on_file: tp.Callable[[PullFile, str], None] = lambda f, state: None) -> list[tuple[PullFile, str]]:
    """Download a registry model's GGUF file(s) from the Hugging Face Hub (resumable; sizes verified);
    ``on_file(file, state)`` with state start, present or done."""
    from ..model.pull import pull_model as pull

    return pull(settings, name, dest_dir, revision=revision, progress=progress, on_file=on_file)


TEMPLATES = ("llama-rpc-hetjob.sbatch", "llama-rpc-array.sbatch", "build-llama.sbatch")


def write_templates(folder: Path) -> list[Path]:
    """Copy the plain-sbatch templates into ``folder`` and build ``speedslurm-node.pyz`` beside them; returns
    the files."""
    from ..ops.nodepyz import build
    from ..settings.packaged import TEMPLATES as TEMPLATE_DIR
    from ..settings.packaged import data_dir

    source = data_dir(TEMPLATE_DIR)
    if source is None:
        raise UsageError("this installation of speedslurm carries no sbatch templates",
                         fix="reinstall speedslurm (the wheel ships them as speedslurm/sbatch_templates)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        written = []
        for name in TEMPLATES:
            shutil.copyfile(source / name, folder / name)
            (folder / name).chmod(0o755)
            written.append(folder / name)
        written.append(build(folder))
    except OSError as exc:
        raise UsageError(f"cannot write the templates into {folder}: {exc.strerror or exc}",
                         fix="choose a folder you can write, on a filesystem the nodes mount") from None
    return written


# ----------------------------------------------------------------------------------------------------------
# batches: sources and results


def endpoint_file_source(paths: tp.Sequence[Path]) -> EndpointSource:
    """The replicas that endpoint files (a leader's ``endpoint.json``) name."""
    from ..batch.sources import StaticSource
    from ..rundir.records import ContractError, Endpoint, read_record

    endpoints = []
    for path in paths:
        try:
            endpoint = read_record(path, Endpoint)
        except ContractError as exc:
            raise UsageError(f"endpoint file {path}: {exc.message}",
                             fix="point at a deployment's endpoint.json, written by this version of speedslurm") from None
        if endpoint is None:
            raise UsageError(f"endpoint file {path} does not exist", fix="check the path given to --endpoint-file")
        endpoints.append(endpoint)
    return StaticSource(endpoints)


def base_url_source(base_url: str, api_key: str | None, *, timeout: float = 10.0) -> StaticSource:
    """Any OpenAI-compatible server as a batch's one replica (its slots asked of it)."""
    from ..batch.sources import StaticSource

    return StaticSource.probe(base_url, api_key, timeout=timeout)


def read_results(path: Path) -> dict[str, dict[str, tp.Any]]:
    """A results file's final line per custom_id."""
    from ..batch.results import final_view

    return final_view(path)
