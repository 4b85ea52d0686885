"""Shared bits of the command modules: settings from the global flags, JSON output, consoles."""

from __future__ import annotations

import json
import shlex
import sys
import typing as tp

import click

if tp.TYPE_CHECKING:
    from rich.console import Console

from ..settings import Settings, load_settings


def settings_from(ctx: click.Context, **flags: tp.Any) -> Settings:
    """Merge every layer once; ``flags`` are dotted keys from the command's own options (None = unset)."""
    obj = ctx.find_root().obj or {}
    return load_settings(profile=obj.get("profile"), config_path=obj.get("config_path"),
                         overrides=obj.get("overrides", ()), cli={k.replace("__", "."): v for k, v in flags.items()})


SECRET_OPTIONS = ("--api-key",)


def resume_command(argv: tp.Sequence[str] | None = None) -> str:
    """The command line that resumes this run, with secrets replaced by ``"$SPEEDSLURM_API_KEY"``: a key given
    on the command line never reaches the terminal, a log or a job's output through a hint."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        return "the same command"
    words: list[str] = []
    hidden = False
    it = iter(args)
    for arg in it:
        name = arg.split("=", 1)[0]
        if name in SECRET_OPTIONS:
            hidden = True
            if "=" not in arg:
                next(it, None)
            words.append(f'{name} "$SPEEDSLURM_API_KEY"')
        else:
            words.append(shlex.quote(arg))
    line = "speedslurm " + " ".join(words)
    return line + (" (the key is not shown: put it in SPEEDSLURM_API_KEY first)" if hidden else "")


def print_json(data: tp.Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


def err_console() -> Console:
    from rich.console import Console  # rich costs ~50 ms: loaded when something is printed, not at start

    return Console(stderr=True, highlight=False, soft_wrap=True)


def out_console() -> Console:
    from rich.console import Console
    # Piped output keeps whole lines (ids, URLs) instead of folding them at 80 columns.
    return Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 250)


def is_tty() -> bool:
    return sys.stderr.isatty()


json_option = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON on stdout.")
