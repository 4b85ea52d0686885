"""Shared bits of the command modules: settings from the global flags, JSON output, consoles."""

from __future__ import annotations

import json
import sys
import typing as tp

import click
from rich.console import Console

from ..settings import Settings, load_settings


def settings_from(ctx: click.Context, **flags: tp.Any) -> Settings:
    """Merge every layer once; ``flags`` are dotted keys from the command's own options (None = unset)."""
    obj = ctx.find_root().obj or {}
    return load_settings(profile=obj.get("profile"), config_path=obj.get("config_path"),
                         overrides=obj.get("overrides", ()), cli={k.replace("__", "."): v for k, v in flags.items()})


def print_json(data: tp.Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


def err_console() -> Console:
    return Console(stderr=True, highlight=False, soft_wrap=True)


def out_console() -> Console:
    # Piped output keeps whole lines (ids, URLs) instead of folding them at 80 columns.
    return Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 250)


def is_tty() -> bool:
    return sys.stderr.isatty()


json_option = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON on stdout.")
