"""``speedslurm gateway``: serve the lab's OpenAI endpoint; ``gateway keys``, ``gateway status``, ``gateway usage``."""

from __future__ import annotations

import datetime
import logging
import sys
import typing as tp

import click

from ..api import gateway as api_gateway
from . import cli
from .common import json_option, out_console, print_json, settings_from


class _Gateway(click.Group):
    """``gateway`` serves when no subcommand follows its options."""

    def format_usage(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        formatter.write_usage(ctx.command_path, "--model ALIAS=MODEL [--model ...] [OPTIONS] | keys | status | usage")


@cli.group("gateway", cls=_Gateway, invoke_without_command=True)
@click.option("--listen", metavar="HOST:PORT", default=None,
              help="Where to serve [default: gateway.listen, 127.0.0.1:8800]; 0.0.0.0:PORT for the whole network.")
@click.option("--model", "models", multiple=True, metavar="ALIAS=MODEL",
              help="Serve MODEL (a registry name, a .gguf path or the URL of a running server) as ALIAS: a "
                   "request's \"model\" names the alias (repeatable; adds to gateway.models).")
@click.option("--idle-timeout", default=None, metavar="DURATION",
              help="Stop a replica after no request for this long (90s, 30m, 2h; 0: never) "
                   "[default: gateway.idle_timeout].")
@click.option("--min-replicas", type=click.IntRange(0), default=None,
              help="Replicas each alias keeps when nobody asks [default: gateway.min_replicas].")
@click.option("--max-replicas", type=click.IntRange(1), default=None,
              help="The most replicas of an alias [default: gateway.max_replicas].")
@click.option("--time", "time_limit", default=None, metavar="HH:MM:SS",
              help="Each replica's job time limit [default: cluster.time].")
@click.option("--on-exit", type=click.Choice(["stop", "leave"]), default=None,
              help="On SIGTERM/Ctrl-C: stop the deployments, or leave them for the next start to re-attach "
                   "[default: gateway.on_exit, stop].")
@click.pass_context
def gateway_cmd(ctx: click.Context, listen: str | None, models: tuple[str, ...], idle_timeout: str | None,
                min_replicas: int | None, max_replicas: int | None, time_limit: str | None,
                on_exit: str | None) -> None:
    """One stable OpenAI endpoint for the lab: starts a model's deployment when a request asks for it, shares
    its replicas among users, stops it when nobody asks.

    \b
    Every request needs a key (speedslurm gateway keys add NAME). Then:
      speedslurm gateway --listen 0.0.0.0:8800 --model llama=Q4_K_S
      client = openai.OpenAI(base_url="http://HOST:8800/v1", api_key=KEY); model="llama"
    SIGTERM (systemctl stop) finishes the requests in flight, then stops the deployments (--on-exit leave:
    keeps them; the next start re-attaches, as after a crash).
    """
    if ctx.invoked_subcommand is not None:
        return
    settings = settings_from(ctx, gateway__listen=listen, gateway__idle_timeout=idle_timeout,
                             gateway__min_replicas=min_replicas, gateway__max_replicas=max_replicas,
                             gateway__time=time_limit, gateway__on_exit=on_exit)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)

    def ready(gw: tp.Any) -> None:
        click.echo(f"speedslurm gateway serves {gw.url}/v1 (models: {', '.join(gw.pool.names())}); "
                   f"keys in {gw.folder.root}. Ctrl-C or SIGTERM stops it.", err=True)

    stopped = api_gateway.serve(list(models), listen=listen, settings=settings, on_ready=ready)
    if stopped:
        click.echo(f"Stopped deployment(s): {', '.join(stopped)}", err=True)


@gateway_cmd.group("keys")
def keys_cmd() -> None:
    """The users' keys: add (prints a new key once), list, revoke."""


@keys_cmd.command("add")
@click.argument("name")
@click.pass_context
def keys_add(ctx: click.Context, name: str) -> None:
    """Make a key for NAME and print it (only its hash is kept: copy it now)."""
    key = api_gateway.add_key(name, settings_from(ctx))
    click.echo(key)
    click.echo(f"Key for {name!r} made; give it to them (it is not shown again).", err=True)


