"""`speedslurm render` and the build script renderer: golden files, quoting, hostile paths.

Golden files live in tests/unit/golden/. After an intended change of a rendered script, regenerate them with

    SPEEDSLURM_REGEN_GOLDEN=1 pytest tests/unit/test_render.py

and review the diff.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from repo import REPO

from speedslurm.cluster.registry import get as executor
from speedslurm.deployments.render import (
    create_run_dir,
    deployment_record,
    job_id_from_env,
    record_job,
    render_script,
)
from speedslurm.errors import UsageError
from speedslurm.model.registry import ModelSpec
from speedslurm.ops.buildllama import BuildOptions, render_build_script, template_text
from speedslurm.planning.plan import make_plan
from speedslurm.rundir.layout import RunDir
from speedslurm.settings.settings import ClusterSettings, LlamaSettings, RunSettings, Settings

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
        plan = make_plan(s, spec(host="gorgona1"), nodes=3, runs_on=executor("slurm"))
    elif case == "array":
        plan = make_plan(s, spec(), replicas=2, runs_on=executor("slurm"))
    else:
        plan = make_plan(s, spec(name="small", path="/models/small.gguf", weights=2_000_000_000), runs_on=executor("slurm"))
    assert plan.layout == case
    rd = RunDir(Path(f"/shared/runs/{plan.model.name.lower()}-20260101-000000-abcd"))
    check_golden(f"render-{case}.sbatch", render_script(plan, rd, PYTHON))


def test_render_is_the_up_script_with_another_entry() -> None:
    """Everything but the task command and the job-id line equals what `up` submits."""
    from speedslurm.cluster.script import render_job_script

    plan = make_plan(settings(), spec(), nodes=2, runs_on=executor("slurm"))
    rd = RunDir(Path("/shared/runs/x"))
    ours = render_script(plan, rd, PYTHON).split("\n")
    ups = render_job_script(plan, rd, "ENTRY").split("\n")
    srun = next(i for i, line in enumerate(ours) if line.startswith("srun "))
    assert ours[srun].endswith(f"{PYTHON} -u -m speedslurm.node.entry serve /shared/runs/x")
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
           "FAKE_SRUN_ENV": str(tmp / "env"), "PYTHONPATH": str(REPO),
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
    plan = make_plan(settings(str(root.parent)), spec(), nodes=2, runs_on=executor("slurm"))
    rd = create_run_dir(root, deployment_record(settings(str(root.parent)), plan, {}, root.name), plan.replicas)
    assert oct(rd.root.stat().st_mode & 0o777) == "0o700"
    assert oct((rd.root / "api_key").stat().st_mode & 0o777) == "0o600"
    script = render_script(plan, rd, sys.executable)
    argv, seen = _run_sandboxed(script, tmp_path, {"SLURM_JOB_ID": "42"})
    assert not p1.exists() and not p2.exists()
    assert argv[-6:] == [sys.executable, "-u", "-m", "speedslurm.node.entry", "serve", str(root)]
    assert argv[argv.index("--output") + 1] == str(root / "submitit" / "%j_%t_log.out")
    assert seen == str(root)
    # The job-id line ran with the same run directory.
    assert json.loads((root / "deployment.json").read_text())["job_ids"] == ["42"]


def test_hostile_model_name_and_path(tmp_path: Path) -> None:
    p1, p2, p3 = tmp_path / "pwned1", tmp_path / "pwned2", tmp_path / "pwned3"
    name = f"m\n$(touch {p1.name})\n`touch {p2.name}`'\"x"
    path = tmp_path / f"evil\n$(touch {p3.name}) '.gguf"
    plan = make_plan(settings(), spec(name=name, path=str(path)), nodes=2, runs_on=executor("slurm"))
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
    plan = make_plan(settings(), spec(), nodes=2, runs_on=executor("slurm"))
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


FAKE_CMAKE = r"""#!/bin/bash
# Records each call's arguments, one per line, and fakes a build of the two servers.
printf '%s\n' "$@" >>"$CMAKE_CALLS"; echo "--" >>"$CMAKE_CALLS"
case "$1 $2 $3 $4" in
    *"--target help"*) echo "... llama-server"; echo "... ggml-rpc-server" ;;
    --build*)
        mkdir -p "$2/bin"
        printf '#!/bin/sh\necho "version: 42 (fake)"\n' >"$2/bin/llama-server"
        cp "$2/bin/llama-server" "$2/bin/ggml-rpc-server"; chmod +x "$2/bin/"* ;;
