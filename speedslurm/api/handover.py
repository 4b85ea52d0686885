"""Time-limit handover: a batch that outlasts its deployment's time limit goes on on a successor deployment.

:class:`HandoverSource` is the endpoint source of such a batch. It offers the replicas of every deployment it
started (numbered on: the first deployment's r0..r(N-1), the next one's rN.., ...). When the newest deployment's
job is ``before_s`` seconds from its end (Slurm's TimeLeft, learnt from the status poll the source does anyway,
less ``margin_s``: Slurm's warning may stop the servers that long before the limit), it starts a successor through ``start_next`` (same model and settings). Once a replica of the successor is ready,
the older deployments' replicas drain: the runner sends them nothing new, their requests in flight finish and are
written, and the runner calls :meth:`HandoverSource.drained`; when every replica of a deployment is drained, its
job is cancelled, long before its limit. Each request is still sent and written once: a draining replica only
finishes what it has, and the runner owns the results file.
"""

from __future__ import annotations

import dataclasses
import threading
import time
import typing as tp

from ..batch.sources import SourceState

if tp.TYPE_CHECKING:
    from ..batch.sources import EndpointSource
    from .deployments import Deployment


@dataclasses.dataclass(eq=False)
class Generation:
    """One deployment of the batch, and what happened to it."""

    deployment: Deployment
    source: EndpointSource
    offset: int  # its replica r is the run's r + offset
    replicas: int
    submitted_at: float
    ready_at: float | None = None
    ends_at: float | None = None  # its job's end (the soonest of its replicas'), once Slurm said
    drained: set[int] = dataclasses.field(default_factory=set)  # the run's replica numbers
    failed: set[int] = dataclasses.field(default_factory=set)  # the run's replica numbers, as last polled
    drained_at: float | None = None
    cancelled_at: float | None = None
    finished: bool = False


