"""``speedslurm show``: read a results file as a person would: one answer per prompt."""

from __future__ import annotations

import typing as tp
from pathlib import Path

import click

from .. import api
from ..errors import UsageError
from . import cli
from .common import out_console, print_json, styled


def answer_text(record: dict[str, tp.Any]) -> str:
    """The generated text of one OpenAI Batch output line (chat or completion), or its error; a line of another
    shape (a file written by something else) gives what it has, never an exception."""
    err = record.get("error")
    if err:
        return f"[error {err.get('code')}] {err.get('message')}" if isinstance(err, dict) else f"[error] {err}"
    resp = record.get("response")
    body = resp.get("body") if isinstance(resp, dict) else None
    choices = body.get("choices") if isinstance(body, dict) else None
    choice = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else {}
    message = choice.get("message")
    if isinstance(message, dict) and message:
        return str(message.get("content"))
    return str(choice.get("text", ""))


@cli.command("show")
@click.argument("results", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-n", "--limit", type=click.IntRange(min=0), default=None, help="Show at most this many answers.")
@click.option("--id", "ids", multiple=True, help="Only these custom_ids (repeatable).")
@click.option("--width", type=click.IntRange(min=20), default=400, show_default=True,
              help="Cut each answer after this many characters.")
@click.option("--json", "as_json", is_flag=True, help="Print {custom_id: answer} as JSON.")
def show_cmd(results: Path, limit: int | None, ids: tuple[str, ...], width: int, as_json: bool) -> None:
    """Print the answers in a results file (the final line of each custom_id)."""
    if not results.exists():
        raise UsageError(f"results file {results} does not exist",
                         fix="pass the --out file of `speedslurm run`/`submit` (default <prompts>.results.jsonl)")
    view = api.read_results(results)
    items = [(cid, rec) for cid, rec in view.items() if not ids or cid in ids]
    if limit is not None:
        items = items[:limit]
    if as_json:
        print_json({cid: answer_text(rec) for cid, rec in items})
        return
    con = out_console()
    for cid, rec in items:
        text = " ".join(answer_text(rec).split())
        if len(text) > width:
            text = text[: width - 1] + "…"
        con.print(styled((cid, "bold"), f": {text}"))  # the model's text as it is, never markup
    shown = len(items)
    con.print(styled((f"{shown} of {len(view)} result(s) in {results}", "dim")))


__all__ = ["show_cmd", "answer_text"]
