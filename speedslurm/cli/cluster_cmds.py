"""Cluster readiness commands: render, build-llama, doctor, models pull."""

from __future__ import annotations

import time
import typing as tp
from pathlib import Path

import click

from .. import api
from . import cli
from .common import err_console, is_tty, json_option, out_console, print_json, settings_from, styled
from .deploy_cmds import models_group

# ----------------------------------------------------------------------------------------------------------
# render


@cli.command("render")
@click.option("--model", "-m", required=True, help="Registry name (see `speedslurm models`) or a .gguf path.")
@click.option("--nodes", type=int, default=None, help="Nodes per replica (default: what the model needs).")
@click.option("--replicas", type=int, default=1, show_default=True, help="Copies of the deployment (a job array).")
@click.option("--ctx", "ctx_size", type=int, default=None, help="Context size (tokens); default: the model's.")
@click.option("--time", "time_limit", default=None, help="Job time limit (Slurm format, e.g. 04:00:00).")
@click.option("-o", "--output", "output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the script here (default: RUN_DIR/job.sbatch, and print it).")
@click.option("--run-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="The run directory to create (default: a new one under run.dir).")
@json_option
@click.pass_context
def render_cmd(ctx: click.Context, model: str, nodes: int | None, replicas: int, ctx_size: int | None,
               time_limit: str | None, output: Path | None, run_dir: Path | None, as_json: bool) -> None:
    """Write the job script `up` would submit, for plain `sbatch`, and the run directory it needs.

    \b
    The script runs the same job side as `up` (python -m speedslurm.node.entry serve RUN_DIR) with the same
    #SBATCH header. Submit it with `sbatch FILE`; then `speedslurm status ID` and
    `speedslurm run --deployment ID` work as for `up`.
    """
    done = api.render(settings_from(ctx), model, nodes=nodes, replicas=replicas, ctx=ctx_size,
                      time_limit=time_limit, output=output, run_dir=run_dir)
    plan, path, script = done.plan, done.script_path, done.script
    if as_json:
        print_json({"deployment": done.deployment_id, "run_dir": str(done.run_dir),
                    "script_path": str(path.absolute()), "script": script,
                    "endpoint_files": [str(p) for p in done.endpoint_files]})
        return
    if output is None:
        click.echo(script)
    con = err_console()
    con.print(f"deployment {done.deployment_id}: {plan.model.name} on {plan.nodes} node(s) x {plan.replicas} "
              f"replica(s) ({plan.layout})", markup=False)
    con.print(f"run directory {done.run_dir}", markup=False)
    con.print(f"script        {path}", markup=False)
    con.print(f"Submit:  sbatch {path}   Then:  speedslurm status {done.deployment_id}", markup=False)


# ----------------------------------------------------------------------------------------------------------
# build-llama


@cli.command("build-llama")
@click.option("--source", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="A llama.cpp source tree the build node can read (shared filesystem).")
@click.option("--git", "git_url", default=None, metavar="URL", help="Clone this repository into PREFIX/src instead.")
@click.option("--ref", "git_ref", default=None, help="Branch, tag or commit of --git.")
@click.option("--prefix", type=click.Path(file_okay=False, path_type=Path), default=Path("~/opt/llama.cpp"),
              show_default=True, help="Install prefix on the shared filesystem; binaries go to PREFIX/bin.")
@click.option("--cuda-archs", default="86;89", show_default=True, help="CMAKE_CUDA_ARCHITECTURES of the CUDA build.")
@click.option("--cpu", is_flag=True, help="Build for the CPU only (GGML_CUDA=OFF).")
@click.option("--cmake-arg", "cmake_args", multiple=True, metavar="ARG",
              help="One more option for cmake's configure step (after speedslurm's own, so it wins); repeat "
                   "it for more. Quote one that holds spaces: --cmake-arg='-DCMAKE_CXX_FLAGS_RELEASE=-O2 -g'.")
@click.option("--partition", default=None, help="Partition to build on and to check (default: cluster.partition).")
@click.option("--cpus", type=int, default=None, help="CPUs for the build job (default: the partition's default).")
@click.option("--time", "time_limit", default="02:00:00", show_default=True, help="Time limit of the build job.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=None, help="Stop following the job after this many seconds.")
@click.option("--no-node-check", is_flag=True, help="Skip running the binaries on every node.")
@click.option("--write-config", is_flag=True, help="Set llama.bin_dir to PREFIX/bin in your user config file.")
@json_option
@click.pass_context
def build_llama_cmd(ctx: click.Context, source: Path | None, git_url: str | None, git_ref: str | None, prefix: Path,
                    cuda_archs: str, cpu: bool, cmake_args: tuple[str, ...], partition: str | None, cpus: int | None, time_limit: str,
                    timeout: float | None, no_node_check: bool, write_config: bool, as_json: bool) -> None:
    """Build llama.cpp (llama-server + RPC server) as a Slurm job into a shared prefix, then check every node.

    \b
    CUDA build for the 4090 (sm_89) and 3090 Ti (sm_86) nodes at once:
      speedslurm build-llama --source ~/src/llama.cpp --prefix ~/opt/llama.cpp
    Afterwards set `llama.bin_dir: PREFIX/bin` (or pass --write-config).

    \b
    A CPU build with debug information (for a backtrace), one argument per --cmake-arg:
      speedslurm build-llama --cpu --source ~/src/llama.cpp \\
        --cmake-arg='-DCMAKE_C_FLAGS_RELEASE=-O2 -g' --cmake-arg='-DCMAKE_CXX_FLAGS_RELEASE=-O2 -g'
    """
    partition = partition or settings_from(ctx).cluster.partition
    opts = api.build_options(prefix=prefix.expanduser().absolute(),
                           source=source.expanduser().absolute() if source else None, git_url=git_url,
                           git_ref=git_ref, cuda=not cpu, cuda_archs=cuda_archs, partition=partition, cpus=cpus,
                           time=time_limit, extra_cmake_args=cmake_args)
    con = err_console()
    quiet = as_json and not is_tty()

    def say(text: str) -> None:
        if not quiet:
            con.print(text, markup=False)

    built = api.build_llama(opts, timeout=timeout, node_check=not no_node_check, write_config=write_config,
                            on_message=say, on_line=lambda line: say(f"  {line}"),
                            on_state=lambda job_id, state, elapsed: say(f"[{elapsed:6.1f}s] job {job_id}: {state}"))
    if as_json:
        print_json({"job_id": built.job_id, "state": built.state, "build_s": round(built.build_s, 1),
                    "log": str(built.log), "prefix": str(opts.prefix), **built.report.to_json(),
                    "config_written": str(built.config_written) if built.config_written else None})
    else:
        _print_build_report(built.report, built.config_written)
    built.check()


def _print_build_report(report: tp.Any, written: Path | None) -> None:
    con = out_console()
    con.print(f"binaries     {report.bin_dir}", markup=False)
    if report.llama_server:
        con.print(f"llama-server {report.llama_server}  version {report.version}", markup=False)
        con.print(f"rpc-server   {report.rpc_server}", markup=False)
        con.print(f"same build   {'yes' if report.same_build else 'NO'} ({report.server_build})", markup=False)
    for problem in report.problems:
        con.print(styled(("FAIL", "red"), f" {problem}"))
    for n in report.nodes:
        mark = ("ok  ", "green") if n.ok else ("FAIL", "red")
        con.print(styled(mark, f" {n.node}: {n.version if n.ok else n.error}"))
    if report.ok:
        if written:
            con.print(f"Wrote llama.bin_dir: {report.bin_dir} to {written}", markup=False)
        else:
            con.print(f"Use it: set `llama.bin_dir: {report.bin_dir}` in your config "
                      f"(or run again with --write-config, or pass --set llama.bin_dir={report.bin_dir})",
                      markup=False)


# ----------------------------------------------------------------------------------------------------------
# doctor


@cli.command("doctor")
@click.option("--no-nodes", is_flag=True, help="Skip the checks that run a task on every node.")
@json_option
@click.pass_context
def doctor_cmd(ctx: click.Context, no_nodes: bool, as_json: bool) -> None:
    """Check that the cluster is ready: Slurm, partition, binaries, run directory, ports, models, munge.

    One pass/fail line per check, with the fix. Exits 0 only when every check passes.
    """
    checks = api.doctor(settings_from(ctx), on_nodes=not no_nodes)
    ok = all(c.ok for c in checks)
    if as_json:
        print_json({"ok": ok, "checks": [c.to_json() for c in checks]})
    else:
        con = out_console()
        for c in checks:
            mark = ("PASS", "green") if c.ok else ("FAIL", "red")
            con.print(styled(mark, f" {c.name}: {c.detail}"))
            if not c.ok and c.fix:
                con.print(f"     fix: {c.fix}", markup=False)
        failed = [c.name for c in checks if not c.ok]
        con.print(f"{len(checks) - len(failed)}/{len(checks)} checks passed"
                  + (f"; failing: {', '.join(failed)}" if failed else ""), markup=False)
    if not ok:
        raise SystemExit(1)


# ----------------------------------------------------------------------------------------------------------
# models pull


@models_group.command("pull")
@click.argument("name")
@click.option("--dir", "dest_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Download into this folder (default: where the registry's `files:` say).")
@click.option("--revision", default=None, help="Branch, tag or commit of the repository (default: main).")
@json_option
@click.pass_context
def models_pull_cmd(ctx: click.Context, name: str, dest_dir: Path | None, revision: str | None,
                    as_json: bool) -> None:
    """Download a registry model's GGUF file(s) from the Hugging Face Hub (resumable; sizes verified).

    \b
    Interrupted? Run the same command again: it resumes. HF_ENDPOINT selects a mirror, HF_TOKEN a token.
    """
    settings = settings_from(ctx)
    con = err_console()
    quiet = as_json and not is_tty()
    started = time.monotonic()

    def on_file(f: tp.Any, state: str) -> None:
        if quiet:
            return
        size = f"{f.size / 1e9:.2f} GB" if f.size else "size unknown"
        if state == "start":
            con.print(f"{f.repo}/{f.remote} ({size}) -> {f.dest}", markup=False)
        elif state == "present":
            con.print("  already present, size verified", markup=False)
        else:
            con.print("  downloaded, size verified", markup=False)

    done = api.pull_model(settings, name, dest_dir.expanduser() if dest_dir else None, revision=revision,
                      progress=not quiet, on_file=on_file)
    if as_json:
        print_json({"model": name, "elapsed_s": round(time.monotonic() - started, 1),
                    "files": [{**f.to_json(), "state": state} for f, state in done]})
        return
    paths = [str(f.dest) for f, _ in done]
    if dest_dir and paths:
        con.print(f"Use it: speedslurm up --model {paths[0]}   (or point models.{name}.files at {dest_dir})",
                  markup=False)
    else:
        con.print(f"Use it: speedslurm up --model {name}", markup=False)
