"""Warm-cache placement: put a deployment's followers on the nodes whose rpc-server tensor cache holds the model.

rpc-server's tensor cache (``llama.rpc_cache``, ``rpc-server -c``) lies on node-local disk, so a reload is a local
read only on the nodes that loaded the model before. The client records, per user, which nodes held the followers of
a deployment that became ready, for which model: ``$XDG_CACHE_HOME/speedslurm/warm-nodes.json``
(``~/.cache/speedslurm/warm-nodes.json``, mode 0600), keyed by the model's files (path, size, modification time) and
``llama.rpc_cache_dir`` as set (a ``{node}`` in it stays unexpanded: the job side makes it one folder per node).
A file replaced or touched is a new model: its old records are not used.

At ``up``, ``submit`` and ``plan`` (:func:`place`), when ``cluster.warm_placement`` is on, the replica is a
heterogeneous job (one replica of more than one node) and records exist for the model, Slurm is asked once for the
partition's nodes and their states. Warm nodes that are idle right now are asked for by name, for the followers'
component only (``--nodelist``; Slurm 22.05 has no ``--prefer``; the leader's component cannot exclude them, as
Slurm 22.05 carries component 0's ``--exclude`` into component 1 and then refuses its ``--nodelist``); this happens only when the partition has enough idle nodes for the whole replica.
Otherwise (no record, warm nodes busy, drained or down, too few idle nodes, sinfo failing) any nodes are taken, as
without placement. A stale record (a cache wiped) costs a full load, never a wait: only nodes idle at submission
are named. :func:`choose` is the pure decision; ``plan`` shows it and why.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
import typing as tp
from pathlib import Path

from ..errors import SpeedslurmError

if tp.TYPE_CHECKING:
    from ..planning.plan import Plan
    from ..settings.settings import Settings

_FORMAT = 1
KEEP_MODELS = 64           # models kept in the record (the ones recorded last)
MAX_AGE_S = 30 * 86400     # a node not seen warm for this long is forgotten


@dataclasses.dataclass(frozen=True)
class Placement:
    nodes: tuple[str, ...]   # asked for by name, for the followers (empty: any nodes)
    note: str                # the choice and why


def record_path(environ: tp.Mapping[str, str] | None = None) -> Path:
    environ = os.environ if environ is None else environ
    base = environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "speedslurm" / "warm-nodes.json"


def model_key(path: str | os.PathLike[str], cache_dir: str | None) -> str | None:
    """The model's identity: its (first) file's absolute path, size and modification time (ns), and the cache
    folder setting. None when the file cannot be read here (a model on another host's local disk)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return json.dumps([cache_dir or "", str(Path(path).absolute()), st.st_size, st.st_mtime_ns])


def _load(path: Path) -> dict[str, tp.Any]:
    try:
        data = json.loads(path.read_text())
        if isinstance(data, dict) and data.get("format") == _FORMAT and isinstance(data.get("models"), dict):
            return data
    except (OSError, ValueError):
        pass
    return {"format": _FORMAT, "models": {}}


def warm_nodes(key: str | None, *, now: float | None = None, path: Path | None = None) -> dict[str, float]:
    """Node -> when it was last seen holding the model's followers (seconds since the epoch), newest first."""
    if key is None:
        return {}
    now = time.time() if now is None else now
    entry = _load(path or record_path())["models"].get(key)
    nodes = entry.get("nodes") if isinstance(entry, dict) else None
    if not isinstance(nodes, dict):
        return {}
    fresh = {str(n): float(t) for n, t in nodes.items()
             if isinstance(t, (int, float)) and now - float(t) <= MAX_AGE_S}
    return dict(sorted(fresh.items(), key=lambda kv: -kv[1]))


def record(key: str | None, model: str, nodes: tp.Iterable[str], *, now: float | None = None,
           path: Path | None = None) -> None:
    """Remember that ``nodes`` now hold a warm cache of the model. Never raises: a record that cannot be written
    only loses the placement."""
    nodes = [n for n in nodes if n]
    if key is None or not nodes:
        return
    now = time.time() if now is None else now
    path = path or record_path()
    data = _load(path)
    models = data["models"]
    entry = models.get(key) if isinstance(models.get(key), dict) else None
    known = dict(entry.get("nodes") or {}) if entry else {}
    known.update({n: now for n in nodes})
    models[key] = {"model": model, "nodes": known, "updated": now}
    keep = sorted(models, key=lambda k: -float((models[k] or {}).get("updated") or 0))[:KEEP_MODELS]
    data["models"] = {k: models[k] for k in keep}
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh)
        os.replace(tmp, path)
    except (OSError, ValueError):
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def choose(warm: tp.Sequence[str], states: tp.Mapping[str, str], *, followers: int, nodes: int,
           exclude: tp.Collection[str] = ()) -> Placement:
    """Which warm nodes to ask for (pure).

    ``warm``: nodes holding the model's cache, preferred first; ``states``: every node of the partition and its
    Slurm state now (sinfo); ``followers``: follower nodes of the replica; ``nodes``: all its nodes; ``exclude``:
    nodes never to use. Only nodes whose state is exactly ``idle`` are named (not ``idle~`` powered down,
    ``idle*`` not responding, ``mix``, ``alloc``, ``drain``, ``down``), and only when the partition has at least
    ``nodes`` idle nodes, so that the leader finds one besides them.
    """
    if followers < 1:
        return Placement((), "any node: one node, no followers")
    warm = [n for n in warm if n not in exclude]
    if not warm:
        return Placement((), "any nodes: no node holds a warm rpc cache of this model yet")
    idle = [n for n, s in states.items() if s.strip().lower() == "idle" and n not in exclude]
    warm_idle = [n for n in warm if n in idle]
    busy = [f"{n} ({states.get(n, 'not in the partition')})" for n in warm if n not in idle]
    if not warm_idle:
        return Placement((), f"any nodes: the warm node(s) are not idle: {', '.join(busy)}")
    if len(idle) < nodes:
        return Placement((), f"any nodes: warm {', '.join(warm_idle)} idle, but only {len(idle)} idle node(s) of "
                             f"the {nodes} the replica needs")
    chosen = tuple(warm_idle[:followers])
    note = (f"followers on {', '.join(chosen)} (idle, warm rpc cache of this model; --nodelist of the followers' "
            "component), leader anywhere else")
    if busy:
        note += f"; not idle: {', '.join(busy)}"
    return Placement(chosen, note)


