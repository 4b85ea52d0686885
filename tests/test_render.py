"""`speedslurm render` and the build script renderer: golden files, quoting, hostile paths.

Golden files live in tests/golden/. After an intended change of a rendered script, regenerate them with

    SPEEDSLURM_REGEN_GOLDEN=1 pytest tests/test_render.py

and review the diff.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from speedslurm.buildllama import BuildOptions, render_build_script, template_text
from speedslurm.errors import UsageError
from speedslurm.models import ModelSpec
from speedslurm.plan import make_plan
from speedslurm.render import create_run_dir, deployment_record, job_id_from_env, record_job, render_script
from speedslurm.rundir import Endpoint, RunDir
from speedslurm.settings import ClusterSettings, LlamaSettings, RunSettings, Settings

GOLDEN = Path(__file__).parent / "golden"
REGEN = os.environ.get("SPEEDSLURM_REGEN_GOLDEN", "") not in ("", "0")
PYTHON = "/opt/speedslurm/venv/bin/python"


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if REGEN:
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
        return
    assert path.exists(), f"{path} is missing; create it with SPEEDSLURM_REGEN_GOLDEN=1"
    assert text == path.read_text(), f"{name} differs from its golden file (SPEEDSLURM_REGEN_GOLDEN=1 to accept)"


def settings(run_dir: str = "/shared/runs") -> Settings:
    return Settings(
        cluster=ClusterSettings(name="gorgonas", partition="gorgonas", gres_per_node="gpu:1", usable_gib=22.0,
                                time="04:00:00", exclude=["gorgona8"]),
        llama=LlamaSettings(), run=RunSettings(dir=run_dir))


def spec(name: str = "Q4_K_S", path: str = "/models/Reflection-Llama-3.1-70B-Q4_K_S.gguf",
         host: str | None = None, weights: int = 40_350_000_000) -> ModelSpec:
    return ModelSpec(name=name, path=Path(path), files=(Path(path),), weights_bytes=weights, n_layer=80,
                     n_head_kv=8, head_dim=128, head_dim_v=128, ctx=8192, host=host, local=False)


@pytest.mark.parametrize("case", ["hetjob", "array", "single"])
def test_render_golden(case: str) -> None:
    s = settings()
    if case == "hetjob":
        plan = make_plan(s, spec(host="gorgona1"), nodes=3)
    elif case == "array":
        plan = make_plan(s, spec(), replicas=2)
    else:
        plan = make_plan(s, spec(name="small", path="/models/small.gguf", weights=2_000_000_000))
    assert plan.layout == case
    rd = RunDir(Path(f"/shared/runs/{plan.model.name.lower()}-20260101-000000-abcd"))
    check_golden(f"render-{case}.sbatch", render_script(plan, rd, PYTHON))


def test_render_is_the_up_script_with_another_entry() -> None:
    """Everything but the task command and the job-id line equals what `up` submits."""
    from speedslurm.launch import render_job_script

    plan = make_plan(settings(), spec(), nodes=2)
    rd = RunDir(Path("/shared/runs/x"))
    ours = render_script(plan, rd, PYTHON).split("\n")
    ups = render_job_script(plan, rd, "ENTRY").split("\n")
    srun = next(i for i, line in enumerate(ours) if line.startswith("srun "))
    assert ours[srun].endswith(f"{PYTHON} -u -m speedslurm.jobside /shared/runs/x")
    kept = [line for line in ours if not line.startswith(("srun ", "# record this job", PYTHON))]
    assert [line for line in kept if line] == [line for line in ups if line and not line.startswith("srun ")]


def test_build_script_golden() -> None:
    opts = BuildOptions(prefix=Path("/shared/opt/llama.cpp"), source=Path("/shared/src/llama.cpp"),
                        partition="gorgonas", cpus=16)
    check_golden("build-llama-cuda.sbatch", render_build_script(template_text(), opts))
    cpu = BuildOptions(prefix=Path("/shared/opt/llama.cpp-cpu"), git_url="https://github.com/ggml-org/llama.cpp",
                       git_ref="b6000", cuda=False)
    check_golden("build-llama-cpu.sbatch", render_build_script(template_text(), cpu))


# ------------------------------------------------------------------------------------------ hostile values

HOSTILE = "dep sp'ace \"dq\" $(touch {p1}) `touch {p2}` ;x&y|z $HOME \\ *"


def _fake_srun(tmp: Path) -> Path:
    bin_dir = tmp / "fakebin"
    bin_dir.mkdir()
    srun = bin_dir / "srun"
    srun.write_text('#!/bin/bash\nprintf \'%s\\0\' "$@" > "$FAKE_SRUN_ARGS"\n'
                    'printf \'%s\' "$SPEEDSLURM_RUN_DIR" > "$FAKE_SRUN_ENV"\n')
    srun.chmod(0o755)
    return bin_dir


def _run_sandboxed(script: str, tmp: Path, env_extra: dict[str, str]) -> tuple[list[str], str]:
    """bash -n, then run the script with a fake srun that records its argv; returns (argv, run dir seen)."""
    path = tmp / "job.sbatch"
    path.write_text(script)
    res = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    bin_dir = _fake_srun(tmp)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp), "FAKE_SRUN_ARGS": str(tmp / "argv"),
           "FAKE_SRUN_ENV": str(tmp / "env"), "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
           **env_extra}
    res = subprocess.run(["bash", str(path)], capture_output=True, text=True, env=env, cwd=tmp, timeout=60)
    assert res.returncode == 0, res.stderr
    argv = (tmp / "argv").read_bytes().decode().split("\0")[:-1]
    return argv, (tmp / "env").read_text()


def test_hostile_run_dir_is_quoted_and_nothing_runs(tmp_path: Path) -> None:
    # Relative names: the sandbox runs in tmp_path, so an executed `touch` would create them there.
    p1, p2 = tmp_path / "pwned1", tmp_path / "pwned2"
    root = tmp_path / "runs" / HOSTILE.format(p1=p1.name, p2=p2.name)
    root.parent.mkdir(mode=0o700)
    plan = make_plan(settings(str(root.parent)), spec(), nodes=2)
    rd = create_run_dir(root, deployment_record(settings(str(root.parent)), plan, {}, root.name), plan.replicas)
    assert oct(rd.root.stat().st_mode & 0o777) == "0o700"
    assert oct((rd.root / "api_key").stat().st_mode & 0o777) == "0o600"
    script = render_script(plan, rd, sys.executable)
    argv, seen = _run_sandboxed(script, tmp_path, {"SLURM_JOB_ID": "42"})
    assert not p1.exists() and not p2.exists()
    assert argv[-5:] == [sys.executable, "-u", "-m", "speedslurm.jobside", str(root)]
    assert argv[argv.index("--output") + 1] == str(root / "submitit" / "%j_%t_log.out")
    assert seen == str(root)
    # The job-id line ran with the same run directory.
    assert json.loads((root / "deployment.json").read_text())["job_ids"] == ["42"]


def test_hostile_model_name_and_path(tmp_path: Path) -> None:
    p1, p2, p3 = tmp_path / "pwned1", tmp_path / "pwned2", tmp_path / "pwned3"
    name = f"m\n$(touch {p1.name})\n`touch {p2.name}`'\"x"
    path = tmp_path / f"evil\n$(touch {p3.name}) '.gguf"
    plan = make_plan(settings(), spec(name=name, path=str(path)), nodes=2)
    rd = RunDir(tmp_path / "runs" / "dep")
    script = render_script(plan, rd, sys.executable)
    job_name = next(line for line in script.split("\n") if line.startswith("#SBATCH --job-name="))
    assert "touch" in job_name  # the same line: the newline did not split it
    (tmp_path / "runs").mkdir(mode=0o700)
    create_run_dir(rd.root, deployment_record(settings(), plan, {}, "dep"), plan.replicas)
    argv, _ = _run_sandboxed(script, tmp_path, {"SLURM_JOB_ID": "7"})
    assert not p1.exists() and not p2.exists() and not p3.exists()
    info = json.loads((rd.root / "deployment.json").read_text())
    assert info["model"]["name"] == name and info["model"]["path"] == str(path)  # kept exactly


def test_newline_in_run_dir_is_refused(tmp_path: Path) -> None:
    plan = make_plan(settings(), spec(), nodes=2)
    bad = tmp_path / "a\n$(touch x)"
    with pytest.raises(UsageError, match="line break"):
        render_script(plan, RunDir(bad), PYTHON)
    with pytest.raises(UsageError, match="line break"):
        create_run_dir(bad, {}, 1)
    assert not bad.exists()


def test_newline_in_build_settings_is_refused() -> None:
    opts = BuildOptions(prefix=Path("/x\n$(reboot)"), source=Path("/src"))
    with pytest.raises(UsageError, match="line break"):
        render_build_script(template_text(), opts)


def test_build_script_quotes_values_and_passes_bash_n(tmp_path: Path) -> None:
    weird = tmp_path / "we ird $(touch pwn) 'q'"
    opts = BuildOptions(prefix=weird, source=weird / "src", partition="gorgonas")
    script = render_build_script(template_text(), opts)
    path = tmp_path / "b.sbatch"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    # The settings block holds exactly the assignments, and bash reads back the values unchanged.
    block = script.split("# ---- settings")[1].split("# ---- end of settings")[0].split("\n", 1)[1]
    res = subprocess.run(["bash", "-c", block + '\nprintf "%s\\0%s" "$PREFIX" "$SOURCE_DIR"'],
                         capture_output=True, text=True, cwd=tmp_path)
    assert res.stdout.split("\0") == [str(weird), str(weird / "src")]
    assert not (tmp_path / "pwn").exists()
    assert f"#SBATCH --output={weird}" not in script  # quoted in the header too


def test_build_options_are_checked() -> None:
    with pytest.raises(UsageError, match="exactly one of --source"):
        BuildOptions(prefix=Path("/p"))
    with pytest.raises(UsageError, match="exactly one of --source"):
        BuildOptions(prefix=Path("/p"), source=Path("/s"), git_url="https://x")
    with pytest.raises(UsageError, match="--ref goes with --git"):
        BuildOptions(prefix=Path("/p"), source=Path("/s"), git_ref="v1")
    with pytest.raises(UsageError, match="CUDA architecture"):
        BuildOptions(prefix=Path("/p"), source=Path("/s"), cuda_archs="86; rm -rf /")


# ------------------------------------------------------------------------------------------ job ids


def test_job_id_from_env() -> None:
    assert job_id_from_env({"SLURM_JOB_ID": "12"}) == ("12", 0)
    assert job_id_from_env({"SLURM_JOB_ID": "13", "SLURM_ARRAY_JOB_ID": "12", "SLURM_ARRAY_TASK_ID": "1"}) == ("12_1", 1)


def test_record_job_fills_each_replica(tmp_path: Path) -> None:
    (tmp_path / "runs").mkdir(mode=0o700)
    plan = make_plan(settings(), spec(), replicas=2)
    rd = create_run_dir(tmp_path / "runs" / "d", deployment_record(settings(), plan, {}, "d"), plan.replicas)
    record_job(rd.root, "12_1", 1)
    record_job(rd.root, "12_0", 0)
    info = json.loads((rd.root / "deployment.json").read_text())
    assert info["job_ids"] == ["12_0", "12_1"] and info["replicas"] == 2
    with pytest.raises(UsageError, match="already holds a deployment"):
        create_run_dir(rd.root, {}, 1)


# ------------------------------------------------------------------------------------------ templates

TEMPLATES = Path(__file__).resolve().parent.parent / "sbatch_templates"
RPC_TEMPLATES = ["llama-rpc-hetjob.sbatch", "llama-rpc-array.sbatch"]


def _common(name: str) -> str:
    text = (TEMPLATES / name).read_text()
    return text[text.index("# ---- settings"):text.index("# ---- end of common")]


def test_templates_parse_and_share_their_common_part() -> None:
    for name in [*RPC_TEMPLATES, "build-llama.sbatch"]:
        res = subprocess.run(["bash", "-n", str(TEMPLATES / name)], capture_output=True, text=True)
        assert res.returncode == 0, f"{name}: {res.stderr}"
    assert _common(RPC_TEMPLATES[0]) == _common(RPC_TEMPLATES[1]), "edit both templates' common part alike"


def test_template_endpoint_fields_match_the_job_side() -> None:
    text = (TEMPLATES / RPC_TEMPLATES[0]).read_text()
    block = text[text.index('write_atomic "$RUN_DIR/r$REPLICA/endpoint.json"'):]
    block = block[:block.index("\nEOF\n")]
    assert sorted(re.findall(r'^ "(\w+)":', block, re.M)) == sorted(Endpoint(
        job_id="1", url="u", api_key="k", model="m", deployment_id="d", replica=0, leader_node="n", follower_nodes=[],
        rpc_servers=[], llama_version="v", parallel=1, ctx=1, started_at=0, ready_at=0).to_json())


def test_template_json_strings_survive_hostile_text(tmp_path: Path) -> None:
    values = ['plain', 'q"uote', "back\\slash", "new\nline\ttab\rcr", "$(touch pwned) `x`", "ctl\x01\x1fend", "ünï"]
    code = _common(RPC_TEMPLATES[0]) + '\nfor v in "$@"; do json_str "$v"; echo; done\n'
    res = subprocess.run(["bash", "-c", code, "t", *values], capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    decoded = [json.loads(line) for line in res.stdout.splitlines()]
    assert decoded == [v.replace("\x01", "").replace("\x1f", "") for v in values]
    assert not (tmp_path / "pwned").exists()


def test_template_writes_files_atomically_with_mode_0600(tmp_path: Path) -> None:
    code = _common(RPC_TEMPLATES[0]) + '\necho \'{"a": 1}\' | write_atomic "$1/x.json"\n'
    res = subprocess.run(["bash", "-c", code, "t", str(tmp_path)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert json.loads((tmp_path / "x.json").read_text()) == {"a": 1}
    assert oct((tmp_path / "x.json").stat().st_mode & 0o777) == "0o600"
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]  # no temp file left
