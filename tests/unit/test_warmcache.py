"""Warm-cache placement: the record of warm nodes, the choice (records x Slurm node states), and the job it gives."""

from __future__ import annotations

import dataclasses
import json
import os
import stat
from pathlib import Path

import pytest

from speedslurm.cluster import warmcache
from speedslurm.cluster.registry import get as executor
from speedslurm.cluster.script import render_job_script
from speedslurm.model.registry import ModelSpec
from speedslurm.planning.plan import describe_plan, make_plan
from speedslurm.rundir.layout import RunDir
from speedslurm.settings.settings import load_settings

IDLE4 = {"n1": "idle", "n2": "idle", "n3": "idle", "n4": "idle"}


# ----------------------------------------------------------------------------------------------------------
# The choice


def test_no_record_takes_any_nodes() -> None:
    got = warmcache.choose([], IDLE4, followers=1, nodes=2)
    assert got.nodes == () and "no node holds a warm rpc cache" in got.note


def test_an_idle_warm_node_is_asked_for_the_followers() -> None:
    got = warmcache.choose(["n3"], IDLE4, followers=1, nodes=2)
    assert got.nodes == ("n3",)
    assert "followers on n3" in got.note and "leader anywhere else" in got.note


@pytest.mark.parametrize("state", ["alloc", "mix", "drain", "drng", "down", "down*", "idle~", "idle*", "idle#",
                                   "comp", "resv", "maint"])
def test_a_warm_node_that_is_not_idle_now_is_never_asked_for(state: str) -> None:
    got = warmcache.choose(["n3"], {**IDLE4, "n3": state}, followers=1, nodes=2)
    assert got.nodes == ()
    assert got.note == f"any nodes: the warm node(s) are not idle: n3 ({state})"


def test_a_warm_node_gone_from_the_partition_is_not_asked_for() -> None:
    got = warmcache.choose(["gone"], IDLE4, followers=1, nodes=2)
    assert got.nodes == () and "gone (not in the partition)" in got.note


def test_too_few_idle_nodes_for_the_whole_replica_takes_any() -> None:
    # n1 is warm and idle, but the leader would need a second idle node: naming n1 could make the job wait.
    states = {"n1": "idle", "n2": "alloc", "n3": "alloc", "n4": "mix"}
    got = warmcache.choose(["n1"], states, followers=1, nodes=2)
    assert got.nodes == () and "only 1 idle node(s) of the 2 the replica needs" in got.note


def test_only_idle_warm_nodes_are_named_and_the_rest_said() -> None:
    states = {**IDLE4, "n2": "alloc"}
    # 3 idle nodes of the 4 needed: any nodes.
    got = warmcache.choose(["n2", "n3", "n4"], states, followers=3, nodes=4)
    assert got.nodes == () and "only 3 idle node(s) of the 4" in got.note
    # n2 busy: the two idle warm nodes are named; Slurm picks the third follower anywhere.
    got = warmcache.choose(["n2", "n3", "n4"], {**states, "n5": "idle"}, followers=3, nodes=4)
    assert got.nodes == ("n3", "n4") and "not idle: n2 (alloc)" in got.note


def test_no_more_nodes_than_followers_newest_first() -> None:
    got = warmcache.choose(["n4", "n2", "n3"], IDLE4, followers=2, nodes=3)
    assert got.nodes == ("n4", "n2")


def test_excluded_nodes_are_never_asked_for() -> None:
    got = warmcache.choose(["n3"], IDLE4, followers=1, nodes=2, exclude={"n3"})
    assert got.nodes == ()


# ----------------------------------------------------------------------------------------------------------
# The record


def test_record_is_private_and_keyed_by_the_model_file(tmp_path: Path) -> None:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"x" * 10)
    record = tmp_path / "cache" / "warm-nodes.json"
    key = warmcache.model_key(model, None)
    warmcache.record(key, "m", ["n2", "n3"], now=100.0, path=record)
    warmcache.record(key, "m", ["n3"], now=200.0, path=record)
    assert stat.S_IMODE(record.stat().st_mode) == 0o600
    assert warmcache.warm_nodes(key, now=300.0, path=record) == {"n3": 200.0, "n2": 100.0}
    # Another cache folder: other caches.
    assert warmcache.warm_nodes(warmcache.model_key(model, "/scratch/c"), now=300.0, path=record) == {}
    # The file rewritten (another size, another time): a new model, no warm node.
    model.write_bytes(b"y" * 11)
    os.utime(model, ns=(1, 1))
    assert warmcache.warm_nodes(warmcache.model_key(model, None), now=300.0, path=record) == {}
    # Too old: forgotten.
    assert warmcache.warm_nodes(key, now=200.0 + warmcache.MAX_AGE_S + 1, path=record) == {}


