"""Deployment commands: config, models, plan, up, status, endpoint, logs, down."""

from __future__ import annotations

import functools
import shlex
import time
import typing as tp

import click

from .. import api
from . import cli
from .common import err_console, is_tty, json_option, out_console, print_json, settings_from, styled

if tp.TYPE_CHECKING:
    from ..api import ReplicaStatus

# ----------------------------------------------------------------------------------------------------------
# config / models / plan


@cli.group("config")
def config_group() -> None:
    """Inspect the merged settings."""


@config_group.command("show")
@json_option
@click.pass_context
def config_show(ctx: click.Context, as_json: bool) -> None:
    """Print the merged settings and where each value came from."""
    settings = settings_from(ctx)
    rows = api.describe_settings(settings)
    if as_json:
        print_json({"settings": settings.to_dict(), "origins": {k: o for k, _v, o in rows}})
        return
    con = out_console()
    width = max(len(k) for k, _v, _o in rows)
    for key, value, origin in rows:
        con.print(styled(f"{key:<{width}}  {value!r:<40}  ", (origin, "dim")))


@cli.group("models", invoke_without_command=True)
@json_option
@click.pass_context
def models_group(ctx: click.Context, as_json: bool) -> None:
    """List the model registry: name, files, size on disk, nodes needed at the default context."""
    if ctx.invoked_subcommand is not None:
        return
    rows = api.models(settings_from(ctx))
    if as_json:
        print_json(rows)
        return
    con = out_console()
    for row in rows:
        size = f"{row['size_bytes'] / 1e9:.1f} GB" if row["size_bytes"] else "?"
        where = "present" if row["present"] else (f"on {row['host']}" if row["host"] else "MISSING")
        nodes = row["nodes"] if row["nodes"] is not None else "-"
        con.print(styled((row["name"], "bold"), f"  {size}  {nodes} node(s) at ctx {row['ctx']}  ({where})"))
        if row.get("description"):
            con.print(f"  {row['description']}")
        for f in row["files"]:
            con.print(f"  {f}")
        if row.get("problem"):
            con.print(styled("  ", (row["problem"], "red")))


def idle_timeout_option(f: tp.Callable[..., tp.Any]) -> tp.Callable[..., tp.Any]:
    return click.option("--idle-timeout", default=None, metavar="DURATION",
                        help="End the job (free its nodes) after llama-server had no request for this long: 90s, "
                             "30m, 2h; 0 = never [default: llama.idle_timeout].")(f)


def _model_options(f: tp.Callable[..., tp.Any]) -> tp.Callable[..., tp.Any]:
    f = click.option("--time", "time_limit", default=None, help="Job time limit (Slurm format, e.g. 04:00:00).")(f)
    f = click.option("--ctx", "ctx_size", type=int, default=None, help="Context size (tokens); default: the model's.")(f)
    f = click.option("--replicas", type=int, default=1, show_default=True,
                     help="Independent copies of the deployment (a job array).")(f)
    f = click.option("--nodes", type=int, default=None, help="Nodes per replica (default: what the model needs).")(f)
    f = click.option("--executor", type=click.Choice([*api.executor_names(), "auto"]), default=None,
                     help="slurm, or local processes on 127.0.0.1 (default: slurm when sbatch exists).")(f)
    f = click.option("--model", "-m", required=True, help="Registry name (see `speedslurm models`) or a .gguf path.")(f)
    return f


