"""The planner: how many nodes a model needs, and the shape of the job that serves it.

Memory formula (all in bytes, one llama.cpp device per node)::

    need(N)  = W + KV(ctx) + N x C          W: tensor bytes of the model
    have(N)  = N x U                        KV(ctx) = n_layer x ctx x n_head_kv x (d_k + d_v) x bytes/element
    N        = smallest N with need(N) <= have(N) = ceil((W + KV) / (U - C))

U is the usable GPU memory of one node (GiB, after the CUDA context: 22 GiB on the lab's 24 GiB cards)
and C the compute buffer each device keeps (1.1 GiB by default: the seed's 70B log shows 1104 MiB per
device). The seed's Q4_K_S (40.35 GB = 37.6 GiB, KV 2.5 GiB at ctx 8192) gives 2 nodes; Q6_K_L
(58.4 GB = 54.4 GiB) gives 3. llama.cpp spreads layers in proportion to each device's free memory, so
every device holds its share of W and KV plus one C.

Split (``--tensor-split``, see :func:`balance_split`): llama.cpp's devices are the ``--rpc`` servers in the
order given (follower ranks 1..N-1), then the leader's own GPU; a CPU-only leader (``cluster.gres_per_node``
null, or every ``cluster.nodes`` entry with ``gpu: cpu``) holds no device. With every layer offloaded, llama.cpp
gives layer i (0 <= i <= n_layer, where i = n_layer is the output layer) to the first device whose cumulative
split share exceeds i / (n_layer + 1); the input embedding stays on the leader's host, and a tied output
matrix (no ``output.weight``) is duplicated onto the output layer's device. Decode reads every weight once per
step, so the planner cuts the layers into contiguous runs of equal weight bytes (the work per token) within
each device's memory, and passes the run lengths as the split.

Slots (``llama.parallel: auto``, see :func:`slots_from_memory`): the memory left on the devices after weights
and compute buffers holds KV cache for T tokens; the server gets min(``llama.max_parallel``,
T // floor) slots of min(ctx, T // slots) tokens each, floor = min(``llama.min_ctx_per_slot``, ctx).
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing as tp

from ..errors import ConfigError, UsageError
from ..model.registry import ModelSpec
from ..settings.settings import Settings
from .sbatchopts import flag, refuse_control, sbatch_line, sbatch_options
from .split import (
    GIB,
    DeviceShare,
    _place,
    leader_has_device,
    nodes_needed,
    slots_from_memory,
)

_TIME_RE = re.compile(r"^(?:(?:(?P<d>\d+)-)?(?:(?P<h>\d+):)?(?P<m>\d+)(?::(?P<s>\d+))?)$")


def parse_time_minutes(value: str) -> int:
    """Slurm --time forms: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S -> minutes (rounded up)."""
    text = str(value).strip()
    if text.isdigit():
        return int(text)
    m = re.match(r"^(?P<d>\d+)-(?P<h>\d+)(?::(?P<m>\d+)(?::(?P<s>\d+))?)?$", text)
    if m:
        d, h, mi, s = (int(m[k] or 0) for k in "dhms")
        return d * 1440 + h * 60 + mi + math.ceil(s / 60)
    parts = text.split(":")
    if all(p.isdigit() for p in parts) and 2 <= len(parts) <= 3:
        nums = [int(p) for p in parts]
        if len(nums) == 2:  # M:S
            return nums[0] + math.ceil(nums[1] / 60)
        return nums[0] * 60 + nums[1] + math.ceil(nums[2] / 60)
    raise UsageError(f"--time {value!r} is not a Slurm time",
                     fix="use minutes (90), H:M:S (01:30:00) or D-H:M:S (1-00:00:00)")


@dataclasses.dataclass(frozen=True)
class Plan:
    model: ModelSpec
    ctx: int
    nodes: int                 # per replica
    min_nodes: int             # what the memory formula asks for
    replicas: int
    parallel: int              # llama-server slots
    usable_bytes: int          # per node
    compute_bytes: int         # per node
    kv_bytes: int              # whole KV cache
    partition: str | None
    time: str
    time_minutes: int
    gres: str | None
    leader_host: str | None    # leader pinned to this node (the model's host)
    exclude: tuple[str, ...]
    executor: str              # the name of the executor that runs it (cluster/registry.py)
    devices: tuple[DeviceShare, ...]
    account: str | None = None
    qos: str | None = None
    cpus_per_node: int | None = None
    mem_per_node: str | None = None
    hetjob: bool = True        # cluster.hetjob: a multi-node replica as a heterogeneous job
    # cluster.sbatch, checked: (option name with "_", value or True for a bare flag), sorted
    sbatch: tuple[tuple[str, str | bool], ...] = ()
    # llama-server --tensor-split, one value per device in llama.cpp's order (devices); None: not passed
    tensor_split: tuple[int, ...] | None = None
    split_note: str = ""       # how the split was chosen (or why none is passed)
    ctx_per_slot: int = 0
    slots_note: str = ""       # how --parallel and the context per slot were chosen
    host_bytes: int = 0        # weights kept on the leader's host (the input embedding)
    # warm-cache placement (speedslurm.cluster.warmcache): nodes the followers' component asks for by name, and why
    warm_nodes: tuple[str, ...] = ()
    placement_note: str = ""
    # where the values that reach the job script were set (settings key -> file, variable or flag), for errors
    origins: tp.Mapping[str, str] = dataclasses.field(default_factory=dict, compare=False, repr=False)

    @property
    def total_nodes(self) -> int:
        return self.nodes * self.replicas

    @property
    def heterogeneous(self) -> bool:
        """One replica of more than one node runs as a heterogeneous job (leader + followers).

        With ``cluster.hetjob: false`` it is a plain N-node job instead, unless the leader is pinned to a host.
        """
        return self.replicas == 1 and self.nodes > 1 and (self.hetjob or self.leader_host is not None)

    @property
    def layout(self) -> str:
        if self.replicas > 1:
            return "array"
        if self.heterogeneous:
            return "hetjob"
        return "single" if self.nodes == 1 else "plain"

    def to_json(self) -> dict[str, tp.Any]:
        data = dataclasses.asdict(self)
        data.pop("origins", None)
        data["model"] = self.model.to_json()
        data["sbatch"] = {flag(name): value for name, value in self.sbatch}
        data["total_nodes"] = self.total_nodes
        data["layout"] = self.layout
        data["need_gib"] = round((self.model.weights_bytes + self.kv_bytes + self.nodes * self.compute_bytes) / GIB, 2)
        data["have_gib"] = round(self.nodes * self.usable_bytes / GIB, 2)
        return data


def with_placement(plan: Plan, nodes: tp.Sequence[str], note: str) -> Plan:
    """``plan`` with the followers' nodes asked for by name (see :mod:`speedslurm.cluster.warmcache`)."""
    return dataclasses.replace(plan, warm_nodes=tuple(nodes), placement_note=note)


