"""A job that sbatch refuses leaves nothing behind: `up` and `submit` exit 2 with sbatch's own words and the
setting to change (and where it was set), and no deployment is listed for it.

Before, `up` created the run directory, submitit's FailedJobError came out as a traceback (exit 1), and
`status` listed the deployment as UNSUBMITTED for good, pointing at a job.sbatch to submit by hand.

On the test bed: tests/real/test_sbatch_refusal_real.py.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from speedslurm.cluster.registry import get as executor
from speedslurm.cluster.script import SbatchRefused, refusal, refused_settings
from speedslurm.deployments import lifecycle as dp
from speedslurm.deployments.record import list_deployments
from speedslurm.model.registry import ModelSpec
from speedslurm.planning.plan import make_plan
from speedslurm.settings.settings import load_settings

# What sbatch (Slurm 22.05 to 24.x) prints when it refuses a job, and the setting that asked for it.
MESSAGES = [
    ("sbatch: error: Batch job submission failed: Invalid feature specification", "cluster.sbatch.constraint"),
    ("sbatch: error: Batch job submission failed: Invalid qos specification", "cluster.qos"),
    ("sbatch: error: Batch job submission failed: Job has invalid qos", "cluster.qos"),
    ("sbatch: error: Batch job submission failed: Job's QOS not permitted to use this partition (gorgonas "
     "allows normal not high)", "cluster.qos"),
    ("sbatch: error: Batch job submission failed: Invalid account or account/partition combination specified",
     "cluster.account"),
    ("sbatch: error: Batch job submission failed: Requested reservation is invalid", "cluster.sbatch.reservation"),
    ("sbatch: error: Batch job submission failed: Invalid reservation name specified",
     "cluster.sbatch.reservation"),
    ("sbatch: error: invalid partition specified: nosuch\nsbatch: error: Batch job submission failed: Invalid "
     "partition name specified", "cluster.partition"),
    ("sbatch: error: Batch job submission failed: Invalid generic resource (gres) specification",
     "cluster.gres_per_node"),
    ("sbatch: error: Batch job submission failed: Memory required by task is not available",
     "cluster.mem_per_node"),
    ("sbatch: error: Batch job submission failed: Requested time limit is invalid (missing or exceeds some limit)",
     "cluster.time"),
    ("sbatch: error: Batch job submission failed: Invalid node name specified", "cluster.exclude"),
    ("sbatch: error: Batch job submission failed: Requested node configuration is not available",
     "cluster.cpus_per_node"),
]


@pytest.mark.parametrize(("message", "setting"), MESSAGES, ids=[s for _, s in MESSAGES])
def test_sbatch_messages_map_to_the_setting_to_change(message: str, setting: str) -> None:
    assert refused_settings(message)[0] == setting


def test_an_unknown_refusal_names_the_settings_that_reach_sbatch() -> None:
    assert refused_settings("sbatch: error: Batch job submission failed: Something new") == (
        "cluster.partition", "cluster.account", "cluster.qos", "cluster.sbatch")


def spec() -> ModelSpec:
    path = Path("/models/m.gguf")
    return ModelSpec(name="m", path=path, files=(path,), weights_bytes=1_000_000_000, n_layer=80, n_head_kv=8,
                     head_dim=128, head_dim_v=128, ctx=8192, host=None, local=False)


@pytest.fixture
def clean_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in list(os.environ):
        if name.startswith("SPEEDSLURM_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("SPEEDSLURM_CONFIG", str(tmp_path / "config.yaml"))
    monkeypatch.setenv("SPEEDSLURM_RUN__DIR", str(tmp_path / "runs"))
    (tmp_path / "config.yaml").write_text("{}\n")
    return tmp_path


def test_the_error_names_sbatchs_words_the_setting_and_where_it_was_set(clean_env: Path) -> None:
    (clean_env / "config.yaml").write_text("cluster:\n  qos: high\n")
    settings = load_settings(profile="gorgonas", overrides=("cluster.sbatch.constraint=nosuchfeature",))
    plan = make_plan(settings, spec(), runs_on=executor("slurm"))
    err = refusal(plan, "sbatch: error: Batch job submission failed: Invalid feature specification\n")
    assert err.exit_code == 2 and err.setting == "cluster.sbatch.constraint"
    assert err.message == "sbatch refused the job: sbatch: error: Batch job submission failed: Invalid feature " \
                          "specification"
    assert (err.fix or "").startswith("check cluster.sbatch.constraint (set in --set cluster.sbatch.constraint)"), err.fix
    err = refusal(plan, "sbatch: error: Batch job submission failed: Invalid qos specification")
    assert (err.fix or "").startswith(f"check cluster.qos (set in {clean_env / 'config.yaml'}"), err.fix
    err = refusal(plan, "sbatch: error: Batch job submission failed: Requested reservation is invalid")
    assert (err.fix or "").startswith("check cluster.sbatch.reservation (not set)"), err.fix


def fake_sbatch(folder: Path, message: str) -> Path:
    """An sbatch on PATH that refuses every job with ``message``, as Slurm's does (stderr, exit 1)."""
    folder.mkdir(exist_ok=True)
    script = folder / "sbatch"
    script.write_text(f"#!/bin/sh\nprintf '%s\\n' {json.dumps(message)} >&2\nexit 1\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return folder


@pytest.mark.parametrize("replicas", [1, 2], ids=["hetjob", "array"])
def test_a_refused_job_leaves_no_run_directory_and_no_deployment(
        clean_env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], replicas: int) -> None:
    bin_dir = fake_sbatch(clean_env / "bin", "sbatch: error: Batch job submission failed: Invalid feature "
                                             "specification")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(dp, "binaries_record", lambda binaries: {})
    settings = load_settings(profile="gorgonas", overrides=("cluster.sbatch.constraint=nosuchfeature",))
    plan = make_plan(settings, spec(), nodes=2, replicas=replicas, runs_on=executor("slurm"))
    with pytest.raises(SbatchRefused) as err:
        dp.launch(settings, plan, None)
    assert err.value.message.endswith("Invalid feature specification")
    assert "Invalid feature" not in capsys.readouterr().err  # said once, in the error (submitit prints it too)
    assert list((clean_env / "runs").iterdir()) == []
    assert list_deployments(settings) == []


