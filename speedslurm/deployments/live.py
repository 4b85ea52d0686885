"""What a deployment is doing now: each replica's llama-server ``/metrics`` and ``/slots``, and the progress of the
batches running against it (``top``, ``status --watch``, :meth:`speedslurm.api.Deployment.metrics`).

llama-server serves ``/metrics`` (Prometheus text; ``--metrics``, which the leader always passes) and ``/slots``
(JSON, one object per slot); both need the deployment's API key. Its throughput gauges
(``llamacpp:prompt_tokens_seconds``, ``llamacpp:predicted_tokens_seconds``) are tokens per second of one slot's
busy time (the time is summed over slots), over the time since the previous ``/metrics`` request (llama-server
resets them at each one); the server's rate is that times the busy slots (on the bed: 22.8 per slot x 15 slots,
while the batch counted 308 completion tok/s).
Builds that export ``llamacpp:kv_cache_usage_ratio`` give the KV cache use; for the others it is estimated from
``/slots``: the tokens the busy slots hold over the context.

The batches running against it publish their progress in the run directory (:mod:`speedslurm.rundir.batches`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import typing as tp

if tp.TYPE_CHECKING:
    from ..rundir.layout import Deployment as DeploymentRecord
    from ..rundir.records import Endpoint
    from .status import ReplicaStatus

__all__ = ["ReplicaMetrics", "metrics_from", "parse_metrics", "replica_metrics", "slots_from", "snapshot"]


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text exposition -> {metric name: value} (labels dropped; llama-server sets none)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, _, rest = line.partition(" ")
        name = name.split("{", 1)[0]
        try:
            value = float(rest.split()[0])
        except (IndexError, ValueError):
            continue
        if math.isfinite(value):
            out[name] = value
    return out


@dataclasses.dataclass(frozen=True)
class SlotsInfo:
    busy: int
    total: int
    tokens: int      # tokens the busy slots hold (prompt + generated so far)
    n_ctx: int       # the largest context of one slot (with --kv-unified every slot may use all of it)


def slots_from(data: tp.Any) -> SlotsInfo:
    """``/slots``' JSON -> busy and total slots, and the tokens the busy slots hold."""
    if not isinstance(data, list):
        raise ValueError("/slots did not answer a list of slots")
    busy = tokens = n_ctx = 0
    for slot in data:
        if not isinstance(slot, dict):
            continue
        n_ctx = max(n_ctx, int(slot.get("n_ctx") or 0))
        if slot.get("is_processing"):
            busy += 1
            decoded = 0
            nxt = slot.get("next_token")
            if isinstance(nxt, list) and nxt and isinstance(nxt[0], dict):
                decoded = int(nxt[0].get("n_decoded") or 0)
            tokens += int(slot.get("n_prompt_tokens") or 0) + decoded
    return SlotsInfo(busy, len(data), tokens, n_ctx)


@dataclasses.dataclass(frozen=True)
class ReplicaMetrics:
    """One replica's llama-server now (``error``: why it could not be read; the other fields are then None)."""

    replica: int
    url: str
    slots_busy: int | None = None
    slots_total: int | None = None
    requests_processing: int | None = None
    requests_waiting: int | None = None       # deferred: no free slot yet
    prompt_tok_s: float | None = None          # the whole server: per slot x busy slots
    generation_tok_s: float | None = None
    prompt_tok_s_per_slot: float | None = None  # llama-server's gauges (tokens per second of a slot's time)
    generation_tok_s_per_slot: float | None = None
    kv_cache_used: float | None = None         # 0..1
    kv_cache_source: str = ""                  # "metrics" or "slots (estimate)"
    prompt_tokens_total: int | None = None
    generated_tokens_total: int | None = None
    error: str = ""

    def to_json(self) -> dict[str, tp.Any]:
        return dataclasses.asdict(self)


def metrics_from(replica: int, url: str, metrics: dict[str, float], slots: SlotsInfo | None,
                 ctx: int | None = None) -> ReplicaMetrics:
    """Put together what ``/metrics`` and ``/slots`` said (``ctx``: the deployment's context, all slots)."""
    kv: float | None = None
    kv_source = ""
    if "llamacpp:kv_cache_usage_ratio" in metrics:
        kv, kv_source = metrics["llamacpp:kv_cache_usage_ratio"], "metrics"
    elif slots is not None:
        capacity = ctx or slots.n_ctx * max(slots.total, 1)
        if capacity:
            kv, kv_source = min(1.0, slots.tokens / capacity), "slots (estimate)"

    def num(name: str) -> float | None:
        return metrics.get(f"llamacpp:{name}")

    def count(name: str) -> int | None:
        v = num(name)
        return None if v is None else int(v)

    busy = slots.busy if slots else count("requests_processing")

    def total(per_slot: float | None) -> float | None:
        return None if per_slot is None or busy is None else per_slot * busy

    return ReplicaMetrics(
        replica=replica, url=url,
        slots_busy=busy,
        slots_total=slots.total if slots else None,
        requests_processing=count("requests_processing"), requests_waiting=count("requests_deferred"),
        prompt_tok_s=total(num("prompt_tokens_seconds")), generation_tok_s=total(num("predicted_tokens_seconds")),
        prompt_tok_s_per_slot=num("prompt_tokens_seconds"),
        generation_tok_s_per_slot=num("predicted_tokens_seconds"),
        kv_cache_used=kv, kv_cache_source=kv_source,
        prompt_tokens_total=count("prompt_tokens_total"), generated_tokens_total=count("tokens_predicted_total"))