def script_values(plan: Plan, run_dir: str | None = None) -> list[tuple[str, str]]:
    """(setting, value) of every value of ``plan`` that the job script carries (``#SBATCH`` lines, setup)."""
    host_key = f"models.{plan.model.name}.host"
    values = [("cluster.partition", plan.partition), ("cluster.gres_per_node", plan.gres),
              ("cluster.account", plan.account), ("cluster.qos", plan.qos),
              ("cluster.mem_per_node", plan.mem_per_node), ("cluster.time", plan.time),
              *(("cluster.exclude", node) for node in plan.exclude), (host_key, plan.leader_host),
              *(("cluster.warm_placement", node) for node in plan.warm_nodes),
              ("run.dir", run_dir)]
    return [(setting, str(value)) for setting, value in values if value is not None]


def check_script_values(plan: Plan, run_dir: str | None = None) -> None:
    """Refuse (:class:`ConfigError`, exit 2) a line break or control character in any value the job script
    carries: the one check that ``plan``, ``up``, ``submit`` and ``render`` all pass through
    (:func:`speedslurm.cluster.script.slurm_parameters` calls it; :func:`make_plan` too, to stop before any work).
    ``cluster.sbatch`` values are checked by the same :func:`~speedslurm.planning.sbatchopts.refuse_control`."""
    for setting, value in script_values(plan, run_dir):
        refuse_control(setting, value, plan.origins.get(setting))