@cli.command("plan")
@_model_options
@json_option
@click.pass_context
def plan_cmd(ctx: click.Context, model: str, executor: str | None, nodes: int | None, replicas: int,
             ctx_size: int | None, time_limit: str | None, as_json: bool) -> None:
    """Print the plan and the exact job it would submit; submits nothing."""
    planned = api.plan(settings_from(ctx), model, nodes=nodes, replicas=replicas, ctx=ctx_size,
                       time_limit=time_limit, executor=executor)
    plan, script, binaries = planned.plan, planned.script, planned.binaries
    if as_json:
        bins = ({"llama_server": str(binaries.llama_server), "rpc_server": str(binaries.rpc_server)}
                if binaries else None)
        print_json({"plan": plan.to_json(), "job_script": script, "binaries": bins})
        return
    con = out_console()
    for line in planned.describe():
        con.print(line, markup=False)
    if script:
        con.print(styled("\n", ("job script", "bold"), " (submitted through submitit by `speedslurm up`):"))
        con.print(script, markup=False)
    else:
        con.print(f"\nexecutor local: {plan.nodes} process(es) on 127.0.0.1 per replica")
    if binaries is None:
        con.print(styled(("warning: llama.cpp binaries not found; `up` would stop here "
                          "(set llama.bin_dir or run `make install`)", "yellow")))


# ----------------------------------------------------------------------------------------------------------
# up


def _progress_printer(as_json: bool) -> tp.Callable[[list[ReplicaStatus], float], None]:
    con = functools.cache(err_console)  # made at the first line printed: `up --json` on a pipe prints none
    last: dict[int, str] = {}

    def show(statuses: list[ReplicaStatus], elapsed: float) -> None:
        if as_json and not is_tty():
            return
        for s in statuses:
            state = s.state
            if state == "STARTING":
                state = "RUNNING"  # the job runs; rpc-servers are starting
            if last.get(s.replica) != state:
                last[s.replica] = state
                where = f" on {s.nodes}" if s.nodes and state != "PENDING" else ""
                why = f" ({s.reason})" if state == "PENDING" and s.reason and s.reason != "None" else ""
                con().print(f"[{elapsed:6.1f}s] replica {s.replica} job {s.job_id}: {state}{where}{why}")

    return show


def do_up(ctx: click.Context, model: str, *, executor: str | None, nodes: int | None, replicas: int,
          ctx_size: int | None, time_limit: str | None, timeout: float | None, until: str,
          as_json: bool, keep_on_interrupt: bool = False,
          idle_timeout: str | None = None) -> tuple[api.Deployment, list[ReplicaStatus]]:
    """:func:`speedslurm.api.up` with the global flags' settings, its progress and messages on stderr."""
    con = functools.cache(err_console)

    def say(text: str) -> None:
        # Interruptions are always told; the start line only where it does not mix with JSON on a pipe.
        if text.startswith("Interrupted") or not as_json or is_tty():
            con().print(text, markup=False)

    return api.up(model, nodes=nodes, replicas=replicas, ctx=ctx_size, time_limit=time_limit, executor=executor,
                  timeout=timeout, until=until, settings=settings_from(ctx, llama__idle_timeout=idle_timeout),
                  on_update=_progress_printer(as_json),
                  on_message=say, keep_on_interrupt=keep_on_interrupt)


@cli.command("up")
@_model_options
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Give up (and cancel) when not ready after this many seconds; default: wait while the job waits.")
@idle_timeout_option
@json_option
@click.pass_context
def up_cmd(ctx: click.Context, model: str, executor: str | None, nodes: int | None, replicas: int,
           ctx_size: int | None, time_limit: str | None, timeout: float | None, idle_timeout: str | None,
           as_json: bool) -> None:
    """Start a deployment, wait until it is READY, print its endpoint(s), leave it running."""
    dep, statuses = do_up(ctx, model, executor=executor, nodes=nodes, replicas=replicas, ctx_size=ctx_size,
                          time_limit=time_limit, timeout=timeout, until="all", as_json=as_json,
                          idle_timeout=idle_timeout)
    if as_json:
        print_json({"deployment": dep.id, "replicas": [s.to_json() for s in statuses]})
        return
    con = out_console()
    for s in statuses:
        ep = s.endpoint
        if ep:
            con.print(f"replica {s.replica}: READY {ep.openai_base_url}  (leader {ep.leader_node}, "
                      f"followers {', '.join(ep.follower_nodes) or '-'}, "
                      f"ready in {ep.ready_at - dep.record.info['created_at']:.1f}s)")
    con.print(f"Use it:  eval \"$(speedslurm endpoint {dep.id} --env)\"   Stop it:  speedslurm down {dep.id}")