esac
"""


def _run_build_script(tmp_path: Path, opts: BuildOptions) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """Run the rendered build script with a fake cmake; the configure step's arguments."""
    fake = tmp_path / "fakebin"
    fake.mkdir()
    (fake / "cmake").write_text(FAKE_CMAKE)
    (fake / "cmake").chmod(0o755)
    script = tmp_path / "build.sbatch"
    script.write_text(render_build_script(template_text(), opts))
    calls = tmp_path / "calls"
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "CMAKE_CALLS": str(calls), "SLURM_CPUS_PER_TASK": "1"}
    res = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env, cwd=tmp_path)
    configure = calls.read_text().split("--\n")[0].splitlines() if calls.exists() else []
    return res, configure


def test_cmake_args_reach_cmake_one_argument_each(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "CMakeLists.txt").write_text("")
    extra = ("-DGGML_NATIVE=OFF", "-DCMAKE_CXX_FLAGS_RELEASE=-O2 -g", "-DNAME=it's \"$(touch pwn)\" *")
    opts = BuildOptions(prefix=tmp_path / "prefix", source=src, cuda=False, extra_cmake_args=extra)
    res, configure = _run_build_script(tmp_path, opts)
    assert res.returncode == 0, res.stderr
    # After speedslurm's own options (so a user's option wins), unchanged, spaces and quotes kept.
    assert configure[:3] == ["-S", str(src), "-B"] and "-DGGML_CUDA=OFF" in configure
    assert tuple(configure[-3:]) == extra
    assert not (tmp_path / "pwn").exists()
    assert (tmp_path / "prefix" / "BUILD-INFO").read_text().startswith("version: 42 (fake)")
    # Without --cmake-arg the configure step gets nothing more.
    opts = BuildOptions(prefix=tmp_path / "p2", source=src, cuda=False)
    (tmp_path / "calls").unlink()
    (tmp_path / "fakebin" / "cmake").unlink()
    (tmp_path / "fakebin").rmdir()
    res, configure = _run_build_script(tmp_path, opts)
    assert res.returncode == 0, res.stderr
    assert configure[-1] == "-DGGML_CUDA=OFF"


def test_cmake_args_from_the_command_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    from speedslurm import api
    from speedslurm.cli import main

    src = tmp_path / "src"
    seen: list[BuildOptions] = []

    def fake_build(options: BuildOptions, **kw: object) -> None:
        seen.append(options)
        raise SystemExit(3)

    monkeypatch.setattr(api, "build_llama", fake_build)
    with pytest.raises(SystemExit):
        main(["build-llama", "--cpu", "--source", str(src), "--partition", "p", "--cmake-arg=-DGGML_NATIVE=OFF",
              "--cmake-arg", "-DCMAKE_C_FLAGS_RELEASE=-O0 -g"])
    assert seen[0].extra_cmake_args == ("-DGGML_NATIVE=OFF", "-DCMAKE_C_FLAGS_RELEASE=-O0 -g")
    for bad, problem in [("-DX=a\tb", "control character"), ("-DX=a\nb", "control character"),
                         ("GGML_NATIVE=OFF", "not a cmake option")]:
        with pytest.raises(SystemExit) as exc:
            main(["build-llama", "--cpu", "--source", str(src), "--partition", "p", "--cmake-arg", bad])
        assert exc.value.code != 0
        err = capsys.readouterr().err
        assert problem in err and "--cmake-arg" in err, err
    assert len(seen) == 1  # nothing submitted for a bad argument
    with pytest.raises(UsageError, match="not a list"):
        BuildOptions(prefix=Path("/p"), source=Path("/s"), extra_cmake_args="-DA=1 -DB=2")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------ job ids


def test_job_id_from_env() -> None:
    assert job_id_from_env({"SLURM_JOB_ID": "12"}) == ("12", 0)
    assert job_id_from_env({"SLURM_JOB_ID": "13", "SLURM_ARRAY_JOB_ID": "12", "SLURM_ARRAY_TASK_ID": "1"}) == ("12_1", 1)


def test_record_job_fills_each_replica(tmp_path: Path) -> None:
    (tmp_path / "runs").mkdir(mode=0o700)
    plan = make_plan(settings(), spec(), replicas=2, runs_on=executor("slurm"))
    rd = create_run_dir(tmp_path / "runs" / "d", deployment_record(settings(), plan, {}, "d"), plan.replicas)
    record_job(rd.root, "12_1", 1)
    record_job(rd.root, "12_0", 0)
    info = json.loads((rd.root / "deployment.json").read_text())
    assert info["job_ids"] == ["12_0", "12_1"] and info["replicas"] == 2
    with pytest.raises(UsageError, match="already holds a deployment"):
        create_run_dir(rd.root, {}, 1)


# ------------------------------------------------------------------------------------------ templates