def test_an_unreadable_record_or_model_gives_no_warm_node_and_never_fails(tmp_path: Path) -> None:
    record = tmp_path / "warm-nodes.json"
    record.write_text("{not json")
    model = tmp_path / "m.gguf"
    model.write_bytes(b"x")
    key = warmcache.model_key(model, None)
    assert warmcache.warm_nodes(key, path=record) == {}
    warmcache.record(key, "m", ["n1"], now=1.0, path=record)     # rewritten whole
    assert json.loads(record.read_text())["models"][key]["nodes"] == {"n1": 1.0}
    assert warmcache.model_key(tmp_path / "elsewhere.gguf", None) is None   # on another host's disk
    warmcache.record(None, "m", ["n1"], path=record)             # nothing recorded, nothing raised
    warmcache.record(key, "m", ["n1"], path=tmp_path / "m.gguf" / "not-a-dir" / "x.json")


# ----------------------------------------------------------------------------------------------------------
# The plan and its job


@pytest.fixture
def warm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[ModelSpec, Path]:
    """A 2-node model whose follower node n3 was warm, with the record in this test's cache folder."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    path = tmp_path / "big.gguf"
    path.write_bytes(b"GGUF")
    spec = ModelSpec(name="big", path=path, files=(path,), weights_bytes=30 * 1024**3, n_layer=80, n_head_kv=8,
                     head_dim=128, head_dim_v=128, ctx=8192)
    warmcache.record(warmcache.model_key(path, None), "big", ["n3"])
    return spec, tmp_path


def settings(**env: str):
    return load_settings(profile="gorgonas", environ=env)


def test_plan_names_the_warm_follower_node_and_keeps_the_leader_off_it(warm) -> None:
    spec, tmp_path = warm
    asked = []
    plan = warmcache.place(settings(), make_plan(settings(), spec, runs_on=executor("slurm")),
                           states=lambda: asked.append(1) or IDLE4)
    assert asked == [1]          # Slurm asked once
    assert plan.nodes == 2 and plan.warm_nodes == ("n3",)
    assert any(line.startswith("placement  followers on n3") for line in describe_plan(plan))
    assert list(plan.to_json()["warm_nodes"]) == ["n3"] and "followers on n3" in plan.to_json()["placement_note"]
    rd = RunDir(tmp_path / "run")
    text = render_job_script(plan, rd, "ENTRY")
    leader, followers = text.split("#SBATCH hetjob")
    assert "#SBATCH --nodelist=n3" in followers
    # No --exclude of n3 for the leader: Slurm 22.05 carries it into the followers' component and refuses the job.
    assert "n3" not in leader


def test_busy_warm_node_gives_the_same_job_as_without_placement(warm) -> None:
    spec, tmp_path = warm
    plan = warmcache.place(settings(), make_plan(settings(), spec, runs_on=executor("slurm")), states=lambda: {**IDLE4, "n3": "alloc"})
    assert plan.warm_nodes == () and plan.placement_note == "any nodes: the warm node(s) are not idle: n3 (alloc)"
    off = make_plan(settings(), spec, runs_on=executor("slurm"))
    rd = RunDir(tmp_path / "run")
    assert render_job_script(plan, rd, "ENTRY") == render_job_script(off, rd, "ENTRY")


def test_the_setting_turns_it_off_without_asking_slurm(warm) -> None:
    spec, _ = warm
    off = settings(SPEEDSLURM_CLUSTER__WARM_PLACEMENT="false")
    plan = warmcache.place(off, make_plan(off, spec, runs_on=executor("slurm")), states=lambda: pytest.fail("sinfo asked"))
    assert plan.warm_nodes == () and plan.placement_note == "off (cluster.warm_placement: false)"
    nocache = settings(SPEEDSLURM_LLAMA__RPC_CACHE="false")
    plan = warmcache.place(nocache, make_plan(nocache, spec, runs_on=executor("slurm")), states=lambda: pytest.fail("sinfo asked"))
    assert plan.placement_note == "off: no rpc cache (llama.rpc_cache: false)"


def test_no_record_asks_slurm_nothing(warm, tmp_path: Path) -> None:
    spec, _ = warm
    other = tmp_path / "other.gguf"
    other.write_bytes(b"GGUF")
    spec = dataclasses.replace(spec, path=other, files=(other,))
    plan = warmcache.place(settings(), make_plan(settings(), spec, runs_on=executor("slurm")), states=lambda: pytest.fail("sinfo asked"))
    assert plan.warm_nodes == () and "no node holds a warm rpc cache" in plan.placement_note


def test_arrays_and_plain_jobs_name_no_node(warm) -> None:
    spec, _ = warm
    plan = warmcache.place(settings(), make_plan(settings(), spec, replicas=2, runs_on=executor("slurm")), states=lambda: IDLE4)
    assert plan.warm_nodes == () and plan.placement_note.startswith("not used: array job")


def test_sinfo_failing_takes_any_nodes(warm, monkeypatch: pytest.MonkeyPatch) -> None:
    from speedslurm.cluster import slurm
    from speedslurm.errors import CommandError

    spec, _ = warm

    def broken(partition):
        raise CommandError(["sinfo"], 1, "", "slurm_load_partitions: Unable to contact slurm controller")

    monkeypatch.setattr(slurm, "partition_info", broken)
    plan = warmcache.place(settings(), make_plan(settings(), spec, runs_on=executor("slurm")))
    assert plan.warm_nodes == () and plan.placement_note.startswith("any nodes: sinfo failed")