def partition_states(settings: Settings) -> tp.Callable[[], dict[str, str]]:
    """Ask Slurm once (sinfo, as for the partition's size) for each node of the partition and its state."""
    from . import slurm

    def ask() -> dict[str, str]:
        detail = slurm.partition_info(settings.cluster.partition)["detail"]
        return {node: d["state"] for node, d in detail.items()}

    return ask


def place(settings: Settings, plan: Plan,
          states: tp.Callable[[], tp.Mapping[str, str]] | None = None) -> Plan:
    """``plan`` with its followers' nodes chosen (``warm_nodes``) and why (``placement_note``)."""
    from ..planning.plan import with_placement

    def skip(why: str) -> Plan:
        return with_placement(plan, (), why)

    from .registry import get

    if not get(plan.executor).places_followers:
        return skip(f"not used: {plan.executor} executor")
    if not settings.cluster.warm_placement:
        return skip("off (cluster.warm_placement: false)")
    if not settings.llama.rpc_cache:
        return skip("off: no rpc cache (llama.rpc_cache: false)")
    if plan.nodes < 2:
        return skip("any node: one node, no followers")
    if not plan.heterogeneous:
        return skip(f"not used: {plan.layout} job (names nodes only for a single replica's hetjob)")
    warm = list(warm_nodes(model_key(plan.model.path, settings.llama.rpc_cache_dir)))
    if not warm:
        return skip("any nodes: no node holds a warm rpc cache of this model yet")
    try:
        now = (states or partition_states(settings))()
    except (SpeedslurmError, OSError, KeyError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return skip(f"any nodes: sinfo failed ({first})")
    exclude = {*plan.exclude, *([plan.leader_host] if plan.leader_host else [])}
    chosen = choose(warm, now, followers=plan.nodes - 1, nodes=plan.nodes, exclude=exclude)
    return with_placement(plan, chosen.nodes, chosen.note)


def record_ready(settings: Settings, model_path: str, model_name: str, follower_nodes: tp.Iterable[str]) -> None:
    """After a replica became ready: its follower nodes hold a warm cache of the model (when the cache is on)."""
    if settings.llama.rpc_cache and settings.cluster.warm_placement:
        record(model_key(model_path, settings.llama.rpc_cache_dir), model_name, follower_nodes)
