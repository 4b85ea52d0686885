"""The Python API: start a deployment, wait until it serves, talk to it, run batches through it, stop it.

Every command of the CLI is a thin layer over these functions (it parses flags, calls them and prints)::

    import speedslurm

    with speedslurm.start("Q4_K_S") as dep:          # submits, returns at once; stopped when the block ends
        dep.wait_ready(timeout=1800)                  # DeploymentFailed (with the log tail) if it cannot start
        client = dep.client()                         # an openai.OpenAI for the first ready replica
        summary = dep.run_batch([{"prompt": "Hello"}], out="results.jsonl")

Errors are the project's typed errors (:mod:`speedslurm.errors`): ``UsageError`` (bad input, nothing queued),
``DeploymentFailed``, ``SpeedslurmError``; each names the problem, and ``.fix`` says what to do. Settings come
from the same layers as the CLI's (``SPEEDSLURM_PROFILE``, ``SPEEDSLURM_CONFIG``, ``SPEEDSLURM_*``, the user's
config file); :func:`load_settings` gives them with a profile, a config file or ``KEY=VALUE`` overrides.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import typing as tp
from pathlib import Path

from .errors import UsageError

if tp.TYPE_CHECKING:
    import openai
    from rich.console import Console

    from .batch.runner import BatchOptions, PreparedBatch
    from .batch.sources import EndpointSource
    from .batch.summary import Summary
    from .deploy import Deployment as DeploymentRecord
    from .deploy import ReplicaStatus
    from .plan import Plan
    from .rundir import Endpoint
    from .settings import Settings

__all__ = ["Deployment", "Stopped", "batch_options", "connect", "deployment_source", "list_deployments",
           "load_settings", "prepare_prompts", "run_batch", "start", "submit", "up"]

OnUpdate = tp.Callable[["list[ReplicaStatus]", float], None]
OnMessage = tp.Callable[[str], None]
RunFn = tp.Callable[["EndpointSource", "PreparedBatch", "BatchOptions"], "Summary"]
Prompts = tp.Union[str, "os.PathLike[str]", tp.Iterable[tp.Mapping[str, tp.Any]]]


def load_settings(profile: str | None = None, config: str | os.PathLike[str] | None = None,
                  overrides: tp.Iterable[str] = ()) -> Settings:
    """The merged settings, as the CLI's ``--profile``, ``--config`` and ``--set KEY=VALUE`` give them."""
    from .settings import load_settings as load

    return load(profile=profile, config_path=config, overrides=tuple(overrides))


def _settings(settings: Settings | None) -> Settings:
    return settings if settings is not None else load_settings()


@dataclasses.dataclass(frozen=True)
class Stopped:
    """What :meth:`Deployment.stop` did: the job ids it cancelled (those not over already), the state after."""

    deployment: str
    cancelled: list[str]
    state: str
    why: str
    ended_before: list[str] = dataclasses.field(default_factory=list)  # job ids that had ended already