def _get(url: str, key: str, timeout: float) -> bytes:
    import urllib.request

    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 (an http URL of our own endpoint)
        return tp.cast(bytes, resp.read())


def replica_metrics(endpoint: Endpoint, ctx: int | None = None, timeout: float = 3.0) -> ReplicaMetrics:
    """Ask one replica's llama-server (with the API key) for ``/metrics`` and ``/slots``."""
    import urllib.error

    base = endpoint.url.rstrip("/")
    try:
        metrics = parse_metrics(_get(f"{base}/metrics", endpoint.api_key, timeout).decode("utf-8", "replace"))
    except urllib.error.HTTPError as exc:
        why = "llama-server runs without --metrics" if exc.code == 501 else f"HTTP {exc.code}"
        return ReplicaMetrics(endpoint.replica, base, error=f"/metrics: {why}")
    except (OSError, ValueError) as exc:
        return ReplicaMetrics(endpoint.replica, base, error=f"/metrics: {exc}")
    slots: SlotsInfo | None
    try:
        slots = slots_from(json.loads(_get(f"{base}/slots", endpoint.api_key, timeout)))
    except (OSError, ValueError):
        slots = None  # --no-slots: the metrics alone
    return metrics_from(endpoint.replica, base, metrics, slots, ctx)


# ----------------------------------------------------------------------------------------------------------
# One look at a deployment


def snapshot(dep: DeploymentRecord, statuses: tp.Sequence[ReplicaStatus], timeout: float = 3.0) -> dict[str, tp.Any]:
    """The deployment now: its state, each replica's state and (READY ones) llama-server's numbers, the batches
    running against it. ``statuses`` from :func:`speedslurm.deployments.status.replica_statuses` or a
    :class:`~speedslurm.deployments.status.StatusProbe` (which asks Slurm politely); the servers are asked at every call."""
    from concurrent.futures import ThreadPoolExecutor

    from ..rundir.batches import read_progress
    from .nodehours import deployment_usage
    from .status import deployment_state, deployment_why

    ready = [s for s in statuses if s.state == "READY" and s.endpoint]
    ctx = int(dep.info.get("ctx") or 0) or None
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(ready)))) as pool:
        got = dict(zip([s.replica for s in ready],
                       pool.map(lambda s: replica_metrics(tp.cast("Endpoint", s.endpoint), ctx, timeout), ready),
                       strict=True))
    replicas = []
    for s in statuses:
        m = got.get(s.replica)
        replicas.append({"replica": s.replica, "state": s.state, "why": s.why, "job_id": s.job_id,
                         "nodes": s.nodes, "metrics": m.to_json() if m else None})
    return {"deployment": dep.id, "model": (dep.info.get("model") or {}).get("name"),
            "state": deployment_state(statuses), "why": deployment_why(statuses), "time": time.time(),
            "replicas": replicas, "batches": [b.to_json() for b in read_progress(dep.run_dir.root)],
            **deployment_usage(dep, statuses)}


class StatusesProbe:
    """:func:`speedslurm.deployments.status.statuses_of` for a refreshing view: the run directories at every call, one squeue
    for the live jobs of all the deployments when the backoff says so (soon after a change, then less and less
    often while nothing changes), never a question about a job already seen ended."""

    def __init__(self, clock: tp.Callable[[], float] = time.monotonic) -> None:
        from ..cluster.executor import SLURM_FIRST_S, SLURM_MOST_S
        from ..polling import Backoff

        self.backoff = Backoff(SLURM_FIRST_S, SLURM_MOST_S, clock)
        self._states: dict[str, tp.Any] | None = None
        self._live: dict[str, list[str]] = {}

    def __call__(self, deps: tp.Sequence[DeploymentRecord]) -> list[list[ReplicaStatus]]:
        from ..cluster.registry import job_states, live_jobs
        from .status import replica_statuses

        for dep in deps:
            dep.reload()
        live = live_jobs(deps)
        asked = False
        if not live:
            self._states = {}
        elif self._states is None or live != self._live or self.backoff.due():
            self._states = job_states(live)
            asked = True
        self._live = live
        out = [replica_statuses(dep, self._states or {}) for dep in deps]
        self.backoff.note([[(s.state, s.job_state, s.reason, s.why) for s in st] for st in out], asked)
        return out


LIVE_STATES = ("PENDING", "STARTING", "LOADING", "READY")


def pick_live(deps: tp.Sequence[DeploymentRecord], statuses: tp.Sequence[tp.Sequence[ReplicaStatus]]) -> DeploymentRecord:
    """The one deployment that is not over; a :class:`UsageError` naming them when there are several or none."""
    from ..errors import UsageError
    from .status import deployment_state

    live = [(d, deployment_state(st)) for d, st in zip(deps, statuses, strict=True)
            if deployment_state(st) in LIVE_STATES]
    if len(live) == 1:
        return live[0][0]
    if not live:
        raise UsageError("no deployment is running", fix="start one with `speedslurm up --model NAME`, or name an "
                         "ended one: `speedslurm top ID`")
    names = ", ".join(f"{d.id} ({state})" for d, state in live)
    raise UsageError(f"{len(live)} deployments are running: {names}", fix="name one: `speedslurm top ID`")