class HandoverSource:
    """The replicas of a deployment and of the successors it hands over to before its time limit."""

    def __init__(self, first: Deployment, start_next: tp.Callable[[], Deployment], before_s: float,
                 say: tp.Callable[[str], None] | None = None, clock: tp.Callable[[], float] = time.time,
                 source_of: tp.Callable[[Deployment], EndpointSource] | None = None,
                 cancel: tp.Callable[[Deployment], object] | None = None, margin_s: float = 0.0) -> None:
        self.start_next = start_next
        self.margin_s = margin_s  # its servers may stop this long before the job's end (Slurm's warning)
        self.cancel = cancel or _cancel
        self.before_s = before_s
        self.say = say or (lambda _text: None)
        self.clock = clock
        self.source_of = source_of or _deployment_source
        self.generations: list[Generation] = []
        self._starting: _Call | None = None  # the successor being started
        self._gave_up = False
        self._add(first)

    def _add(self, dep: Deployment) -> Generation:
        last = self.generations[-1] if self.generations else None
        info = getattr(dep.record, "info", {}) or {}
        submitted = info.get("submitted_at")
        gen = Generation(dep, self.source_of(dep), last.offset + last.replicas if last else 0,
                         int(dep.record.replicas),
                         float(submitted) if isinstance(submitted, (int, float)) else self.clock())
        self.generations.append(gen)
        return gen

    @property
    def deployment(self) -> Deployment:
        """The newest deployment (the one serving, or about to)."""
        return self.generations[-1].deployment

    # -- the runner's side -----------------------------------------------------------------------
    def poll(self) -> SourceState:
        now = self.clock()
        ready, failed, ends_at = [], {}, {}
        crashed: set[int] = set()
        for gen in self.generations:
            if gen.cancelled_at is not None:
                continue  # handed over and ended: nothing of it is offered (nor reported failed)
            state = gen.source.poll()
            gen.finished = state.finished
            for ep in state.ready:
                ready.append(dataclasses.replace(ep, replica=ep.replica + gen.offset))
                if gen.ready_at is None:
                    gen.ready_at = ep.ready_at or now
                    if gen is not self.generations[0]:
                        self.say(f"Handover: deployment {gen.deployment.id} ready; its replicas take the batch over")
            failed.update({r + gen.offset: why for r, why in state.failed.items()})
            gen.failed = {r + gen.offset for r in state.failed}
            crashed.update(r + gen.offset for r in state.crashed)
            for r, end in state.ends_at.items():
                ends_at[r + gen.offset] = end - self.margin_s
            if state.ends_at:
                gen.ends_at = min(state.ends_at.values()) - self.margin_s
        newest = self.generations[-1]
        if newest.ends_at is not None and newest.ready_at is not None and now >= newest.ends_at - self.before_s:
            self._hand_over(newest, now)
            newest = self.generations[-1]
        draining: set[int] = set()
        if newest.ready_at is not None:
            for gen in self.generations[:-1]:
                if gen.cancelled_at is None and len(gen.drained | gen.failed) >= gen.replicas and gen.drained:
                    self._end(gen, drained=True)  # its last replica failed after the others drained
                elif gen.cancelled_at is None:
                    draining.update(range(gen.offset, gen.offset + gen.replicas))
        # A successor being submitted can still come: the batch waits for it rather than give up.
        return SourceState(ready, failed, newest.finished and self._starting is None, frozenset(draining), ends_at,
                           frozenset(crashed))

    def _hand_over(self, gen: Generation, now: float) -> None:
        """Start the successor in a thread (planning and sbatch take a moment: the batch goes on meanwhile); a
        later poll adds it. One that cannot start is said once; the batch goes on until the job's limit."""
        assert gen.ends_at is not None
        if self._starting is not None:
            if self._starting.is_alive():
                return
            thread, self._starting = self._starting, None
            if isinstance(thread.result, BaseException):
                self._gave_up = True
                self.say(f"Handover: could not start a successor of deployment {gen.deployment.id} "
                         f"({thread.result}); the batch goes on until its time limit")
                return
            dep = tp.cast("Deployment", thread.result)
            self._add(dep)
            self.say(f"Handover: deployment {gen.deployment.id} ends in {max(0.0, gen.ends_at - now):.0f} s "
                     f"(its time limit): started its successor {dep.id}, job(s) {', '.join(dep.job_ids)}")
            return
        if not self._gave_up:
            self._starting = _Call(self.start_next)
            self._starting.start()

    def drained(self, replica: int) -> None:
        """The runner has nothing in flight on ``replica`` and sends it nothing more: once every replica of its
        deployment is drained (or failed), the deployment is cancelled."""
        for gen in self.generations:
            if gen.offset <= replica < gen.offset + gen.replicas:
                gen.drained.add(replica)
                # The newest one drains only as its limit comes with no successor ready: it ends by itself.
                if gen is not self.generations[-1] and len(gen.drained | gen.failed) >= gen.replicas:
                    self._end(gen, drained=True)
                return

    def _end(self, gen: Generation, drained: bool) -> None:
        if gen.cancelled_at is not None:
            return
        if drained and gen.drained_at is None:
            gen.drained_at = self.clock()
        self.cancel(gen.deployment)
        gen.cancelled_at = self.clock()
        if drained:
            self.say(f"Handover: deployment {gen.deployment.id} drained and cancelled (job(s) "
                     f"{', '.join(gen.deployment.job_ids)})")

    def hurry(self) -> None:
        for gen in self.generations:
            hurry = getattr(gen.source, "hurry", None)
            if gen.cancelled_at is None and callable(hurry):
                hurry()

    # -- the end -----------------------------------------------------------------------------------
    def stop(self, keep: bool = False) -> list[Deployment]:
        """Cancel every deployment not cancelled yet (``keep``: all but the newest); returns those cancelled.

        Signals are held until every cancel is issued (:mod:`speedslurm.deployments.cleanup`): a Ctrl-C in the wait for a
        successor being submitted, or in a cancel, leaves no job behind. Without ``keep`` the deployments
        started already are cancelled before that wait."""
        from ..deployments.cleanup import held_signals

        out: list[Deployment] = []
        with held_signals():
            if not keep:
                out += self._end_all()
            if self._starting is not None:  # a successor being submitted: it must not be left running
                self._starting.join(120)
                started = self._starting.result
                self._starting = None
                if started is not None and not isinstance(started, BaseException):
                    self._add(tp.cast("Deployment", started))
            out += self._end_all(keep)
        return out

    def _end_all(self, keep: bool = False) -> list[Deployment]:
        out = []
        for gen in self.generations:
            if gen.cancelled_at is None and not (keep and gen is self.generations[-1]):
                self._end(gen, drained=False)
                out.append(gen.deployment)
        return out

    def deployments(self) -> list[dict[str, tp.Any]]:
        """Each deployment of the batch for its summary (the one that served, when none handed over)."""
        return [{"id": g.deployment.id, "job_ids": list(g.deployment.job_ids),
                 "replicas": list(range(g.offset, g.offset + g.replicas)),
                 "submitted_at": g.submitted_at, "ready_at": g.ready_at, "drained_at": g.drained_at,
                 "cancelled_at": g.cancelled_at} for g in self.generations]

    def usage(self, started: float, ended: float) -> dict[str, tp.Any] | None:
        """The node-hours every deployment held over the batch's span, added up."""
        parts = []
        for gen in self.generations:
            fn = getattr(gen.source, "usage", None)
            if callable(fn):
                parts.append(fn(started, ended))
        parts = [p for p in parts if p]
        if not parts:
            return None
        gpu = [p.get("gpu_hours") for p in parts]
        return {**parts[0], "node_hours": sum(float(p["node_hours"]) for p in parts),
                "gpu_hours": None if any(g is None for g in gpu) else sum(float(g) for g in gpu if g is not None),
                "node_hours_source": ", ".join(dict.fromkeys(str(p["node_hours_source"]) for p in parts))}