class Deployment:
    """A deployment: its run directory and jobs. A context manager that stops it on leaving the block (also
    on an exception); :func:`start` and :func:`connect` give one."""

    def __init__(self, record: DeploymentRecord, settings: Settings) -> None:
        self.record = record
        self.settings = settings

    def __repr__(self) -> str:
        return f"<speedslurm.Deployment {self.id} job(s) {', '.join(self.job_ids) or '-'}>"

    def __enter__(self) -> Deployment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def id(self) -> str:
        return self.record.id

    @property
    def job_ids(self) -> list[str]:
        return self.record.job_ids

    @property
    def run_dir(self) -> Path:
        return self.record.run_dir.root

    # ------------------------------------------------------------------------------------------ state

    def status(self) -> list[ReplicaStatus]:
        """Each replica's state (PENDING, STARTING, LOADING, READY, FAILED, ENDED, UNSUBMITTED) and why."""
        from . import deploy as dp

        return dp.replica_statuses(self.record)

    @property
    def state(self) -> str:
        """The deployment's state: the best any replica reached (FAILED only when every replica failed)."""
        from . import deploy as dp

        return dp.deployment_state(self.status())

    def wait_ready(self, timeout: float | None = None, *, until: str = "all",
                   on_update: OnUpdate | None = None) -> list[ReplicaStatus]:
        """Wait until every replica (``until="all"``) or one (``"first"``) is READY; returns the statuses.

        :class:`DeploymentFailed` (with the last log lines) when a replica fails, or after ``timeout`` seconds
        (None: as long as the job waits in the queue). ``on_update(statuses, elapsed_s)`` is called at each look.
        The deployment keeps running either way: stop it, or leave the ``with`` block.
        """
        from . import deploy as dp

        if until not in ("all", "first"):
            raise UsageError(f"until must be 'all' or 'first', got {until!r}", fix='use until="all" or until="first"')
        return dp.wait_ready(dp.StatusProbe(self.record), until=until, timeout=timeout,
                             interval=self.settings.run.poll_interval_s, on_update=on_update,
                             describe_failure=lambda s: dp.failure_text(self.record, s))

    def endpoints(self) -> list[Endpoint]:
        """The endpoints of the replicas that are READY now (URL, key, model name, nodes)."""
        return [s.endpoint for s in self.status() if s.state == "READY" and s.endpoint]

    def endpoint(self, replica: int | None = None) -> Endpoint:
        """A ready replica's endpoint (``replica``, else the first ready one); :class:`UsageError` if none is."""
        from . import deploy as dp

        statuses = self.status()
        ready = [s for s in statuses if s.state == "READY" and s.endpoint
                 and (replica is None or s.replica == replica)]
        if not ready:
            state, why = dp.deployment_state(statuses), dp.deployment_why(statuses)
            raise UsageError(f"deployment {self.id} has no ready endpoint"
                             f"{'' if replica is None else f' for replica {replica}'}"
                             f" (state {state}{': ' + why if why else ''})",
                             fix=f"check `speedslurm status {self.id}`")
        return tp.cast("Endpoint", ready[0].endpoint)

    def client(self, replica: int | None = None, **kwargs: tp.Any) -> openai.OpenAI:
        """An ``openai.OpenAI`` client for a ready replica (``kwargs`` go to its constructor: timeout, ...).
        ``client.models.list()`` names the model; :meth:`endpoint` gives it as ``.model``."""
        import openai

        ep = self.endpoint(replica)
        return openai.OpenAI(base_url=ep.openai_base_url, api_key=ep.api_key, **kwargs)

    # ------------------------------------------------------------------------------------------ batch and end

    def run_batch(self, prompts: Prompts, out: str | os.PathLike[str] | None = None, *,
                  options: BatchOptions | None = None, console: Console | None = None, **flags: tp.Any) -> Summary:
        """Send prompts through the deployment's ready replicas; see :func:`run_batch`."""
        return run_batch(deployment_source(self), prompts, out, options=options, console=console, **flags)

    def stop(self, wait: float = 30) -> Stopped:
        """Cancel the deployment's jobs (or local processes) and wait up to ``wait`` seconds for them to end.
        ``cancelled`` leaves out the jobs that had ended already (``ended_before``); a deployment rendered but
        never submitted has nothing to cancel (state UNSUBMITTED)."""
        from . import deploy as dp

        before = dp.replica_statuses(self.record)
        if all(s.state == "UNSUBMITTED" for s in before):
            return Stopped(self.id, [], "UNSUBMITTED", dp.deployment_why(before))
        over = sorted({s.job_id for s in before if s.state in ("ENDED", "FAILED")})
        ids = [j for j in dp.down(self.record) if j not in over]
        statuses = dp.wait_ended(self.record, timeout=wait)
        return Stopped(self.id, ids, dp.deployment_state(statuses), dp.deployment_why(statuses), over)


# ----------------------------------------------------------------------------------------------------------
# Starting and finding deployments


