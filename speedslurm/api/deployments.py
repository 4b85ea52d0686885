"""Deployments from Python: start (a context manager that stops it), connect, wait, endpoint, client, status,
stop; ``up`` and ``submit``, the workflows of ``speedslurm up`` and ``speedslurm submit``."""

from __future__ import annotations

import dataclasses
import os
import typing as tp
from pathlib import Path

from ..errors import UsageError
from .batches import Prompts, RunFn, batch_options, prepare_prompts, run_batch

if tp.TYPE_CHECKING:
    import openai
    from rich.console import Console

    from ..batch.runner import BatchOptions, PreparedBatch
    from ..batch.sources import EndpointSource
    from ..batch.summary import Summary
    from ..deployments.status import ReplicaStatus
    from ..planning.plan import Plan
    from ..rundir.layout import Deployment as DeploymentRecord
    from ..rundir.records import Endpoint
    from ..settings.settings import Settings

OnUpdate = tp.Callable[["list[ReplicaStatus]", float], None]
OnMessage = tp.Callable[[str], None]


def load_settings(profile: str | None = None, config: str | os.PathLike[str] | None = None,
                  overrides: tp.Iterable[str] = (), *, flags: tp.Mapping[str, tp.Any] | None = None) -> Settings:
    """The merged settings, as the CLI's ``--profile``, ``--config`` and ``--set KEY=VALUE`` give them;
    ``flags``: dotted keys a command's own options set (``{"llama.idle_timeout": "30m"}``; None values are unset)."""
    from ..settings.settings import load_settings as load

    return load(profile=profile, config_path=config, overrides=tuple(overrides),
                cli=dict(flags) if flags is not None else None)


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
        from ..deployments.status import replica_statuses

        return replica_statuses(self.record)

    @property
    def state(self) -> str:
        """The deployment's state: the best any replica reached (FAILED only when every replica failed)."""
        from ..deployments.status import deployment_state

        return deployment_state(self.status())

    def wait_ready(self, timeout: float | None = None, *, until: str = "all",
                   on_update: OnUpdate | None = None) -> list[ReplicaStatus]:
        """Wait until every replica (``until="all"``) or one (``"first"``) is READY; returns the statuses.

        :class:`DeploymentFailed` (with the last log lines) when a replica fails, or after ``timeout`` seconds
        (None: as long as the job waits in the queue). ``on_update(statuses, elapsed_s)`` is called at each look.
        The deployment keeps running either way: stop it, or leave the ``with`` block.
        """
        from ..deployments.lifecycle import record_warm
        from ..deployments.status import StatusProbe, failure_text
        from ..deployments.waiting import wait_ready

        if until not in ("all", "first"):
            raise UsageError(f"until must be 'all' or 'first', got {until!r}", fix='use until="all" or until="first"')
        statuses = wait_ready(StatusProbe(self.record), until=until, timeout=timeout,
                              interval=min(self.settings.run.poll_interval_s, 0.05),  # a look costs ~1 ms
                              on_update=on_update,
                              describe_failure=lambda s: failure_text(self.record, s))
        record_warm(self.settings, self.record, statuses)
        return statuses

    def metrics(self, statuses: list[ReplicaStatus] | None = None) -> dict[str, tp.Any]:
        """What the deployment is doing now (``speedslurm top --json``): per replica the slots busy/total, requests
        waiting, prompt and generation tok/s and KV cache use from llama-server's ``/metrics`` and ``/slots``,
        and the progress of the batches running against it. ``statuses``: from a polling loop's
        :class:`~speedslurm.deployments.status.StatusProbe` (None: ask now)."""
        from ..deployments.live import snapshot

        return snapshot(self.record, self.status() if statuses is None else statuses)

    def endpoints(self) -> list[Endpoint]:
        """The endpoints of the replicas that are READY now (URL, key, model name, nodes)."""
        return [s.endpoint for s in self.status() if s.state == "READY" and s.endpoint]

    def endpoint(self, replica: int | None = None) -> Endpoint:
        """A ready replica's endpoint (``replica``, else the first ready one); :class:`UsageError` if none is."""
        from ..deployments.status import deployment_state, deployment_why

        statuses = self.status()
        ready = [s for s in statuses if s.state == "READY" and s.endpoint
                 and (replica is None or s.replica == replica)]
        if not ready:
            state, why = deployment_state(statuses), deployment_why(statuses)
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
        from ..cluster.slurm_executor import find_submitted_job, needs_job_ids
        from ..deployments import lifecycle as dp
        from ..deployments.cleanup import held_signals, look
        from ..deployments.status import deployment_state, deployment_why, replica_statuses
        from ..deployments.waiting import wait_ended

        # From here on the cancel happens whatever arrives (Ctrl-C, SIGTERM, SIGHUP): a signal ends the look
        # before it (what the report says had ended already), and once the cancel is issued it skips the wait.
        with held_signals():
            if needs_job_ids(self.record) and not self.record.info.get("cancelled_at"):
                find_submitted_job(self.record)  # a rendered script's job: its id is what to cancel
            before = look(lambda: replica_statuses(self.record))
            if before is not None and all(s.state == "UNSUBMITTED" for s in before):
                return Stopped(self.id, [], "UNSUBMITTED", deployment_why(before))
            over = sorted({s.job_id for s in before or [] if s.state in ("ENDED", "FAILED")})
            ids = [j for j in dp.down(self.record, before) if j not in over]
        statuses = wait_ended(self.record, timeout=wait)
        return Stopped(self.id, ids, deployment_state(statuses), deployment_why(statuses), over)


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
    from ..deployments import lifecycle as dp

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
    from ..deployments.cleanup import held_signals

    say = on_message or (lambda _text: None)
    plan, dep = _start(model, nodes=nodes, replicas=replicas, ctx=ctx, time_limit=time_limit, executor=executor,
                       settings=settings)
    try:
        say(f"deployment {dep.id}: {plan.model.name} on {plan.nodes} node(s) x {plan.replicas} replica(s), "
            f"job(s) {', '.join(dep.job_ids)}")
        if plan.warm_nodes:
            say(f"placement: {plan.placement_note}")
        statuses = dep.wait_ready(timeout, until=until, on_update=on_update)
    except KeyboardInterrupt:
        if keep_on_interrupt:
            say(f"Interrupted: deployment {dep.id} keeps starting (`speedslurm down {dep.id}` stops it).")
        else:
            with held_signals():  # a further Ctrl-C must not stop the cancel
                _cancel(dep)
            say(f"Interrupted: cancelled deployment {dep.id}.")
        raise
    except BaseException:
        _cancel(dep)
        raise
    return dep, statuses