@pytest.mark.parametrize("command", ["up", "submit"])
def test_up_and_submit_exit_2_with_the_message_and_no_traceback(clean_env: Path, command: str) -> None:
    """`up` and `submit` end to end, their sbatch refusing (the bed test below does it with the real Slurm)."""
    bin_dir = fake_sbatch(clean_env / "bin", "sbatch: error: Batch job submission failed: Invalid qos "
                                             "specification")
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    code = ("import sys; from speedslurm.deployments import lifecycle as dp\n"
            "from speedslurm.cluster import slurm_executor as ex\n"
            "dp.binaries_record = lambda b: {}\n"
            "ex.SlurmExecutor.nodes_available = lambda self, s: 4\n"
            "import speedslurm.node.binaries as b; b.find_llama_binaries = lambda d: type('B', (), "
            "{'check_same_build': lambda self: None})()\n"
            "from speedslurm.cli import main; main(sys.argv[1:])\n")
    gguf = clean_env / "m.gguf"
    from devtools.testmodels import write_tiny_llama_gguf

    write_tiny_llama_gguf(gguf)
    prompts = clean_env / "p.jsonl"
    prompts.write_text('{"custom_id": "a", "prompt": "Hi"}\n')
    extra = ["--prompts", str(prompts)] if command == "submit" else []
    res = subprocess.run([sys.executable, "-c", code, "--profile", "gorgonas", "--set", "cluster.qos=nosuch",
                          command, "--model", str(gguf), "--nodes", "2", "--executor", "slurm", *extra],
                         capture_output=True, text=True, env=env, timeout=120, stdin=subprocess.DEVNULL)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    flat = " ".join(res.stderr.split())
    assert "Error: sbatch refused the job: sbatch: error: Batch job submission failed: Invalid qos " \
           "specification" in flat, res.stderr
    assert "Fix: check cluster.qos (set in --set cluster.qos)" in flat, res.stderr
    assert not (clean_env / "runs").exists() or list((clean_env / "runs").iterdir()) == []
    results = clean_env / "p.results.jsonl"
    assert not results.exists() or results.read_text() == ""  # no batch started


# ------------------------------------------------------------------------------------------ on the bed