def start(model: str, *, nodes: int | None = None, replicas: int = 1, ctx: int | None = None,
          time_limit: str | None = None, executor: str | None = None,
          settings: Settings | None = None) -> Deployment:
    """Validate, plan and submit a deployment of ``model`` (a registry name or a .gguf path); returns at once.

    ``executor``: "slurm", "local" (processes on this machine, on 127.0.0.1) or "auto"; default: the
    settings' ``run.executor``. Everything is checked before anything is queued (:class:`UsageError`).
    Use it as a context manager to stop it at the end, or call :meth:`Deployment.stop`.
    """
    return _start(model, nodes=nodes, replicas=replicas, ctx=ctx, time_limit=time_limit, executor=executor,
                  settings=settings)[1]


def _start(model: str, *, nodes: int | None, replicas: int, ctx: int | None, time_limit: str | None,
           executor: str | None, settings: Settings | None) -> tuple[Plan, Deployment]:
    from . import deploy as dp

    s = _settings(settings)
    plan, binaries = dp.prepare(s, model, nodes=nodes, replicas=replicas, ctx=ctx, time_limit=time_limit,
                                executor=executor)
    return plan, Deployment(dp.launch(s, plan, binaries), s)


def up(model: str, *, nodes: int | None = None, replicas: int = 1, ctx: int | None = None,
       time_limit: str | None = None, executor: str | None = None, timeout: float | None = None,
       until: str = "all", settings: Settings | None = None, on_update: OnUpdate | None = None,
       on_message: OnMessage | None = None, keep_on_interrupt: bool = False) -> tuple[Deployment, list[ReplicaStatus]]:
    """:func:`start`, then :meth:`Deployment.wait_ready`: what ``speedslurm up`` does.

    A deployment that cannot become ready is stopped (it must not keep nodes busy), and so is one whose wait
    is interrupted (Ctrl-C), unless ``keep_on_interrupt``. ``on_message`` hears what happens to it in one line.
    """
    say = on_message or (lambda _text: None)
    plan, dep = _start(model, nodes=nodes, replicas=replicas, ctx=ctx, time_limit=time_limit, executor=executor,
                       settings=settings)
    say(f"deployment {dep.id}: {plan.model.name} on {plan.nodes} node(s) x {plan.replicas} replica(s), "
        f"job(s) {', '.join(dep.job_ids)}")
    try:
        statuses = dep.wait_ready(timeout, until=until, on_update=on_update)
    except KeyboardInterrupt:
        if keep_on_interrupt:
            say(f"Interrupted: deployment {dep.id} keeps starting (`speedslurm down {dep.id}` stops it).")
        else:
            _cancel(dep)
            say(f"Interrupted: cancelled deployment {dep.id}.")
        raise
    except BaseException:
        _cancel(dep)
        raise
    return dep, statuses


def _cancel(dep: Deployment) -> None:
    from . import deploy as dp

    dp.down(dep.record)


def connect(ident: str, settings: Settings | None = None) -> Deployment:
    """A deployment by its id, a unique prefix of it, or a Slurm job id (123, 123_4); :class:`UsageError`
    naming recent ones when none matches."""
    from . import deploy as dp

    s = _settings(settings)
    return Deployment(dp.find_deployment(s, ident), s)


def list_deployments(settings: Settings | None = None) -> list[Deployment]:
    """Every deployment in the run directory, oldest first."""
    from . import deploy as dp

    s = _settings(settings)
    return [Deployment(d, s) for d in dp.list_deployments(s)]


# ----------------------------------------------------------------------------------------------------------
# Batches