TEMPLATES = REPO / "sbatch_templates"
RPC_TEMPLATES = ["llama-rpc-hetjob.sbatch", "llama-rpc-array.sbatch"]


def _common(name: str) -> str:
    text = (TEMPLATES / name).read_text()
    return text[text.index("# ---- settings"):text.index("# ---- end of common")]


def test_templates_parse_and_run_one_job_side_with_one_body() -> None:
    for name in [*RPC_TEMPLATES, "build-llama.sbatch"]:
        res = subprocess.run(["bash", "-n", str(TEMPLATES / name)], capture_output=True, text=True)
        assert res.returncode == 0, f"{name}: {res.stderr}"
    assert _common(RPC_TEMPLATES[0]) == _common(RPC_TEMPLATES[1]), "hetjob and array share one body"
    for name in RPC_TEMPLATES:  # no handshake logic in bash: the job side does it
        text = (TEMPLATES / name).read_text()
        body = text[text.index("# ---- common"):]
        assert "speedslurm-node.pyz" in text and "exec " in body
        for protocol in ("endpoint.json", "failed.json", "json_str", "write_atomic", "-H \"$addr", "--kv-unified",
                         "sha256", "/health"):
            assert protocol not in body, (name, protocol)


@pytest.mark.parametrize("name, shape", [("llama-rpc-hetjob.sbatch", "hetjob"), ("llama-rpc-array.sbatch", "array")])
def test_template_settings_map_to_the_job_sides_arguments(tmp_path: Path, name: str, shape: str) -> None:
    from speedslurm.node.template import parser
    from speedslurm.ops.nodepyz import build

    pyz = build(tmp_path)
    args_file = tmp_path / "args"
    fake_python = tmp_path / "python"  # records its arguments, one per line
    fake_python.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {args_file}\n')
    fake_python.chmod(0o755)
    env = {"PATH": "/usr/bin:/bin", "SLURM_JOB_ID": "5", "PYTHON": str(fake_python), "SPEEDSLURM_NODE": str(pyz),
           "MODEL": "/m/a b.gguf", "THREADS": "2", "CTX": "1024", "EXTRA_SERVER_ARGS": "--foo 'x y'"}
    res = subprocess.run(["bash", str(TEMPLATES / name)], capture_output=True, text=True, env=env, timeout=30)
    assert res.returncode == 0, res.stderr
    words = args_file.read_text().split("\n")[:-1]
    assert words[:3] == [str(pyz), "template", shape]
    args = parser().parse_args(words[2:])
    assert (args.shape, args.model, args.threads, args.ctx, args.parallel, args.rpc_cache, args.bin_dir) == \
        (shape, "/m/a b.gguf", 2, 1024, 4, 1, "")
    assert shlex.split(args.extra_server_args) == ["--foo", "x y"]


def test_a_template_without_the_job_side_beside_it_says_how_to_get_it(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "SLURM_JOB_ID": "5", "SLURM_SUBMIT_DIR": str(tmp_path), "MODEL": "/m.gguf"}
    res = subprocess.run(["bash", str(TEMPLATES / RPC_TEMPLATES[0])], capture_output=True, text=True, env=env,
                         timeout=30)
    assert res.returncode == 2
    assert "speedslurm-node.pyz not found" in res.stderr and "speedslurm templates DIR" in res.stderr


def test_the_node_archive_runs_alone_and_imports_no_front_end_library(tmp_path: Path) -> None:
    """speedslurm-node.pyz carries the whole job side: it runs with no speedslurm installed (-I -S: no
    site-packages, no current folder) and loads only its own modules and the standard library."""
    from speedslurm.ops.nodepyz import build

    pyz = build(tmp_path)
    with zipfile.ZipFile(pyz) as zf:
        names = [n for n in zf.namelist() if not n.endswith("/")]  # files, not folder entries
    outside = [n for n in names if not n.startswith(("speedslurm/node/", "speedslurm/rundir/"))
               and n not in ("__main__.py", "speedslurm/__init__.py", "speedslurm/errors.py")]
    assert outside == [] and "speedslurm/node/entry.py" in names and "speedslurm/rundir/records.py" in names
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import speedslurm.node.entry, speedslurm.node.roles, "
            "speedslurm.node.template, speedslurm.node.net; print(speedslurm.__file__); "
            "print(sorted(m for m in ('submitit', 'click', 'yaml', 'openai') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-I", "-S", "-c", code, str(pyz)], capture_output=True, text=True,
                         cwd=tmp_path, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split("\n")[:2] == [str(pyz / "speedslurm" / "__init__.py"), "[]"]
    res = subprocess.run([sys.executable, "-I", "-S", str(pyz), "--help"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "template hetjob|array" in res.stderr