def check_node_addresses(settings: Settings) -> None:
    """Refuse a ``cluster.nodes.NAME.address`` that no other node could reach: loopback (127.x, ``::1``; the
    address a Debian host name maps to is 127.0.1.1) or unspecified (0.0.0.0, ``::``). Host names are
    resolved on the node, where the job side checks them again."""
    import ipaddress

    for node, entry in settings.cluster.nodes.items():
        if entry.address is None:
            continue
        setting = f"cluster.nodes.{node}.address"
        try:
            ip = ipaddress.ip_address(entry.address.strip())
        except ValueError:
            continue
        if ip.is_loopback or ip.is_unspecified:
            kind = "a loopback" if ip.is_loopback else "the unspecified"
            source = settings.origins.get(setting) or "settings"
            raise ConfigError(f"{source}: {setting} = {entry.address!r} is {kind} address: node {node}'s servers "
                              "would listen where no other node can reach them",
                              fix=f"set {setting} to node {node}'s address on the cluster network, or remove it "
                                  "(then Slurm's NodeAddr is used)")


def _check_partition(settings: Settings, model: ModelSpec, nodes: int, partition_size: int | None) -> None:
    if partition_size is not None and nodes > partition_size:
        raise UsageError(
            f"one replica of {model.name} needs {nodes} node(s); partition "
            f"{settings.cluster.partition or '(default)'} has {partition_size}",
            fix="use a smaller --ctx or quantisation, fewer --nodes, or a partition with more nodes")


class RunsOn(tp.Protocol):
    """What a plan asks of the executor that will run it (each one, in ``speedslurm.cluster``, says it of itself)."""

    @property
    def name(self) -> str:
        """Recorded in the plan: the executor that submits it."""

    @property
    def sizes_devices(self) -> bool:
        """Each node's device memory bounds the plan (False: one node, this machine's memory)."""

    @property
    def pins_model_host(self) -> bool:
        """A model on one node's local disk puts the leader on that node."""

    @property
    def writes_job_script(self) -> bool:
        """The jobs run from a job script, whose values are checked here."""