def deployment_source(dep: Deployment | DeploymentRecord) -> EndpointSource:
    """The replicas of a deployment as a batch's endpoint source: its run directory, plus the executor's view
    of its jobs (a replica whose job ended is dropped, one that comes up is added)."""
    from . import deploy as dp
    from .batch.sources import RunDirSource, describe_failure

    record = dep.record if isinstance(dep, Deployment) else dep
    statuses = dp.replica_statuses(record, {})  # the run directory says whether it was submitted
    if all(st.state == "UNSUBMITTED" for st in statuses):
        raise UsageError(f"deployment {record.id} was rendered but not submitted: nothing will serve it",
                         fix=f"submit it with `sbatch {dp.script_path(record)}`, then run this command again")

    # Each replica's current start (Slurm's restart count) as last asked: a requeued job keeps its id, and the
    # files of its earlier start (an endpoint with a dead port, a failure) are not taken for the new start's.
    restarts: dict[int, int | None] = {}

    def job_failures() -> dict[int, str]:
        out = {}
        for st in dp.replica_statuses(record):
            restarts[st.replica] = st.restarts
            if st.state == "PENDING" and st.restarts:
                continue  # requeued: it starts again, with a new endpoint
            if not st.failure and st.job_state.startswith("COMPLETING"):
                continue  # over, but Slurm does not say how yet (CANCELLED, TIMEOUT, ...): ask again soon
            if st.state in ("FAILED", "ENDED"):
                why = describe_failure(st.failure) if st.failure else \
                    f"job {st.job_id} ended ({st.job_state or 'gone'}{': ' + st.reason if st.reason else ''})"
                out[st.replica] = why
        return out

    # Slurm is asked a second after a change, then less and less often while the batch runs undisturbed; the
    # runner hurries the source when it sees a replica fail. Local processes cost Slurm nothing: every second.
    return RunDirSource(record.run_dir, record.replicas, job_failures=job_failures, alive_every=dp.SLURM_FIRST_S,
                        alive_most=dp.SLURM_MOST_S if record.executor == "slurm" else dp.SLURM_FIRST_S,
                        accept=lambda ep: dp.endpoint_is_current(record, ep, restarts.get(ep.replica)),
                        accept_failure=lambda r, info: dp.failure_is_current(record, r, info, restarts.get(r)))


def batch_options(**flags: tp.Any) -> BatchOptions:
    """:class:`~speedslurm.batch.runner.BatchOptions` from keyword flags (max_tokens, temperature, system,
    concurrency, timeout, retries, skip_invalid, quiet, client, lock); an unknown name is a UsageError."""
    from .batch.runner import BatchOptions

    names = {f.name for f in dataclasses.fields(BatchOptions)}
    unknown = sorted(set(flags) - names)
    if unknown:
        raise UsageError(f"unknown batch option(s): {', '.join(unknown)}", fix=f"use: {', '.join(sorted(names))}")
    return BatchOptions(**flags)


def prepare_prompts(prompts: Prompts, out: str | os.PathLike[str] | None,
                    options: BatchOptions) -> PreparedBatch:
    """Read and check the prompts (a JSONL file's path, or dicts) and open the results file (UsageError if bad).

    Dicts are request bodies as a prompts file holds them (``{"prompt": ...}``, ``{"messages": [...]}``, OpenAI
    Batch lines); they need ``out``. Running the same prompts into the same ``out`` again resumes."""
    from .batch.runner import prepare_batch

    out_path = Path(out) if out is not None else None
    if isinstance(prompts, (str, os.PathLike)):
        return prepare_batch(prompts if isinstance(prompts, str) else Path(prompts), out_path, options)
    if out is None:
        raise UsageError("prompts given as a list need a results file",
                         fix='pass out="results.jsonl" (running the same prompts into it again resumes)')
    with tempfile.TemporaryDirectory(prefix="speedslurm-prompts-") as folder:
        path = Path(folder) / "prompts.jsonl"
        count = 0
        with open(path, "w", encoding="utf-8") as fh:
            for count, item in enumerate(prompts, 1):
                if not isinstance(item, tp.Mapping):
                    raise UsageError(f"prompt {count} is a {type(item).__name__}, not a dict",
                                     fix='give each prompt as a dict, e.g. {"prompt": "..."} or {"messages": [...]}')
                fh.write(json.dumps(item, ensure_ascii=False) + "\n")
        # prepare_batch copies the prompts into its own spool as it reads them: the file may go afterwards.
        prepared = prepare_batch(path, out_path, options)
    prepared.display = f"the {count} prompt(s) given"
    return prepared