def _cancel(dep: Deployment) -> None:
    from ..deployments import lifecycle as dp

    dp.down(dep.record)


def connect(ident: str, settings: Settings | None = None) -> Deployment:
    """A deployment by its id, a unique prefix of it, or a Slurm job id (123, 123_4); :class:`UsageError`
    naming recent ones when none matches."""
    from ..deployments.record import find_deployment

    s = _settings(settings)
    return Deployment(find_deployment(s, ident), s)


def connect_running(settings: Settings | None = None) -> Deployment:
    """The one deployment that is not over (pending, starting, loading or ready); :class:`UsageError` naming
    them when there are several, or saying so when there is none."""
    from ..deployments.live import pick_live
    from ..deployments.record import list_deployments
    from ..deployments.status import statuses_of

    s = _settings(settings)
    deps = list_deployments(s)
    return Deployment(pick_live(deps, statuses_of(deps)), s)


def list_deployments(settings: Settings | None = None) -> list[Deployment]:
    """Every deployment in the run directory, oldest first."""
    from ..deployments.record import list_deployments

    s = _settings(settings)
    return [Deployment(d, s) for d in list_deployments(s)]


def deployment_source(dep: Deployment | DeploymentRecord) -> EndpointSource:
    """The replicas of a deployment as a batch's endpoint source (:func:`speedslurm.deployments.source.deployment_source`)."""
    from ..deployments.source import deployment_source as source

    return source(dep.record if isinstance(dep, Deployment) else dep)