def make_plan(settings: Settings, model: ModelSpec, *, runs_on: RunsOn, ctx: int | None = None,
              nodes: int | None = None, replicas: int = 1, time: str | None = None,
              partition_size: int | None = None) -> Plan:
    """Size the deployment and validate it; raises :class:`UsageError` before anything is queued.

    ``runs_on`` is the executor that will run it: the plan depends on its capabilities (:class:`RunsOn`), never
    on its name.
    """
    extra_sbatch = sbatch_options(settings.cluster.sbatch, settings.origins)
    check_node_addresses(settings)
    ctx = ctx if ctx is not None else model.ctx
    if ctx <= 0:
        raise UsageError(f"--ctx {ctx} must be positive", fix="pass a context size such as --ctx 8192")
    if nodes is not None and nodes < 1:
        raise UsageError(f"--nodes {nodes} must be at least 1", fix="pass --nodes 1 or more, or leave it out to let the planner choose")
    if replicas < 1:
        raise UsageError(f"--replicas {replicas} must be at least 1", fix="pass --replicas 1 or more")
    llama = settings.llama
    auto_slots = isinstance(llama.parallel, str)
    if auto_slots and str(llama.parallel).strip().lower() != "auto":
        raise UsageError(f"llama.parallel {llama.parallel!r} must be a number of slots or 'auto'",
                         fix="set llama.parallel to 1 or more, or to auto (sized from the memory left)")
    if not auto_slots and int(llama.parallel) < 1:
        raise UsageError(f"llama.parallel {llama.parallel} must be at least 1", fix="set llama.parallel to 1 or more")
    for key in ("max_parallel", "min_ctx_per_slot"):
        if getattr(llama, key) < 1:
            raise UsageError(f"llama.{key} {getattr(llama, key)} must be at least 1",
                             fix=f"set llama.{key} to 1 or more")
    usable_gib = min((n.usable_gib for n in settings.cluster.nodes.values() if n.usable_gib),
                     default=settings.cluster.usable_gib)
    usable = int(usable_gib * GIB)
    compute = int(llama.compute_overhead_gib * GIB)
    kv = model.kv_bytes(ctx, llama.kv_bytes_per_element)
    need = nodes_needed(model.weights_bytes, kv, usable, compute)
    if not runs_on.sizes_devices:
        # The roles share this machine's memory; GPU sizing does not apply.
        need = 1
    chosen = nodes if nodes is not None else need
    if chosen < need:
        raise UsageError(
            f"model {model.name} needs {need} nodes at ctx {ctx} "
            f"({(model.weights_bytes + kv + need * compute) / GIB:.1f} GiB in all, {usable_gib:g} GiB usable per node); "
            f"--nodes {chosen} is too few",
            fix=f"pass --nodes {need} or more, or a smaller --ctx")
    _check_partition(settings, model, chosen, partition_size)
    capacity = usable - compute if runs_on.sizes_devices else math.inf
    placed = _place(settings, model, chosen, ctx, capacity, compute)
    if placed is None:
        more = next((n for n in range(chosen + 1, chosen + 9)
                     if _place(settings, model, n, ctx, capacity, compute) is not None), None)
        if nodes is not None or more is None:
            raise UsageError(
                f"model {model.name}'s layers do not fit on {chosen} node(s) at ctx {ctx} "
                f"({usable_gib:g} GiB usable per device, less {llama.compute_overhead_gib:g} GiB compute"
                + ("; the leader is CPU-only and holds no layers" if not leader_has_device(settings) else "") + ")",
                fix=(f"pass --nodes {more} or more, or a smaller --ctx" if more
                     else "use a smaller --ctx or quantisation"))
        chosen = need = more
        placed = _place(settings, model, chosen, ctx, capacity, compute)
        assert placed is not None
    devices, tensor_split, split_note, host_bytes = placed
    parallel = 0 if auto_slots else int(llama.parallel)
    if auto_slots:
        parallel, per_slot, slots_note = slots_from_memory(settings, model, devices, ctx, usable)
        ctx = parallel * per_slot
        kv = model.kv_bytes(ctx, llama.kv_bytes_per_element)
        kv_block = kv // max(model.n_layer, 1)
        devices = tuple(dataclasses.replace(d, kv_bytes=kv if len(devices) == 1 else d.layers * kv_block)
                        for d in devices)
    else:
        per_slot = ctx // parallel
        slots_note = f"llama.parallel {parallel}: the {ctx}-token context is shared by the slots (--kv-unified)"
    time_value = time or settings.cluster.time
    minutes = parse_time_minutes(time_value)
    _check_partition(settings, model, chosen, partition_size)
    if partition_size is not None and chosen * replicas > partition_size:
        raise UsageError(
            f"{replicas} replica(s) of {chosen} node(s) need {chosen * replicas} nodes; "
            f"partition {settings.cluster.partition or '(default)'} has {partition_size}",
            fix=f"pass --replicas {max(1, partition_size // chosen)} or fewer")
    leader_host = model.host if runs_on.pins_model_host else None
    if leader_host and replicas > 1:
        raise UsageError(
            f"model {model.name} lives on {leader_host}'s local disk, so only one replica can load it",
            fix="copy the model to the shared filesystem and remove its `host:` entry, or use --replicas 1")
    origins = {k: v for k, v in settings.origins.items() if k.startswith(("cluster.", "models.", "run."))}
    if time:
        origins["cluster.time"] = "--time"
    plan = Plan(
        model=model, ctx=ctx, nodes=chosen, min_nodes=need, replicas=replicas, parallel=parallel,
        usable_bytes=usable, compute_bytes=compute, kv_bytes=kv, partition=settings.cluster.partition,
        time=time_value, time_minutes=minutes, gres=settings.cluster.gres_per_node, leader_host=leader_host,
        exclude=tuple(settings.cluster.exclude), executor=runs_on.name, devices=devices,
        account=settings.cluster.account, qos=settings.cluster.qos,
        cpus_per_node=settings.cluster.cpus_per_node, mem_per_node=settings.cluster.mem_per_node,
        hetjob=settings.cluster.hetjob, sbatch=extra_sbatch, origins=origins,
        tensor_split=tensor_split, split_note=split_note, ctx_per_slot=per_slot, slots_note=slots_note,
        host_bytes=host_bytes,
    )
    if runs_on.writes_job_script:
        check_script_values(plan)
    return plan


