"""The split over the devices (balanced by the weight bytes each reads per token) and the slots sized from the
memory left, from real GGUF headers: a tiny random-weight llama, and headers shaped like Llama-3.1-70B's
(written without their tensor data: the planner reads only the header)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from speedslurm.cluster.registry import get as executor
from speedslurm.errors import ConfigError, UsageError
from speedslurm.model.gguf import read_gguf_info
from speedslurm.model.registry import resolve_model
from speedslurm.planning.plan import make_plan
from speedslurm.planning.split import GIB, balance_split, llama_placement
from speedslurm.settings.settings import load_settings


def write_header(path: Path, *, n_layer: int, n_embd: int, n_ff: int, n_head: int, n_head_kv: int,
                 n_vocab: int, layer_type: str = "Q4_K", output_type: str | None = "Q6_K",
                 embd_type: str = "Q4_K") -> Path:
    """A GGUF whose header describes a llama of this shape (``output_type`` None: output tied to the
    embedding, as gemma's). Tensor data is not written: the header is what the planner reads."""
    import gguf
    import numpy as np

    qt = gguf.GGMLQuantizationType
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(n_layer)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_context_length(131072)
    w.add_vocab_size(n_vocab)

    def tensor(name: str, rows: int, cols: int, kind: str) -> None:
        t = qt[kind]
        block, size = gguf.GGML_QUANT_SIZES[t]
        nbytes = rows * cols // block * size
        w.add_tensor_info(name, (rows, cols // block * size), np.dtype(np.uint8), nbytes, raw_dtype=t)

    head_dim = n_embd // n_head
    tensor("token_embd.weight", n_vocab, n_embd, embd_type)
    for i in range(n_layer):
        b = f"blk.{i}."
        tensor(b + "attn_norm.weight", 1, n_embd, "F32")
        tensor(b + "attn_q.weight", n_head * head_dim, n_embd, layer_type)
        tensor(b + "attn_k.weight", n_head_kv * head_dim, n_embd, layer_type)
        tensor(b + "attn_v.weight", n_head_kv * head_dim, n_embd, layer_type)
        tensor(b + "attn_output.weight", n_embd, n_head * head_dim, layer_type)
        tensor(b + "ffn_norm.weight", 1, n_embd, "F32")
        tensor(b + "ffn_gate.weight", n_ff, n_embd, layer_type)
        tensor(b + "ffn_up.weight", n_ff, n_embd, layer_type)
        tensor(b + "ffn_down.weight", n_embd, n_ff, layer_type)
    tensor("output_norm.weight", 1, n_embd, "F32")
    if output_type:
        tensor("output.weight", n_vocab, n_embd, output_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    return path


LLAMA70B = dict(n_layer=80, n_embd=8192, n_ff=28672, n_head=64, n_head_kv=8, n_vocab=128256)


@pytest.fixture
def gorgonas():
    return load_settings(profile="gorgonas", environ={})


@pytest.fixture
def q4(tmp_path: Path) -> Path:
    """Llama-3.1-70B's shape at Q4_K (about 37 GiB, like the registry's Q4_K_S)."""
    return write_header(tmp_path / "llama70b-q4.gguf", **LLAMA70B)


@pytest.fixture
def q6(tmp_path: Path) -> Path:
    """The same at Q6_K (about 54 GiB, like the registry's Q6_K_L)."""
    return write_header(tmp_path / "llama70b-q6.gguf", **LLAMA70B, layer_type="Q6_K", embd_type="Q6_K")


def test_header_gives_bytes_per_block_output_and_embedding(tiny_gguf: Path) -> None:
    info = read_gguf_info(tiny_gguf)
    assert len(info.layer_bytes) == info.n_layer and len(set(info.layer_bytes)) == 1
    # tiny llama: f16 matrices, f32 norms; output = output.weight + output_norm; embedding apart
    n_vocab, n_embd = info.n_vocab, info.n_embd
    assert info.embd_bytes == n_vocab * n_embd * 2
    assert info.output_bytes == n_vocab * n_embd * 2 + n_embd * 4
    assert not info.tied_output
    assert sum(info.layer_bytes) + info.output_bytes + info.embd_bytes == info.tensor_bytes


def test_70b_header_figures(q4: Path) -> None:
    info = read_gguf_info(q4)
    # Q6_K output matrix of 128256 x 8192: 210 bytes per 256 weights
    assert info.output_bytes == 128256 * 8192 // 256 * 210 + 8192 * 4
    assert 36 * GIB < info.tensor_bytes < 38 * GIB
    assert info.output_bytes / info.tensor_bytes < 0.025  # a small share of the weights, unlike gemma's


def test_tied_output_is_counted_on_the_output_device(tmp_path: Path) -> None:
    info = read_gguf_info(write_header(tmp_path / "tied.gguf", n_layer=4, n_embd=256, n_ff=512, n_head=4,
                                       n_head_kv=1, n_vocab=4096, output_type=None, layer_type="Q8_0",
                                       embd_type="Q8_0"))
    assert info.tied_output
    assert info.output_bytes == info.embd_bytes + 256 * 4  # the embedding's copy + output_norm


@pytest.mark.parametrize("work, devices, expected", [
    ([1] * 9 + [1], 2, [5, 5]),
    ([1] * 6, 3, [2, 2, 2]),
    ([2, 1, 1, 1, 1], 2, [2, 3]),
    ([1, 1, 1, 1, 10], 2, [4, 1]),          # gemma-like: the output layer alone on the last device
    ([1] * 5 + [5], 2, [5, 1]),
    ([1, 1], 3, [1, 1, 0]),                 # fewer positions than devices
])
def test_balance_split_minimises_the_largest_share(work: list[int], devices: int, expected: list[int]) -> None:
    assert balance_split(work, work, devices) == expected


def test_balance_split_respects_memory_and_says_when_nothing_fits() -> None:
    work = [1] * 10
    memory = [3] * 5 + [1] * 5   # the first half is heavy in memory (e.g. a longer KV cache)
    assert balance_split(work, memory, 2) == [5, 5]
    assert balance_split(work, memory, 2, capacity=11) == [3, 7]
    assert balance_split(work, memory, 2, capacity=10) is None


@pytest.mark.parametrize("split, positions, expected", [
    ([41, 40], 81, [41, 40]), ([1, 1], 81, [41, 40]), ([27, 27, 27], 81, [27, 27, 27]),
    ([3, 0, 2], 5, [3, 0, 2]), ([0.75, 0.25], 8, [6, 2]),
])
def test_placement_follows_llama_cpp(split: list[float], positions: int, expected: list[int]) -> None:
    assert llama_placement(split, positions) == expected


def _balanced(plan) -> None:
    works = [d.work_bytes for d in plan.devices]
    largest_item = max(max(plan.model.layer_bytes), plan.model.output_bytes)
    assert max(works) - min(works) <= largest_item
    assert sum(plan.tensor_split) == plan.model.n_layer + 1
    # llama.cpp, given the split, puts exactly the planned layers on each device, the output on the last
    counts = [d.layers + d.output for d in plan.devices]
    assert llama_placement(plan.tensor_split, plan.model.n_layer + 1) == counts
    assert plan.devices[-1].output and not any(d.output for d in plan.devices[:-1])
    assert all(d.total_bytes <= plan.usable_bytes for d in plan.devices)


def test_70b_q4_on_gorgonas_two_devices_balanced(gorgonas, q4: Path) -> None:
    plan = make_plan(gorgonas, resolve_model(gorgonas, str(q4)), ctx=8192, runs_on=executor("slurm"))
    assert plan.nodes == 2
    assert [d.node for d in plan.devices] == ["follower-1", "leader"]   # --rpc servers first, then the GPU
    _balanced(plan)
    assert plan.tensor_split == (41, 40)
    assert plan.host_bytes == read_gguf_info(q4).embd_bytes


def test_70b_q6_on_gorgonas_three_devices_balanced(gorgonas, q6: Path) -> None:
    plan = make_plan(gorgonas, resolve_model(gorgonas, str(q6)), ctx=8192, runs_on=executor("slurm"))
    assert plan.nodes == 3
    _balanced(plan)
    assert plan.tensor_split == (27, 27, 27)


def test_gemma_like_tied_output_gets_a_device_of_its_own(gorgonas, tmp_path: Path) -> None:
    # gemma-3-270m's proportions: 18 small blocks, a tied embedding larger than all of them together
    path = write_header(tmp_path / "g.gguf", n_layer=18, n_embd=640, n_ff=2048, n_head=4, n_head_kv=1,
                        n_vocab=262144, output_type=None, layer_type="Q8_0", embd_type="Q8_0")
    plan = make_plan(gorgonas, resolve_model(gorgonas, str(path)), nodes=3, runs_on=executor("slurm"))
    assert plan.tensor_split is not None and plan.tensor_split[-1] == 1
    assert plan.devices[-1].output and plan.devices[-1].layers == 0
    assert "reuses the embedding" in plan.split_note and "copied to leader" in plan.split_note


def test_cpu_only_leader_holds_no_layers(q4: Path, tmp_path: Path) -> None:
    # the test bed: every node says gpu: cpu, so only the rpc-servers are devices
    small = write_header(tmp_path / "s.gguf", n_layer=16, n_embd=512, n_ff=1536, n_head=8, n_head_kv=2,
                         n_vocab=8192, layer_type="Q8_0", embd_type="Q8_0", output_type="Q8_0")
    bed = load_settings(profile="testbed", environ={})
    plan = make_plan(bed, resolve_model(bed, str(small)), nodes=3, runs_on=executor("slurm"))
    assert [d.node for d in plan.devices] == ["follower-1", "follower-2"]
    assert plan.tensor_split is not None and len(plan.tensor_split) == 2
    _balanced(plan)
    one = make_plan(bed, resolve_model(bed, str(small)), nodes=1, runs_on=executor("slurm"))
    assert one.tensor_split is None and "CPU-only" in one.split_note


def test_a_cpu_only_leader_adds_a_node_when_the_devices_cannot_hold_the_layers(tmp_path: Path) -> None:
    # about 3.5 GiB of Q8_0 weights on the bed's 2 GiB nodes: the memory formula counts the leader's node,
    # but its CPU holds no layers, so the planner asks for one more node
    path = write_header(tmp_path / "m.gguf", n_layer=16, n_embd=4096, n_ff=14336, n_head=32, n_head_kv=8,
                        n_vocab=8192, layer_type="Q8_0", embd_type="Q8_0", output_type="Q8_0")
    bed = load_settings(profile="testbed", environ={})
    model = resolve_model(bed, str(path))
    plan = make_plan(bed, model, ctx=8192, runs_on=executor("slurm"))
    assert plan.min_nodes == plan.nodes and len(plan.devices) == plan.nodes - 1
    assert all(d.total_bytes <= plan.usable_bytes for d in plan.devices)
    with pytest.raises(UsageError) as err:
        make_plan(bed, model, ctx=8192, nodes=plan.nodes - 1, runs_on=executor("slurm"))
    assert "do not fit" in err.value.message and "CPU-only" in err.value.message
    assert f"--nodes {plan.nodes}" in (err.value.fix or "")


def test_local_roles_split_over_the_local_rpc_servers(tiny_gguf: Path) -> None:
    local = load_settings(profile="local", environ={})
    plan = make_plan(local, resolve_model(local, str(tiny_gguf)), nodes=3, runs_on=executor("local"))
    assert [d.node for d in plan.devices] == ["follower-1", "follower-2"]
    assert plan.tensor_split == (4, 5)   # 8 equal blocks, then the smaller output layer
    _balanced(plan)


def test_the_users_tensor_split_wins(q4: Path) -> None:
    s = load_settings(profile="gorgonas", environ={},
                      overrides=['llama.extra_server_args=["--tensor-split", "3,1"]'])
    plan = make_plan(s, resolve_model(s, str(q4)), runs_on=executor("slurm"))
    assert plan.tensor_split is None
    assert "--tensor-split 3,1" in plan.split_note and "yours wins" in plan.split_note
    assert [d.layers + d.output for d in plan.devices] == [61, 20]


def test_plan_json_and_text_show_shares(q4: Path, user_config: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    from speedslurm.cli import main
    from speedslurm.cluster import slurm

    user_config.write_text("")
    monkeypatch.setattr(slurm, "partition_info", lambda partition: {"name": "gorgonas", "nodes": ["g1", "g2"]})
    main(["--profile", "gorgonas", "plan", "--model", str(q4), "--executor", "slurm", "--json"])
    data = json.loads(capsys.readouterr().out)["plan"]
    assert data["tensor_split"] == [41, 40]
    assert [d["node"] for d in data["devices"]] == ["follower-1", "leader"]
    assert data["devices"][1]["output"] is True and data["devices"][1]["layers"] == 39
    assert "balanced by weight bytes" in data["split_note"] and data["slots_note"].startswith("auto:")
    main(["--profile", "gorgonas", "plan", "--model", str(q4), "--executor", "slurm"])
    text = capsys.readouterr().out
    assert "--tensor-split 41,40" in text and "slots      auto:" in text
    assert "41 layer(s)" in text and "39 layer(s) + output" in text and "work  50%" in text


# ---------------------------------------------------------------------------------------- slots from memory


def test_auto_slots_few_on_two_nodes_more_on_three(gorgonas, q4: Path) -> None:
    model = resolve_model(gorgonas, str(q4))
    two = make_plan(gorgonas, model, ctx=8192, runs_on=executor("slurm"))
    three = make_plan(gorgonas, model, ctx=8192, nodes=3, runs_on=executor("slurm"))
    assert gorgonas.llama.parallel == "auto"
    # 2 x 22 GiB less 37 GiB of weights and 2 compute buffers leave room for ~13k tokens (320 KiB each)
    assert 2 <= two.parallel <= 4 and two.ctx_per_slot >= 4096
    assert three.parallel == 16 and 4096 <= three.ctx_per_slot <= 8192
    for plan in (two, three):
        assert plan.ctx == plan.parallel * plan.ctx_per_slot
        assert all(d.total_bytes <= 22 * GIB for d in plan.devices)
        assert "auto:" in plan.slots_note and "tokens of KV cache" in plan.slots_note


def test_auto_slots_cap_and_floor(q4: Path) -> None:
    s = load_settings(profile="gorgonas", environ={}, overrides=["llama.max_parallel=5"])
    plan = make_plan(s, resolve_model(s, str(q4)), nodes=3, runs_on=executor("slurm"))
    assert plan.parallel == 5 and plan.ctx_per_slot == 8192   # capped: each slot gets the whole --ctx
    s = load_settings(profile="gorgonas", environ={}, overrides=["llama.min_ctx_per_slot=8192"])
    plan = make_plan(s, resolve_model(s, str(q4)), runs_on=executor("slurm"))
    assert plan.parallel == 1 and plan.ctx_per_slot == 8192


def test_explicit_parallel_is_kept(q4: Path) -> None:
    s = load_settings(profile="gorgonas", environ={}, overrides=["llama.parallel=4"])
    plan = make_plan(s, resolve_model(s, str(q4)), ctx=8192, runs_on=executor("slurm"))
    assert plan.parallel == 4 and plan.ctx == 8192
    assert "llama.parallel 4" in plan.slots_note


def test_bad_parallel_value_names_the_fix() -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(profile="gorgonas", environ={}, overrides=["llama.parallel=many"])
    assert "llama.parallel must be int | 'auto', not 'many'" in err.value.message
    with pytest.raises(ConfigError, match="llama.max_parallel"):
        load_settings(profile="gorgonas", environ={}, overrides=["llama.max_parallel=lots"])


def test_zero_slots_cap_is_refused() -> None:
    with pytest.raises(UsageError) as err:
        load_settings(profile="gorgonas", environ={}, overrides=["llama.max_parallel=0"])
    assert err.value.message == ("--set llama.max_parallel: llama.max_parallel must be an integer of at least 1, "
                                 "not 0")