def run_batch(source: EndpointSource | Deployment, prompts: Prompts, out: str | os.PathLike[str] | None = None, *,
              options: BatchOptions | None = None, console: Console | None = None, **flags: tp.Any) -> Summary:
    """Send ``prompts`` through ``source`` (a :class:`Deployment`, or any endpoint source) and return the run's
    :class:`~speedslurm.batch.summary.Summary` (ok, failed, skipped, tokens, throughput, latencies).

    Results are OpenAI Batch output lines appended to ``out`` (default: ``<prompts>.results.jsonl``); prompts
    with a successful line there already are skipped. ``flags`` (or ``options``) shape the run: max_tokens,
    temperature, system, concurrency, timeout, retries, skip_invalid, client, lock, quiet (default True: no
    progress bar). Requests that failed are counted in ``summary.failed`` (their error lines are in ``out``);
    a run that cannot go on raises ``BatchFailed``, Ctrl-C ``BatchInterrupted`` (both carry ``.summary``).
    """
    from .batch.runner import run_batch as run

    if options is None:
        options = batch_options(**{"quiet": True, **flags})
    elif flags:
        raise UsageError(f"pass either options or flags, not both (got {', '.join(sorted(flags))})",
                         fix="put the flags into the BatchOptions")
    if isinstance(source, Deployment):
        source = deployment_source(source)
    prepared = prepare_prompts(prompts, out, options)
    try:
        return run(source, prepared, options, console)
    finally:
        prepared.close()


# ----------------------------------------------------------------------------------------------------------
# The submit workflow


def submit(model: str, prompts: Prompts, out: str | os.PathLike[str] | None = None, *, nodes: int | None = None,
           replicas: int = 1, ctx: int | None = None, time_limit: str | None = None, executor: str | None = None,
           keep: bool = False, ready_timeout: float | None = None, options: BatchOptions | None = None,
           settings: Settings | None = None, on_update: OnUpdate | None = None,
           on_message: OnMessage | None = None, console: Console | None = None,
           prepared: PreparedBatch | None = None, run: RunFn | None = None) -> Summary:
    """Start a deployment, run the prompts through it, stop it: what ``speedslurm submit`` does.

    The prompts and the results file are checked before anything is queued; with nothing left to do no
    deployment starts. The batch begins on the first ready replica and takes the others as they come up.
    The deployment is stopped at the end, also after a failure or Ctrl-C, unless ``keep``. A deployment that
    fails before the batch starts raises :class:`DeploymentFailed`; nothing was sent then, and the same call
    again starts afresh. Returns the batch's summary (failed requests are counted in it, see :func:`run_batch`).

    ``prepared`` is a batch already read (``prepare_prompts``; the caller closes it); ``run(source, prepared,
    options)`` runs it instead of :func:`speedslurm.batch.runner.run_batch` (the CLI prints from there).
    """
    from .batch.runner import run_batch
    from .batch.sources import StaticSource

    say = on_message or (lambda _text: None)
    options = options if options is not None else batch_options(quiet=True)
    batch = prepare_prompts(prompts, out, options) if prepared is None else prepared
    runner: RunFn = run or (lambda source, prep, opts: run_batch(source, prep, opts, console))
    try:
        if batch.remaining == 0:
            say(f"Nothing to do: every prompt in {batch.display} already has a successful line in {batch.out}.")
            return runner(StaticSource([]), batch, batch_options(quiet=True))
        dep, _ = up(model, nodes=nodes, replicas=replicas, ctx=ctx, time_limit=time_limit, executor=executor,
                    timeout=ready_timeout, until="first", settings=settings, on_update=on_update,
                    on_message=on_message, keep_on_interrupt=keep)
        try:
            return runner(deployment_source(dep), batch, options)
        finally:
            if keep:
                say(f"Deployment {dep.id} kept running. Send more with: speedslurm run --deployment {dep.id} "
                    f"--prompts P.jsonl; stop it with: speedslurm down {dep.id}")
            else:
                _cancel(dep)
                say(f"Deployment {dep.id} stopped (job(s) {', '.join(dep.job_ids)} cancelled).")
    finally:
        if prepared is None:
            batch.close()
