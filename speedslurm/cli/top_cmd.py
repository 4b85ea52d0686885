"""`speedslurm top`: what a deployment's servers and batches are doing now, refreshed in place."""

from __future__ import annotations

import time
import typing as tp

import click

from .. import api
from . import cli
from .common import json_option, out_console, print_json, settings_from


def _num(value: float | None, fmt: str = "{:.1f}") -> str:
    return "-" if value is None else fmt.format(value)


def replica_load(m: dict[str, tp.Any] | None) -> str:
    """One replica's numbers in a line: slots, waiting requests, tok/s, KV cache."""
    if not m:
        return "-"
    if m.get("error"):
        return f"({m['error']})"
    kv = "-" if m["kv_cache_used"] is None else f"{m['kv_cache_used'] * 100:.0f}%"
    return (f"slots {m['slots_busy'] if m['slots_busy'] is not None else '?'}/{m['slots_total'] or '?'}, "
            f"{m['requests_waiting'] if m['requests_waiting'] is not None else '?'} waiting, "
            f"prompt {_num(m['prompt_tok_s'])} tok/s, gen {_num(m['generation_tok_s'])} tok/s, KV {kv}")


def render_snapshot(snap: dict[str, tp.Any]) -> tp.Any:
    """The view as rich renderables: a header line, a table of replicas, the batches."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    why = f" ({snap['why']})" if snap["why"] else ""
    head = Text(f"deployment {snap['deployment']}  model {snap['model'] or '?'}  {snap['state']}{why}  "
                f"{time.strftime('%H:%M:%S', time.localtime(snap['time']))}")
    table = Table(box=None, pad_edge=False)
    for col in ("REPLICA", "STATE", "JOB", "SLOTS", "WAITING", "PROMPT TOK/S", "GEN TOK/S", "KV CACHE"):
        table.add_column(col)
    for rep in snap["replicas"]:
        m = rep["metrics"] or {}
        if m.get("error") or not m:
            note = m.get("error") or rep["why"] or "-"
            table.add_row(str(rep["replica"]), rep["state"], rep["job_id"] or "-", Text(note), "", "", "", "")
            continue
        kv = "-" if m["kv_cache_used"] is None else f"{m['kv_cache_used'] * 100:.0f}%"
        if m["kv_cache_source"].startswith("slots"):
            kv += " (est.)"
        table.add_row(str(rep["replica"]), rep["state"], rep["job_id"] or "-",
                      f"{m['slots_busy']}/{m['slots_total'] if m['slots_total'] is not None else '?'}",
                      str(m["requests_waiting"] if m["requests_waiting"] is not None else "-"),
                      _num(m["prompt_tok_s"]), _num(m["generation_tok_s"]), kv)
    parts: list[tp.Any] = [head, table]
    if snap["batches"]:
        parts.append(Text("batches:"))
        for b in snap["batches"]:
            pct = 100.0 * b["done"] / b["total"] if b["total"] else 100.0
            parts.append(Text(f"  {b['done']}/{b['total']} done ({pct:.0f}%), {b['failed']} failed, "
                              f"{b['completion_tok_s']:.1f} completion tok/s, {b['status']}  "
                              f"{b['results']}  (pid {b['pid']} on {b['host']})"))
    else:
        parts.append(Text("batches: none running"))
    if snap.get("node_hours") is not None:
        parts.append(Text(f"node-hours so far: {snap['node_hours']:.3f} ({snap.get('node_hours_source', '')})"))
    return Group(*parts)


@cli.command("top")
@click.argument("ident", required=False)
@click.option("--interval", type=click.FloatRange(min=0.2), default=2.0, show_default=True,
              help="Seconds between refreshes (the servers are asked each time; Slurm less often while nothing "
                   "changes).")
@click.option("--count", type=click.IntRange(min=1), default=None,
              help="Stop after this many refreshes (default: until Ctrl-C).")
@json_option
@click.pass_context
def top_cmd(ctx: click.Context, ident: str | None, interval: float, count: int | None, as_json: bool) -> None:
    """Live view of a deployment: per replica slots busy/total, requests waiting, prompt and generation tok/s,
    KV cache use (llama-server's /metrics and /slots), and the batches running against it. Without ID: the only
    running deployment. `--json`: one snapshot."""
    settings = settings_from(ctx)
    dep = api.connect(ident, settings) if ident else api.connect_running(settings)
    probe = api.statuses_probe()

    def look() -> dict[str, tp.Any]:
        return dep.metrics(probe([dep.record])[0])

    if as_json:
        print_json(look())
        return
    con = out_console()
    shown = 0
    # Redrawn in place where the terminal can move the cursor. A dumb one (TERM=dumb: an editor's shell, a CI
    # log) cannot: rich's live display would show nothing there until the end, so it gets one view after another.
    if con.is_terminal and not con.is_dumb_terminal:
        from rich.live import Live

        with Live(render_snapshot(look()), console=con, auto_refresh=False) as live:
            shown = 1
            while count is None or shown < count:
                time.sleep(interval)
                live.update(render_snapshot(look()), refresh=True)
                shown += 1
        return
    while count is None or shown < count:  # not a terminal, or a dumb one: one view after another
        if shown:
            time.sleep(interval)
            con.print()
        con.print(render_snapshot(look()))
        shown += 1