def handover_source(dep: Deployment, *, before_s: float | None = None, say: tp.Callable[[str], None] | None = None,
                    start_next: tp.Callable[[], Deployment] | None = None) -> HandoverSource | None:
    """The source that hands ``dep``'s batch over before its time limit (None: ``before_s``, default
    ``run.handover_before_s``, is 0). ``start_next`` starts the successor (default: the same model, nodes,
    replicas, context, time limit and executor as ``dep``'s record, with its settings).

    The handover begins ``before_s`` before Slurm's time-limit warning may come (which stops the servers: the
    ``--signal`` delay plus Slurm's 30 s check period before the limit), and at most half the time left before
    it, so that each deployment serves a while."""
    from ..deployments.lifecycle import handover_window

    s = dep.settings
    info = dep.record.info
    plan = info.get("plan") or {}
    before, margin = handover_window(s, info, before_s)
    if before <= 0:
        return None
    if start_next is None:
        from .deployments import start

        model = info.get("model") or {}

        limit = str(plan.get("time") or s.cluster.time)

        def start_next() -> Deployment:
            return start(str(model.get("path") or model.get("name")), nodes=int(info["nodes"]),
                         replicas=dep.record.replicas, ctx=int(info["ctx"]), time_limit=limit,
                         executor=dep.record.executor, settings=s)

    return HandoverSource(dep, start_next, before, say, margin_s=margin)


class _Call(threading.Thread):
    """``fn()`` in a daemon thread; ``result`` is what it returned or raised."""

    def __init__(self, fn: tp.Callable[[], object]) -> None:
        super().__init__(daemon=True, name="speedslurm-handover")
        self.fn = fn
        self.result: object = None

    def run(self) -> None:
        try:
            self.result = self.fn()
        except BaseException as exc:  # noqa: BLE001 - reported by the poll that collects it
            self.result = exc


def _cancel(dep: Deployment) -> None:
    from ..deployments import lifecycle as dp

    dp.down(dep.record)  # returns at once: Slurm ends the job


def _deployment_source(dep: Deployment) -> EndpointSource:
    from .deployments import deployment_source

    return deployment_source(dep)
