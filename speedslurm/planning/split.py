"""Where the layers go and how many slots fit: the devices' share of a replica.

llama.cpp gives each device (the ``--rpc`` servers in order, then a local GPU) a run of layers in proportion to
``--tensor-split``; the output layer is position ``n_layer`` and a tied embedding is copied to its device.
:func:`balance_split` cuts the layers into runs that read equal weight bytes per generated token (decode is
memory-bound), within each device's memory; :func:`slots_from_memory` sizes ``--parallel`` and the context per slot
from the KV-cache memory the weights leave. :mod:`speedslurm.planning.plan` calls both.
"""

from __future__ import annotations

import dataclasses
import math
import typing as tp

from ..errors import UsageError
from ..model.registry import ModelSpec
from ..settings.settings import Settings

GIB = 1024**3

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
