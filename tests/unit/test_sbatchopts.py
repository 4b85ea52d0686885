"""``cluster.sbatch``: extra sbatch options checked against sbatch's option list and rendered into the job script.

On the test bed: tests/real/test_sbatchopts_real.py.
"""

from __future__ import annotations

import json
import re
import typing as tp
from pathlib import Path

import pytest

from speedslurm.cluster.registry import get as executor
from speedslurm.cluster.script import render_job_script, slurm_parameters
from speedslurm.errors import ConfigError, UsageError
from speedslurm.model.registry import ModelSpec
from speedslurm.planning.plan import make_plan
from speedslurm.planning.sbatchopts import MANAGED, option_names, sbatch_options
from speedslurm.rundir.layout import RunDir
from speedslurm.settings.settings import load_settings


def spec(weights: int = 40_350_000_000) -> ModelSpec:
    path = Path("/models/m.gguf")
    return ModelSpec(name="m", path=path, files=(path,), weights_bytes=weights, n_layer=80, n_head_kv=8,
                     head_dim=128, head_dim_v=128, ctx=8192, host=None, local=False)


def settings_with(cfg: Path, yaml_text: str, *overrides: str) -> tp.Any:
    cfg.write_text(yaml_text)
    return load_settings(profile="gorgonas", overrides=overrides)


def test_simple_slurm_table_is_sbatchs_option_list() -> None:
    """The one place that reads simple-slurm's table: fails here, loudly, if simple-slurm changes it."""
    names = option_names()
    assert len(names) > 80
    assert {"comment", "constraint", "reservation", "mail_type", "mail_user", "exclusive", "hold"} <= set(names)
    assert all(re.fullmatch(r"[a-z][a-z_]*", n) for n in names), names
    assert set(MANAGED) <= set(names), set(MANAGED) - set(names)


def test_unknown_option_names_it_its_file_and_close_matches(user_config: Path) -> None:
    s = settings_with(user_config, "cluster:\n  sbatch:\n    reservaton: lab\n")
    with pytest.raises(ConfigError) as err:
        make_plan(s, spec(), runs_on=executor("slurm"))
    assert str(user_config) in err.value.message and "'reservaton'" in err.value.message
    assert err.value.fix and "reservation" in err.value.fix


def test_unknown_option_from_set_names_the_flag() -> None:
    s = load_settings(profile="gorgonas", environ={}, overrides=["cluster.sbatch.constrain=a100"])
    with pytest.raises(ConfigError, match=r"--set cluster\.sbatch\.constrain: unknown sbatch option 'constrain'") as err:
        make_plan(s, spec(), runs_on=executor("slurm"))
    assert err.value.fix and "constraint" in err.value.fix


def test_options_speedslurm_sets_are_refused_with_the_setting_to_use() -> None:
    with pytest.raises(ConfigError, match="speedslurm sets --partition itself") as err:
        sbatch_options({"partition": "big"})
    assert err.value.fix and "cluster.partition" in err.value.fix
    with pytest.raises(ConfigError, match="twice"):
        sbatch_options({"mail-type": "END", "mail_type": "FAIL"})


def test_names_values_and_flags() -> None:
    got = sbatch_options({"mail-type": "END,FAIL", "C": "rtx4090", "exclusive": True, "hold": False,
                          "reservation": None, "nice": 10})
    assert got == (("constraint", "rtx4090"), ("exclusive", True), ("mail_type", "END,FAIL"), ("nice", "10"))


@pytest.mark.parametrize("value", ["a\nb", "lab\r", "x\x00y", "tab\there"])
def test_a_control_character_in_a_value_is_refused(user_config: Path, value: str) -> None:
    s = settings_with(user_config, "cluster:\n  sbatch:\n    comment: " + json.dumps(value) + "\n")
    with pytest.raises(ConfigError, match="control character") as err:
        make_plan(s, spec(), runs_on=executor("slurm"))
    assert str(user_config) in err.value.message and "cluster.sbatch.comment" in err.value.message


def test_a_hand_made_plan_with_a_line_break_is_refused_by_the_renderer() -> None:
    import dataclasses

    s = load_settings(profile="gorgonas", environ={})
    plan = dataclasses.replace(make_plan(s, spec(), runs_on=executor("slurm")), sbatch=(("comment", "x\n#SBATCH --nodelist=n9"),))
    with pytest.raises(UsageError, match="control character"):
        render_job_script(plan, RunDir(Path("/shared/runs/x")), "ENTRY")


def test_options_reach_every_component_of_a_hetjob_quoted(user_config: Path) -> None:
    s = settings_with(user_config, "cluster:\n  sbatch:\n    constraint: 'rtx4090|rtx3090ti'\n"
                                   "    comment: \"it's; $(touch PWNED)\"\n    exclusive: true\n")
    plan = make_plan(s, spec(), nodes=3, runs_on=executor("slurm"))
    assert plan.layout == "hetjob"
    lines = render_job_script(plan, RunDir(Path("/shared/runs/x")), "ENTRY").splitlines()
    split = lines.index("#SBATCH hetjob")
    for part in (lines[:split], lines[split:]):
        assert "#SBATCH --constraint='rtx4090|rtx3090ti'" in part
        assert "#SBATCH --comment='it'\"'\"'s; $(touch PWNED)'" in part
        assert "#SBATCH --exclusive" in part
    assert plan.to_json()["sbatch"] == {"comment": "it's; $(touch PWNED)", "constraint": "rtx4090|rtx3090ti",
                                        "exclusive": True}


def test_array_jobs_get_them_through_submitits_own_path(tmp_path: Path) -> None:
    """Replicas go through submitit's executor (map_array), which renders the same parameters."""
    import submitit

    s = load_settings(profile="gorgonas", environ={}, overrides=["cluster.sbatch.mail-type=END"])
    plan = make_plan(s, spec(), replicas=2, runs_on=executor("slurm"))
    rd = RunDir(tmp_path / "x")
    ex = submitit.SlurmExecutor(folder=rd.submitit_dir, max_num_timeout=0)
    ex.update_parameters(**slurm_parameters(plan, rd), array_parallelism=plan.replicas)
    assert "#SBATCH --mail-type=END" in ex._make_submission_file_text("ENTRY", "uid").splitlines()


def test_golden_scripts_are_unchanged_without_options() -> None:
    s = load_settings(profile="gorgonas", environ={})
    assert s.cluster.sbatch == {}
    assert make_plan(s, spec(), runs_on=executor("slurm")).sbatch == ()


def test_plan_prints_the_option_in_its_job_script(user_config: Path, tiny_gguf: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from speedslurm.cli import main
    from speedslurm.cluster import slurm

    user_config.write_text("")
    monkeypatch.setattr(slurm, "partition_info", lambda partition: {"name": "gorgonas", "nodes": ["n1", "n2"]})
    args = ["--profile", "testbed", "--set", "cluster.sbatch.comment=speedslurm test", "plan", "--model",
            str(tiny_gguf), "--executor", "slurm", "--json"]
    main(args)
    out = json.loads(capsys.readouterr().out)
    assert "#SBATCH --comment='speedslurm test'" in out["job_script"].splitlines()
    assert out["plan"]["sbatch"] == {"comment": "speedslurm test"}
    with pytest.raises(SystemExit) as exit_:
        main([*args[:3], "cluster.sbatch.comentt=x", *args[4:]])
    assert exit_.value.code == 2
    assert "unknown sbatch option 'comentt'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ on the test bed
