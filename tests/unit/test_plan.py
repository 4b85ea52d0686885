"""Planner figures (from metadata, never 40 GB files), validation, and the job it renders."""

from __future__ import annotations

from pathlib import Path

import pytest

from speedslurm.cluster.registry import get as executor
from speedslurm.cluster.script import render_job_script
from speedslurm.cluster.submitit_adapter import entry_command
from speedslurm.errors import UsageError
from speedslurm.model.registry import ModelSpec, resolve_model
from speedslurm.planning.plan import make_plan, parse_time_minutes
from speedslurm.planning.split import GIB, nodes_needed
from speedslurm.rundir.layout import RunDir
from speedslurm.settings.settings import load_settings


def llama70b(weights_bytes: int, host: str | None = None) -> ModelSpec:
    """Llama-3.1-70B's shape: 80 layers, 8 KV heads of 128."""
    return ModelSpec(name="llama70b", path=Path("/m/model.gguf"), files=(Path("/m/model.gguf"),),
                     weights_bytes=weights_bytes, n_layer=80, n_head_kv=8, head_dim=128, head_dim_v=128,
                     ctx=8192, host=host)


@pytest.fixture
def gorgonas():
    return load_settings(profile="gorgonas", environ={})


def test_kv_cache_of_70b_at_8192_is_2_5_gib() -> None:
    assert llama70b(1).kv_bytes(8192) == int(2.5 * GIB)


@pytest.mark.parametrize("gb, nodes", [(40, 2), (59, 3)])
def test_seed_figures(gorgonas, gb: int, nodes: int) -> None:
    plan = make_plan(gorgonas, llama70b(gb * 10**9), ctx=8192, runs_on=executor("slurm"))
    assert plan.nodes == nodes
    # every device fits in the 22 GiB usable
    assert all(d.total_bytes <= 22 * GIB for d in plan.devices)


def test_registry_models_plan_2_and_3_nodes(gorgonas) -> None:
    assert make_plan(gorgonas, resolve_model(gorgonas, "Q4_K_S"), runs_on=executor("slurm")).nodes == 2
    assert make_plan(gorgonas, resolve_model(gorgonas, "Q6_K_L"), runs_on=executor("slurm")).nodes == 3


def test_formula_is_smallest_n() -> None:
    # weights + KV = 40 GiB; per node 22 - 1 = 21 GiB -> 2 nodes; 43 GiB -> 3 nodes
    assert nodes_needed(38 * GIB, 2 * GIB, 22 * GIB, 1 * GIB) == 2
    assert nodes_needed(41 * GIB, 2 * GIB, 22 * GIB, 1 * GIB) == 3
    assert nodes_needed(1, 0, 22 * GIB, 1 * GIB) == 1


def test_gib_not_gb(gorgonas) -> None:
    # The seed's "22 GB usable" are GiB: reading them as 22e9 bytes would ask for 3 nodes.
    assert nodes_needed(40 * 10**9, int(2.5 * GIB), 22 * 10**9, int(1.1 * GIB)) == 3
    assert make_plan(gorgonas, llama70b(40 * 10**9), runs_on=executor("slurm")).nodes == 2


def test_longer_context_needs_more(gorgonas) -> None:
    assert make_plan(gorgonas, llama70b(40 * 10**9), ctx=131072, runs_on=executor("slurm")).nodes > 2


def test_too_few_nodes_is_an_error_with_the_fix(gorgonas) -> None:
    with pytest.raises(UsageError) as err:
        make_plan(gorgonas, llama70b(59 * 10**9), nodes=2, runs_on=executor("slurm"))
    assert "needs 3 nodes" in err.value.message and "--nodes 3" in (err.value.fix or "")
    assert err.value.exit_code == 2


def test_nodes_override_upwards(gorgonas) -> None:
    assert make_plan(gorgonas, llama70b(40 * 10**9), nodes=4, runs_on=executor("slurm")).nodes == 4


@pytest.mark.parametrize("kw, text", [({"nodes": 0}, "--nodes 0"), ({"replicas": 0}, "--replicas 0"),
                                      ({"ctx": 0}, "--ctx 0"), ({"time": "soon"}, "--time 'soon'")])
def test_bad_values(gorgonas, kw: dict, text: str) -> None:
    with pytest.raises(UsageError, match=text.replace("'", ".")):
        make_plan(gorgonas, llama70b(40 * 10**9), **kw, runs_on=executor("slurm"))


