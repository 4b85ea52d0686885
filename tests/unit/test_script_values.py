"""Values that reach a job script (issue 11): a line break or control character in any setting the script
carries is refused, exit 2, before anything is queued, on every path (``plan``, ``up``, ``submit``, ``render``).

One check (:func:`speedslurm.planning.plan.check_script_values`, through :func:`speedslurm.planning.sbatchopts.refuse_control`)
runs where the job's sbatch parameters are built (:func:`speedslurm.cluster.script.slurm_parameters`), which every job
script comes from, and already when the plan is made. Before, only ``render`` refused them: ``up``, ``submit``
and ``plan`` put ``account: "lab\\n#SBATCH --nodelist=n9"`` into the script, where the second line runs as shell.

On the test bed: tests/real/test_script_values_real.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import typing as tp
from pathlib import Path

import pytest

from speedslurm.cluster.registry import get as executor
from speedslurm.cluster.script import render_job_script, slurm_parameters
from speedslurm.errors import ConfigError, UsageError
from speedslurm.model.registry import ModelSpec
from speedslurm.planning.plan import make_plan
from speedslurm.rundir.layout import RunDir
from speedslurm.settings.settings import load_settings

INJECTED = "\n#SBATCH --nodelist=n9\ntouch PWNED"


def spec(host: str | None = None) -> ModelSpec:
    path = Path("/models/m.gguf")
    return ModelSpec(name="m", path=path, files=(path,), weights_bytes=1_000_000_000, n_layer=80, n_head_kv=8,
                     head_dim=128, head_dim_v=128, ctx=8192, host=host, local=False)


# (setting, YAML of the user config that sets it to a hostile value)
SETTINGS = [
    ("cluster.partition", "cluster:\n  partition: {v}\n"),
    ("cluster.account", "cluster:\n  account: {v}\n"),
    ("cluster.qos", "cluster:\n  qos: {v}\n"),
    ("cluster.gres_per_node", "cluster:\n  gres_per_node: {v}\n"),
    ("cluster.mem_per_node", "cluster:\n  mem_per_node: {v}\n"),
    ("cluster.exclude", "cluster:\n  exclude: [n4, {v}]\n"),
    ("cluster.sbatch.comment", "cluster:\n  sbatch:\n    comment: {v}\n"),
]


@pytest.mark.parametrize("bad", ["lab" + INJECTED, "lab\r", "x\x00y", "tab\tx", "del\x7f"])
@pytest.mark.parametrize(("setting", "yaml_text"), SETTINGS, ids=[s for s, _ in SETTINGS])
def test_plan_refuses_a_control_character_in_a_setting_naming_it_and_its_file(
        user_config: Path, setting: str, yaml_text: str, bad: str) -> None:
    user_config.write_text(yaml_text.format(v=json.dumps(bad)))
    settings = load_settings(profile="gorgonas")
    with pytest.raises(ConfigError, match="control character") as err:
        make_plan(settings, spec(), runs_on=executor("slurm"))
    assert setting in err.value.message and str(user_config) in err.value.message, err.value.message
    assert err.value.exit_code == 2 and setting in (err.value.fix or "")


def test_plan_refuses_a_line_break_in_the_time_and_names_its_flag(user_config: Path) -> None:
    user_config.write_text("{}\n")
    with pytest.raises(ConfigError, match="cluster.time") as err:
        make_plan(load_settings(profile="gorgonas"), spec(), time="04:00:00\n", runs_on=executor("slurm"))
    assert err.value.message.startswith("--time:"), err.value.message


def test_plan_refuses_a_line_break_in_the_models_host(user_config: Path) -> None:
    user_config.write_text("{}\n")
    with pytest.raises(ConfigError, match=r"models\.m\.host"):
        make_plan(load_settings(profile="gorgonas"), spec(host="n1" + INJECTED), runs_on=executor("slurm"))


def test_the_local_executor_has_no_script_and_is_not_refused(user_config: Path) -> None:
    user_config.write_text("cluster:\n  account: " + json.dumps("lab" + INJECTED) + "\n")
    assert make_plan(load_settings(profile="gorgonas"), spec(), runs_on=executor("local")).executor == "local"


FIELDS = [("partition", "cluster.partition"), ("account", "cluster.account"), ("qos", "cluster.qos"),
          ("gres", "cluster.gres_per_node"), ("mem_per_node", "cluster.mem_per_node"), ("time", "cluster.time"),
          ("exclude", "cluster.exclude"), ("leader_host", "models.m.host"), ("sbatch", "cluster.sbatch.comment")]


@pytest.mark.parametrize(("field", "setting"), FIELDS, ids=[f for f, _ in FIELDS])
@pytest.mark.parametrize("layout", ["single", "hetjob", "array"])
def test_every_script_path_refuses_a_hand_made_plan(user_config: Path, field: str, setting: str,
                                                    layout: str) -> None:
    """A Plan made without make_plan (a library caller) still cannot reach a script: slurm_parameters,
    which the hetjob renderer, submitit's array path and ``render`` all call, refuses it."""
    user_config.write_text("{}\n")
    plan = make_plan(load_settings(profile="gorgonas"), spec(), nodes=1 if layout == "single" else 2,
                     replicas=2 if layout == "array" else 1, runs_on=executor("slurm"))
    value: tp.Any = "x" + INJECTED
    if field == "exclude":
        value = ("n4", value)
    elif field == "sbatch":
        value = (("comment", value),)
    plan = dataclasses.replace(plan, **{field: value})
    rd = RunDir(Path("/shared/runs/x"))
    with pytest.raises(UsageError, match="control character") as err:
        render_job_script(plan, rd, "ENTRY")
    assert setting in err.value.message
    with pytest.raises(UsageError, match=setting.replace(".", r"\.")):
        slurm_parameters(plan, rd)


def test_a_line_break_in_the_run_dir_is_refused_where_the_parameters_are_built(user_config: Path) -> None:
    user_config.write_text("{}\n")
    plan = make_plan(load_settings(profile="gorgonas"), spec(), runs_on=executor("slurm"))
    with pytest.raises(ConfigError, match=r"run\.dir"):
        slurm_parameters(plan, RunDir(Path("/shared/runs/a\n#SBATCH --nodelist=n9/x")))


def test_the_plan_cli_exits_2_naming_the_setting(user_config: Path, tmp_path: Path) -> None:
    """``speedslurm plan`` (no Slurm needed for a model given by registry entry with a size)."""
    user_config.write_text("cluster:\n  qos: " + json.dumps("normal" + INJECTED) + "\n"
                           "models:\n  m:\n    files: [/models/m.gguf]\n    host: n1\n    size_bytes: 1000000000\n"
                           "    arch: {n_layer: 24, n_head_kv: 8, head_dim: 64}\n")
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    (tmp_path / "sinfo").write_text("#!/bin/sh\nfor n in n1 n2 n3 n4; do echo \"$n|gorgonas*|gpu:1|idle\"; done\n")
    (tmp_path / "sbatch").write_text(f"#!/bin/sh\ntouch {tmp_path}/SUBMITTED\n")
    for tool in ("sinfo", "sbatch"):
        (tmp_path / tool).chmod(0o755)
    res = subprocess.run([sys.executable, "-m", "speedslurm", "--profile", "gorgonas", "plan", "--model", "m",
                          "--executor", "slurm"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert "cluster.qos" in res.stderr and str(user_config) in res.stderr and "PWNED" not in res.stdout
    assert not (tmp_path / "SUBMITTED").exists()