def describe_plan(plan: Plan) -> list[str]:
    """Human-readable lines for ``speedslurm plan``."""
    m = plan.model
    lines = [
        f"model      {m.name}  ({m.path}{', on ' + m.host + ' local disk' if m.host else ''})",
        f"weights    {m.weights_bytes / GIB:.2f} GiB   KV cache {plan.kv_bytes / GIB:.2f} GiB at ctx {plan.ctx}"
        f"   compute {plan.compute_bytes / GIB:.2f} GiB per node",
        f"nodes      {plan.nodes} per replica (memory needs {plan.min_nodes}: "
        f"{(m.weights_bytes + plan.kv_bytes + plan.nodes * plan.compute_bytes) / GIB:.1f} GiB of "
        f"{plan.nodes * plan.usable_bytes / GIB:.1f} GiB usable)",
        f"replicas   {plan.replicas} ({plan.layout}; {plan.total_nodes} node(s) in all)",
        f"server     --parallel {plan.parallel} slots, ctx {plan.ctx} ({plan.ctx_per_slot} per slot)",
        f"slots      {plan.slots_note}",
        "split      " + (f"--tensor-split {','.join(map(str, plan.tensor_split))}: " if plan.tensor_split else "")
        + plan.split_note,
        f"slurm      partition={plan.partition or '(default)'} time={plan.time} gres={plan.gres or '-'}"
        + (f" leader on {plan.leader_host}" if plan.leader_host else ""),
    ]
    if plan.placement_note:
        lines.append(f"placement  {plan.placement_note}")
    if plan.sbatch:
        lines.append("sbatch     " + " ".join(sbatch_line(n, v).removeprefix("#SBATCH ") for n, v in plan.sbatch))
    total_weights = sum(d.weights_bytes for d in plan.devices) or 1
    total_work = sum(d.work_bytes for d in plan.devices) or 1
    for d in plan.devices:
        held = f"{d.layers} layer(s)" + (" + output" if d.output else "")
        lines.append(f"  {d.node:<11} {held:<20} weights {d.weights_bytes / GIB:6.2f} GiB "
                     f"({d.weights_bytes / total_weights:4.0%})  work {d.work_bytes / total_work:4.0%}"
                     f"  + KV {d.kv_bytes / GIB:5.2f} GiB + compute {d.compute_bytes / GIB:4.2f} GiB"
                     f" = {d.total_bytes / GIB:6.2f} GiB")
    if plan.host_bytes:
        lines.append(f"  {'leader host':<11} {'input embedding':<20} weights {plan.host_bytes / GIB:6.2f} GiB "
                     "(host memory, not a device)")
    return lines