# ----------------------------------------------------------------------------------------------------------
# The submit workflow


def submit(model: str, prompts: Prompts, out: str | os.PathLike[str] | None = None, *, nodes: int | None = None,
           replicas: int = 1, ctx: int | None = None, time_limit: str | None = None, executor: str | None = None,
           keep: bool = False, ready_timeout: float | None = None, options: BatchOptions | None = None,
           settings: Settings | None = None, on_update: OnUpdate | None = None,
           on_message: OnMessage | None = None, console: Console | None = None,
           prepared: PreparedBatch | None = None, run: RunFn | None = None, handover: bool = True) -> Summary:
    """Start a deployment, run the prompts through it, stop it: what ``speedslurm submit`` does.

    The prompts and the results file are checked before anything is queued; with nothing left to do no
    deployment starts. The batch begins on the first ready replica and takes the others as they come up.
    The deployment is stopped at the end, also after a failure or Ctrl-C, unless ``keep``. A deployment that
    fails before the batch starts raises :class:`DeploymentFailed`; nothing was sent then, and the same call
    again starts afresh. Returns the batch's summary (failed requests are counted in it, see :func:`run_batch`).

    ``handover``: ``run.handover_before_s`` before the job's time limit (Slurm's TimeLeft), start a successor
    deployment of the same model and settings, move the batch onto it once it is ready, and cancel the old one
    once its requests in flight are written (:mod:`speedslurm.api.handover`); the summary's ``deployments``
    names each. ``prepared`` is a batch already read (``prepare_prompts``; the caller closes it); ``run(source,
    prepared, options)`` runs it instead of :func:`speedslurm.batch.runner.run_batch` (the CLI prints from there).
    """
    from ..batch.runner import run_batch
    from ..batch.sources import StaticSource
    from ..deployments.cleanup import held_signals

    say = on_message or (lambda _text: None)
    options = options if options is not None else batch_options(quiet=True)
    batch = prepare_prompts(prompts, out, options) if prepared is None else prepared
    runner: RunFn = run or (lambda source, prep, opts: run_batch(source, prep, opts, console))
    try:
        if batch.remaining == 0:
            suspects = batch.suspected
            if suspects:
                say(f"Nothing to send: every prompt in {batch.display} has a successful line in {batch.out}, but for "
                    f"{len(suspects)} suspected of crashing their server in an earlier run ({', '.join(suspects[:10])}"
                    f"{', ...' if len(suspects) > 10 else ''}); --retry-suspected sends them.")
            else:
                say(f"Nothing to do: every prompt in {batch.display} already has a successful line in {batch.out}.")
            return runner(StaticSource([]), batch, batch_options(quiet=True))
        dep, _ = up(model, nodes=nodes, replicas=replicas, ctx=ctx, time_limit=time_limit, executor=executor,
                    timeout=ready_timeout, until="first", settings=settings, on_update=on_update,
                    on_message=on_message, keep_on_interrupt=keep)
        from .handover import handover_source

        s = dep.settings
        chain = handover_source(dep, say=say, start_next=lambda: start(
            model, nodes=nodes, replicas=replicas, ctx=ctx, time_limit=time_limit, executor=executor,
            settings=s)) if handover else None
        source: EndpointSource = chain if chain is not None else deployment_source(dep)
        try:
            return runner(source, batch, options)
        finally:
            with held_signals():  # once the clean-up starts, the cancel happens whatever arrives
                ended = chain.stop(keep) if chain is not None else [] if keep else [dep]
                if chain is None and not keep:
                    _cancel(dep)
            last = chain.deployment if chain is not None else dep
            if keep:
                say(f"Deployment {last.id} kept running. Send more with: speedslurm run --deployment {last.id} "
                    f"--prompts P.jsonl; stop it with: speedslurm down {last.id}")
            for d in ended:
                say(f"Deployment {d.id} stopped (job(s) {', '.join(d.job_ids)} cancelled).")
    finally:
        if prepared is None:
            batch.close()