@keys_cmd.command("list")
@json_option
@click.pass_context
def keys_list(ctx: click.Context, as_json: bool) -> None:
    """The names that have a key (never the keys)."""
    rows = api_gateway.list_keys(settings_from(ctx))
    if as_json:
        print_json(rows)
        return
    if not rows:
        click.echo("No keys yet: speedslurm gateway keys add NAME")
    for row in rows:
        made = datetime.datetime.fromtimestamp(row["created"]).strftime("%Y-%m-%d %H:%M")
        click.echo(f"{row['name']}\tmade {made}")


@keys_cmd.command("revoke")
@click.argument("name")
@click.pass_context
def keys_revoke(ctx: click.Context, name: str) -> None:
    """Remove NAME's key; a running gateway refuses it from the next request."""
    api_gateway.revoke_key(name, settings_from(ctx))
    click.echo(f"Key of {name!r} revoked.", err=True)


@gateway_cmd.command("status")
@json_option
@click.pass_context
def status_cmd(ctx: click.Context, as_json: bool) -> None:
    """The running gateway's models: state, queue, requests in flight, deployments."""
    data = api_gateway.status(settings_from(ctx))
    if as_json:
        print_json(data)
        return
    from rich.markup import escape
    from rich.table import Table

    out = out_console()
    out.print(f"gateway {data['url']} (pid {data['pid']}, up {data['uptime_s']:.0f} s, "
              f"{data['keys']} key(s), {data['in_flight']} request(s) in flight)")
    table = Table("MODEL", "STATE", "QUEUE", "IN FLIGHT", "REPLICAS", "WHY", box=None)
    for a in data["aliases"]:
        table.add_row(a["alias"], a["state"], str(a["queue"]), str(a["in_flight"]),
                      f"{a['replicas']['ready']} ready / {a['replicas']['live']} live "
                      f"(min {a['replicas']['min']}, max {a['replicas']['max']})", a["why"] or "")
    out.print(table)
    if data.get("keys_problem"):
        out.print(f"[bold]keys:[/] {escape(data['keys_problem'])}")
    deps = Table("MODEL", "DEPLOYMENT", "JOB(S)", "STATE", "IN FLIGHT", "SLOTS", "SERVED", "WHY", box=None)
    for a in data["aliases"]:
        for d in a["deployments"]:
            deps.add_row(a["alias"], d["deployment"] or d["url"] or "-", ",".join(d["job_ids"]) or "-", d["state"],
                         str(d["in_flight"]), str(d["slots"]), str(d["served"]), d["why"] or "")
    if deps.row_count:
        out.print(deps)
    decisions = data.get("decisions") or []
    if decisions:
        out.print("Decisions (latest last):")
        for d in decisions[-10:]:
            when = datetime.datetime.fromtimestamp(d["time"]).strftime("%H:%M:%S")
            figures = ", ".join(f"{k} {v}" for k, v in d.items() if k not in ("time", "decision", "alias", "why"))
            out.print(f"  {when} {d['alias']}: {d['decision']}: {d['why']}{' (' + figures + ')' if figures else ''}")


@gateway_cmd.command("usage")
@json_option
@click.pass_context
def usage_cmd(ctx: click.Context, as_json: bool) -> None:
    """Per key and model: requests, prompt and completion tokens, errors; node-hours per model."""
    data = api_gateway.usage(settings_from(ctx))
    if as_json:
        print_json(data)
        return
    from rich.table import Table

    out = out_console()
    if data.get("saved"):
        out.print("(no gateway runs: the counts its last run saved)")
    keys = Table("KEY", "REQUESTS", "PROMPT TOKENS", "COMPLETION TOKENS", "ERRORS", "NODE-HOURS", box=None)
    for name, row in sorted(data["keys"].items()):
        keys.add_row(name, *(str(int(row[c])) for c in ("requests", "prompt_tokens", "completion_tokens", "errors")),
                     f"{row.get('node_hours', 0.0):.3f}")
    out.print(keys)
    aliases = Table("MODEL", "REQUESTS", "PROMPT TOKENS", "COMPLETION TOKENS", "ERRORS", "NODE-HOURS", box=None)
    for name, row in sorted(data["aliases"].items()):
        aliases.add_row(name, *(str(int(row[c])) for c in ("requests", "prompt_tokens", "completion_tokens",
                                                            "errors")), f"{row['node_hours']:.3f}")
    out.print(aliases)