def test_replicas_above_partition_size(gorgonas) -> None:
    with pytest.raises(UsageError) as err:
        make_plan(gorgonas, llama70b(40 * 10**9), replicas=5, partition_size=8, runs_on=executor("slurm"))
    assert "10 nodes" in err.value.message and "--replicas 4" in (err.value.fix or "")


def test_host_pinned_model_cannot_have_replicas(gorgonas) -> None:
    with pytest.raises(UsageError, match="local disk"):
        make_plan(gorgonas, llama70b(40 * 10**9, host="gorgona1"), replicas=2, runs_on=executor("slurm"))


@pytest.mark.parametrize("value, minutes", [("90", 90), ("01:30:00", 90), ("1-00:00:00", 1440),
                                            ("10:30", 11), ("2-3", 2 * 1440 + 180)])
def test_parse_time(value: str, minutes: int) -> None:
    assert parse_time_minutes(value) == minutes


def test_hetjob_script_pins_leader_and_excludes_it_from_followers(gorgonas, tmp_path: Path) -> None:
    plan = make_plan(gorgonas, llama70b(59 * 10**9, host="gorgona1"), runs_on=executor("slurm"))
    rd = RunDir(tmp_path / "dep")
    text = render_job_script(plan, rd, entry_command("python3", rd.submitit_dir))
    head, _, followers = text.partition("#SBATCH hetjob")
    assert "#SBATCH --nodelist=gorgona1" in head and "#SBATCH --nodes=1" in head
    assert "#SBATCH --nodes=2" in followers and "#SBATCH --exclude=gorgona1" in followers
    assert "--het-group=0,1" in text and "--kill-on-bad-exit=1" in text
    assert "#SBATCH --gres=gpu:1" in head and "#SBATCH --gres=gpu:1" in followers
    assert "speedslurm.node.entry" in text


def test_replicas_render_a_job_array_of_n_node_jobs(gorgonas, tmp_path: Path) -> None:
    plan = make_plan(gorgonas, llama70b(40 * 10**9), replicas=3, runs_on=executor("slurm"))
    rd = RunDir(tmp_path / "dep")
    text = render_job_script(plan, rd, "python3 -m speedslurm.node.roles x")
    assert "#SBATCH --array=0-2%3" in text and "#SBATCH --nodes=2" in text and "hetjob" not in text


def test_unknown_model_lists_known(gorgonas) -> None:
    with pytest.raises(UsageError) as err:
        resolve_model(gorgonas, "Q5_NOPE")
    assert "Q4_K_S" in err.value.message and "Q6_K_L" in err.value.message


def test_missing_gguf_path(gorgonas, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="does not exist"):
        resolve_model(gorgonas, str(tmp_path / "absent.gguf"))


def test_not_a_gguf(gorgonas, tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"this is not gguf at all" * 10)
    with pytest.raises(UsageError, match="not a GGUF"):
        resolve_model(gorgonas, str(bad))


def test_tiny_model_plans_one_node(gorgonas, tiny_gguf: Path) -> None:
    spec = resolve_model(gorgonas, str(tiny_gguf))
    assert spec.n_layer > 0 and spec.weights_bytes > 0
    assert make_plan(gorgonas, spec, runs_on=executor("slurm")).nodes == 1


def test_one_replica_larger_than_the_partition(gorgonas) -> None:
    with pytest.raises(UsageError) as err:
        make_plan(gorgonas, llama70b(59 * 10**9), partition_size=2, runs_on=executor("slurm"))
    assert "needs 3 node(s)" in err.value.message and "--replicas" not in (err.value.fix or "")


def test_hetjob_off_gives_one_plain_n_node_job(tmp_path: Path) -> None:
    settings = load_settings(profile="gorgonas", environ={}, overrides=["cluster.hetjob=false"])
    plan = make_plan(settings, llama70b(59 * 10**9), runs_on=executor("slurm"))
    assert plan.layout == "plain" and not plan.heterogeneous
    rd = RunDir(tmp_path / "dep")
    text = render_job_script(plan, rd, "python3 -m speedslurm.node.entry x")
    assert "#SBATCH hetjob" not in text and "#SBATCH --nodes=3" in text and "--het-group" not in text
    # a model pinned to its host still needs the leader component
    pinned = make_plan(settings, llama70b(59 * 10**9, host="gorgona1"), runs_on=executor("slurm"))
    assert pinned.layout == "hetjob"