# ----------------------------------------------------------------------------------------------------------
# status / endpoint / logs / down


def _age(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"


@cli.command("status")
@click.argument("ident", required=False)
@click.option("--watch", is_flag=True, help="Refresh every --interval seconds until Ctrl-C, with each ready replica's "
              "load (Slurm is asked less often while nothing changes).")
@click.option("--interval", type=click.FloatRange(min=0.2), default=2.0, show_default=True,
              help="Seconds between refreshes with --watch.")
@click.option("--count", type=click.IntRange(min=1), default=None, help="With --watch: stop after this many refreshes.")
@click.option("--all", "show_all", is_flag=True, help="Include deployments that ended over a day ago.")
@json_option
@click.pass_context
def status_cmd(ctx: click.Context, ident: str | None, watch: bool, interval: float, count: int | None,
               show_all: bool, as_json: bool) -> None:
    """Deployments with job id(s), model, nodes, state, endpoint and age (from run dirs and squeue/sacct)."""
    settings = settings_from(ctx)
    if not watch:
        rows = api.status_rows(settings, ident, show_all)
        print_json(rows) if as_json else _print_status(rows)
        return
    probe = api.statuses_probe()
    shown = 0
    while count is None or shown < count:
        if shown:
            time.sleep(interval)
            if not as_json and is_tty():
                click.clear()
        rows = api.status_rows(settings, ident, show_all, probe=probe, with_metrics=True)
        print_json(rows) if as_json else _print_status(rows)
        shown += 1


def _print_status(rows: list[dict[str, tp.Any]]) -> None:
    from rich.table import Table
    from rich.text import Text

    con = out_console()
    if not rows:
        con.print("No deployments. Start one with `speedslurm up --model NAME`.")
        return
    table = Table(box=None, pad_edge=False)
    for col in ("DEPLOYMENT", "MODEL", "STATE", "JOB", "NODES", "ENDPOINT", "AGE", "NODE-H", "WHY"):
        table.add_column(col)
    colors = {"READY": "green", "FAILED": "red", "ENDED": "dim", "LOADING": "yellow", "STARTING": "yellow",
              "UNSUBMITTED": "yellow"}
    for row in rows:
        for rep in row["replicas"]:
            state = rep["state"]
            ep = rep["endpoint"]["url"] + "/v1" if rep["endpoint"] and state == "READY" else "-"
            nodes = rep["nodes"] or str(row["nodes"])
            table.add_row(row["id"] if rep["replica"] == 0 else f"  replica {rep['replica']}", row["model"] or "?",
                          Text(state, style=colors.get(state, "white")), rep["job_id"] or "-", nodes, ep,
                          _age(row["age_s"]), _node_hours(rep), Text(rep["why"] or "-"))
            if rep.get("metrics"):
                from .top_cmd import replica_load

                table.add_row("", "", "", "", "", Text(replica_load(rep["metrics"])), "", "", "")
    con.print(table)
    walls = any(rep["node_hours_source"] == "client wall time" and rep["node_hours"]
                for row in rows for rep in row["replicas"])
    con.print(styled(("NODE-H: node-hours held, from Slurm's figures"
                      f"{'; * from the wall time the client saw (Slurm gave none)' if walls else ''}"
                      f"{'; GPU-hours in --json' if any(r['gpu_hours'] for r in rows) else ''}", "dim")))


def _node_hours(rep: dict[str, tp.Any]) -> str:
    if not rep["node_hours"] and rep["node_hours_source"] == "client wall time":
        return "-"  # never held a node, as far as anyone knows
    text = f"{rep['node_hours']:.3f}"
    return text + "*" if rep["node_hours_source"] == "client wall time" else text


@cli.command("endpoint")
@click.argument("ident")
@click.option("--env", "as_env", is_flag=True, help="Print `export OPENAI_BASE_URL=... OPENAI_API_KEY=...` lines.")
@click.option("--show-key", is_flag=True, help="Include the API key in the output.")
@click.option("--replica", type=click.IntRange(0), default=None, help="Which replica (default: the first ready one).")
@json_option
@click.pass_context
def endpoint_cmd(ctx: click.Context, ident: str, as_env: bool, show_key: bool, replica: int | None,
                 as_json: bool) -> None:
    """Print a deployment's endpoint; `--env` gives shell exports for the openai client."""
    dep = api.connect(ident, settings_from(ctx))
    if as_env:
        ep = dep.endpoint(replica)
        click.echo(f"export OPENAI_BASE_URL={shlex.quote(ep.openai_base_url)}")
        click.echo(f"export OPENAI_API_KEY={shlex.quote(ep.api_key)}")
        return
    dep.endpoint(replica)  # none ready: the error names the state and why
    eps = [e.public(show_key) for e in dep.endpoints() if replica is None or e.replica == replica]
    if as_json:
        print_json(eps)
        return
    for e in eps:
        click.echo(f"replica {e['replica']}: {e['url']}/v1  model {e['model']}  api key {e['api_key']}")


@cli.command("logs")
@click.argument("ident")
@click.option("--role", type=click.Choice(["leader", "follower", "all"]), default="all", show_default=True)
@click.option("--replica", type=click.IntRange(0), default=None, help="Which replica (default: all).")
@click.option("-n", "--lines", type=click.IntRange(0), default=50, show_default=True, help="Lines from the end of each log.")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines until Ctrl-C.")
@click.pass_context
def logs_cmd(ctx: click.Context, ident: str, role: str, replica: int | None, lines: int, follow: bool) -> None:
    """Print the logs of a deployment's llama-server (leader) and rpc-servers (followers)."""
    found = api.logs(settings_from(ctx), ident, role, replica)
    files = found.files
    if not files:
        click.echo(f"No logs yet in {found.root} (state: {found.state()}).")
        return
    for path in files:
        click.echo(f"==> {path.relative_to(found.root)} <==")
        click.echo(api.log_tail(path, lines))
    if follow:
        sizes = {p: p.stat().st_size for p in files}
        while True:
            time.sleep(0.5)
            for path in files:
                size = path.stat().st_size
                if size > sizes[path]:
                    with open(path, "rb") as fh:
                        fh.seek(sizes[path])
                        click.echo(fh.read().decode("utf-8", "replace"), nl=False)
                    sizes[path] = size


@cli.command("down")
@click.argument("ident")
@json_option
@click.pass_context
def down_cmd(ctx: click.Context, ident: str, as_json: bool) -> None:
    """Cancel a deployment's job(s) and report what ended."""
    dep = api.connect(ident, settings_from(ctx))
    before = dep.record.info.get("cancelled_at")
    try:
        stopped = dep.stop(wait=30)
    except KeyboardInterrupt:
        # Ctrl-C (SIGTERM, SIGHUP) during the clean-up: the cancel was issued all the same; only the wait for
        # the jobs to end, and its report, are skipped.
        if dep.record.info.get("cancelled_at") != before:
            click.echo(f"Interrupted: deployment {dep.id}: cancelled job(s) {', '.join(dep.job_ids)}; did not wait "
                       f"for them to end (`speedslurm status {dep.id}` shows it).", err=True)
            raise SystemExit(130) from None
        raise
    if as_json:
        print_json({"deployment": stopped.deployment, "cancelled": stopped.cancelled, "state": stopped.state,
                    "why": stopped.why})
        return
    if stopped.state == "UNSUBMITTED" and not stopped.cancelled:
        click.echo(f"deployment {stopped.deployment}: nothing to cancel; state UNSUBMITTED ({stopped.why})")
        return
    done = (f"cancelled job(s) {', '.join(stopped.cancelled)}" if stopped.cancelled
            else f"job(s) {', '.join(stopped.ended_before) or '-'} had ended already")
    why = f" ({stopped.why})" if stopped.why else ""
    click.echo(f"deployment {stopped.deployment}: {done}; state {stopped.state}{why}")
