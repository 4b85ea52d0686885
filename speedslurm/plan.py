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

from .errors import ConfigError, UsageError
from .models import ModelSpec
from .sbatchopts import flag, refuse_control, sbatch_line, sbatch_options
from .settings import Settings

GIB = 1024**3
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
class DeviceShare:
    node: str                  # "leader" or "follower-K" until Slurm names the node
    weights_bytes: int
    kv_bytes: int
    compute_bytes: int
    layers: int = 0            # transformer blocks on this device
    output: bool = False       # holds the output layer (and a tied embedding's copy)
    work_bytes: int = 0        # weight bytes read per generated token (= weights on a device)

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_bytes + self.compute_bytes


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
    executor: str              # "slurm" or "local"
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
    # warm-cache placement (speedslurm.warmcache): nodes the followers' component asks for by name, and why
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
    """``plan`` with the followers' nodes asked for by name (see :mod:`speedslurm.warmcache`)."""
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
    (:func:`speedslurm.launch.slurm_parameters` calls it; :func:`make_plan` too, to stop before any work).
    ``cluster.sbatch`` values are checked by the same :func:`~speedslurm.sbatchopts.refuse_control`."""
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


def nodes_needed(weights_bytes: int, kv_bytes: int, usable_bytes: int, compute_bytes: int) -> int:
    """Smallest N with weights + KV + N x compute <= N x usable (see the module docstring)."""
    per_node = usable_bytes - compute_bytes
    if per_node <= 0:
        raise UsageError("a node's usable GPU memory is smaller than one compute buffer",
                         fix="raise cluster.usable_gib or lower llama.compute_overhead_gib")
    return max(1, math.ceil((weights_bytes + kv_bytes) / per_node))


def leader_has_device(settings: Settings) -> bool:
    """Whether llama-server on the leader has a device of its own (a GPU) besides the ``--rpc`` servers:
    not when no GPU is requested (``cluster.gres_per_node`` null) or every listed node says ``gpu: cpu``."""
    if settings.cluster.gres_per_node is None:
        return False
    gpus = [(n.gpu or "").strip().lower() for n in settings.cluster.nodes.values()]
    return not (gpus and all(g == "cpu" for g in gpus))


def device_names(nodes: int, leader_device: bool) -> list[str]:
    """llama.cpp's devices in its order: the ``--rpc`` servers (follower ranks 1..N-1), then the leader's GPU."""
    return [f"follower-{k}" for k in range(1, nodes)] + (["leader"] if leader_device else [])


def layer_weights(model: ModelSpec) -> tuple[list[int], int, int, bool]:
    """(bytes of each block, of the output layer, kept on the host; estimated?) for ``model``.

    From the GGUF header when it was read; otherwise (a registry entry whose file is on another host) the
    weights are spread evenly over the blocks, the output layer and the embedding."""
    if model.layer_bytes and len(model.layer_bytes) == model.n_layer:
        return list(model.layer_bytes), model.output_bytes, model.embd_bytes, False
    each = model.weights_bytes // (model.n_layer + 2)
    return [each] * model.n_layer, each, model.weights_bytes - each * (model.n_layer + 1), True


def balance_split(work: tp.Sequence[int], memory: tp.Sequence[int], devices: int,
                  capacity: float = math.inf) -> list[int] | None:
    """Cut ``work`` (per layer position: the blocks, then the output layer) into ``devices`` contiguous runs so
    that the largest run's work is as small as possible while no run's ``memory`` exceeds ``capacity``; among
    such cuts, the one whose runs are the most even (least sum of squares).

    Returns the run lengths (llama.cpp's ``--tensor-split`` values), or None when nothing fits. Every device
    gets at least one position when there are enough."""
    n = len(work)
    pw, pm = [0], [0]
    for w, m in zip(work, memory, strict=True):
        pw.append(pw[-1] + w)
        pm.append(pm[-1] + m)
    allow_empty = n < devices

    def solve(limit: float, combine: tp.Callable[[float, int], float]) -> tuple[float, list[int]] | None:
        inf = math.inf
        best = [[inf] * (n + 1) for _ in range(devices + 1)]
        cut = [[0] * (n + 1) for _ in range(devices + 1)]
        best[0][0] = 0
        for d in range(1, devices + 1):
            for j in range(n + 1):
                for k in range(j if allow_empty else j - 1, -1, -1):  # the last device: positions k..j-1
                    if pm[j] - pm[k] > capacity:
                        break
                    run = pw[j] - pw[k]
                    if run > limit or best[d - 1][k] == inf:
                        continue
                    value = combine(best[d - 1][k], run)
                    if value < best[d][j]:
                        best[d][j], cut[d][j] = value, k
        if best[devices][n] == inf:
            return None
        counts, j = [], n
        for d in range(devices, 0, -1):
            counts.append(j - cut[d][j])
            j = cut[d][j]
        return best[devices][n], counts[::-1]

    first = solve(math.inf, lambda acc, run: max(acc, run))
    if first is None:
        return None
    even = solve(first[0], lambda acc, run: acc + float(run) * run)
    return (even or first)[1]


def llama_placement(split: tp.Sequence[float], positions: int) -> list[int]:
    """How many layer positions llama.cpp gives each device for ``--tensor-split split`` (every layer
    offloaded): position i goes to the first device whose cumulative share exceeds i / positions."""
    import bisect

    total = float(sum(split))
    if total <= 0:
        raise ValueError("a tensor split needs a positive value")
    cum, acc = [], 0.0
    for v in split:
        acc += v
        cum.append(acc / total)
    counts = [0] * len(split)
    for i in range(positions):
        counts[min(bisect.bisect_right(cum, i / positions), len(split) - 1)] += 1
    return counts


def user_tensor_split(args: tp.Sequence[str]) -> tuple[str, list[float] | None] | None:
    """The ``--tensor-split``/``-ts`` value in ``llama.extra_server_args`` (text, parsed values or None)."""
    for i, arg in enumerate(args):
        value = None
        if arg in ("--tensor-split", "-ts") and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith("--tensor-split="):
            value = arg.split("=", 1)[1]
        if value is not None:
            try:
                parsed = [float(v) for v in value.replace("/", ",").split(",")]
            except ValueError:
                return value, None
            return value, parsed if sum(parsed) > 0 else None
    return None


def device_shares(names: tp.Sequence[str], counts: tp.Sequence[int], blocks: tp.Sequence[int],
                  output_bytes: int, kv_per_block: int, compute: int) -> tuple[DeviceShare, ...]:
    """Each device's weights, KV cache and work for ``counts`` layer positions per device, in order."""
    shares, start, n = [], 0, len(blocks)
    for name, count in zip(names, counts, strict=True):
        end = start + count
        held = range(start, min(end, n))
        output = start <= n < end
        weights = sum(blocks[i] for i in held) + (output_bytes if output else 0)
        shares.append(DeviceShare(name, weights, kv_per_block * len(held), compute, len(held), output, weights))
        start = end
    return tuple(shares)


def _gib(b: float) -> str:
    return f"{b / GIB:.2f} GiB"


def _place(settings: Settings, model: ModelSpec, nodes: int, ctx: int, capacity: float,
           compute: int) -> tuple[tuple[DeviceShare, ...], tuple[int, ...] | None, str, int] | None:
    """Devices, ``--tensor-split``, a note and the bytes kept on the leader's host (beside its devices) for
    ``nodes`` nodes; None when the layers fit no device split."""
    llama = settings.llama
    blocks, output_bytes, host_bytes, estimated = layer_weights(model)
    kv_block = model.kv_bytes(ctx, llama.kv_bytes_per_element) // max(model.n_layer, 1)
    positions = model.n_layer + 1
    source = "estimated: no header read, weights spread evenly" if estimated else "from the GGUF header"
    names = device_names(nodes, leader_has_device(settings))
    if not names:
        dev = DeviceShare("leader", model.weights_bytes, model.kv_bytes(ctx, llama.kv_bytes_per_element),
                          compute, model.n_layer, True, model.weights_bytes - host_bytes)
        return (dev,), None, "none passed: one node with a CPU-only leader holds every layer on its CPU", 0
    user = user_tensor_split(llama.extra_server_args)
    if user is not None:
        text, values = user
        note = f"--tensor-split {text} from llama.extra_server_args (yours wins over the planner's)"
        counts = llama_placement(values, positions) if values else None
        if counts is None or len(values or ()) > len(names):
            even = llama_placement([1.0] * len(names), positions)
            return (device_shares(names, even, blocks, output_bytes, kv_block, compute), None,
                    note + "; shares shown for an even split", host_bytes)
        counts += [0] * (len(names) - len(counts))
        return device_shares(names, counts, blocks, output_bytes, kv_block, compute), None, note, host_bytes
    if llama.ngl < positions:
        even = llama_placement([1.0] * len(names), positions)
        return (device_shares(names, even, blocks, output_bytes, kv_block, compute), None,
                f"none passed: llama.ngl {llama.ngl} keeps layers on the leader's CPU (all {positions} "
                "positions offloaded need llama.ngl >= n_layer + 1); shares shown for an even split", host_bytes)
    memory = [b + kv_block for b in blocks] + [output_bytes]
    counts = balance_split([*blocks, output_bytes], memory, len(names), capacity)
    if counts is None:
        return None
    shares = device_shares(names, counts, blocks, output_bytes, kv_block, compute)
    if len(names) == 1:
        return shares, None, f"none needed: one device ({names[0]}) holds every layer", host_bytes
    work = [d.work_bytes for d in shares]
    note = (f"balanced by weight bytes read per token ({source}): largest device share "
            f"{max(work) / max(sum(work), 1):.0%} of {_gib(sum(work))}")
    if model.tied_output:
        holder = next(d.node for d in shares if d.output)
        note += f"; the output layer reuses the embedding ({_gib(output_bytes)}), copied to {holder}"
    return shares, tuple(counts), note, host_bytes


def slots_from_memory(settings: Settings, model: ModelSpec, devices: tp.Sequence[DeviceShare], ctx: int,
                      usable: int) -> tuple[int, int, str]:
    """(slots, context per slot, why) for ``llama.parallel: auto``: KV tokens the devices' free memory holds,
    cut into at most ``llama.max_parallel`` slots of at least min(``llama.min_ctx_per_slot``, ctx) tokens."""
    llama = settings.llama
    per_token = model.kv_bytes(1, llama.kv_bytes_per_element)
    per_block = per_token / max(model.n_layer, 1)
    fits = []
    for d in devices:
        if d.layers:
            free = usable - d.compute_bytes - d.weights_bytes
            fits.append((max(free, 0) // (per_block * d.layers), d.node, free))
    tokens, tightest, free = min(fits) if fits else (ctx, "-", 0)
    tokens = int(tokens)
    floor = max(1, min(llama.min_ctx_per_slot, ctx))
    slots = max(1, min(llama.max_parallel, tokens // floor))
    per_slot = max(1, min(ctx, tokens // slots))
    if per_slot >= 256:
        per_slot -= per_slot % 256      # llama.cpp pads the context to 256
    why = (f"auto: {_gib(free)} free on {tightest} after weights and compute holds {tokens} tokens of KV cache "
           f"({per_token / 1024:.0f} KiB/token); {slots} slot(s) (llama.max_parallel {llama.max_parallel}) "
           f"of {per_slot} tokens (at least llama.min_ctx_per_slot {llama.min_ctx_per_slot}, at most ctx {ctx})")
    return slots, per_slot, why


def _check_partition(settings: Settings, model: ModelSpec, nodes: int, partition_size: int | None) -> None:
    if partition_size is not None and nodes > partition_size:
        raise UsageError(
            f"one replica of {model.name} needs {nodes} node(s); partition "
            f"{settings.cluster.partition or '(default)'} has {partition_size}",
            fix="use a smaller --ctx or quantisation, fewer --nodes, or a partition with more nodes")


def make_plan(settings: Settings, model: ModelSpec, *, ctx: int | None = None, nodes: int | None = None,
              replicas: int = 1, time: str | None = None, executor: str = "slurm",
              partition_size: int | None = None) -> Plan:
    """Size the deployment and validate it; raises :class:`UsageError` before anything is queued."""
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
    if executor == "local":
        # Local roles share this machine's memory; GPU sizing does not apply.
        need = 1
    chosen = nodes if nodes is not None else need
    if chosen < need:
        raise UsageError(
            f"model {model.name} needs {need} nodes at ctx {ctx} "
            f"({(model.weights_bytes + kv + need * compute) / GIB:.1f} GiB in all, {usable_gib:g} GiB usable per node); "
            f"--nodes {chosen} is too few",
            fix=f"pass --nodes {need} or more, or a smaller --ctx")
    _check_partition(settings, model, chosen, partition_size)
    capacity = usable - compute if executor == "slurm" else math.inf
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
    leader_host = model.host if executor == "slurm" else None
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
        exclude=tuple(settings.cluster.exclude), executor=executor, devices=devices,
        account=settings.cluster.account, qos=settings.cluster.qos,
        cpus_per_node=settings.cluster.cpus_per_node, mem_per_node=settings.cluster.mem_per_node,
        hetjob=settings.cluster.hetjob, sbatch=extra_sbatch, origins=origins,
        tensor_split=tensor_split, split_note=split_note, ctx_per_slot=per_slot, slots_note=slots_note,
        host_bytes=host_bytes,
    )
    if executor == "slurm":
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
