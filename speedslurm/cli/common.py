"""Shared bits of the command modules: settings from the global flags, JSON output, consoles."""

from __future__ import annotations

import json
import math
import shlex
import sys
import typing as tp

import click

if tp.TYPE_CHECKING:
    from rich.console import Console
    from rich.text import Text

    from ..api import Settings


def settings_from(ctx: click.Context, **flags: tp.Any) -> Settings:
    """Merge every layer once; ``flags`` are dotted keys from the command's own options (None = unset)."""
    from .. import api

    obj = ctx.find_root().obj or {}
    return api.load_settings(profile=obj.get("profile"), config=obj.get("config_path"),
                             overrides=obj.get("overrides", ()),
                             flags={k.replace("__", "."): v for k, v in flags.items()})


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


def console(stderr: bool = False, **kw: tp.Any) -> Console:
    """The one kind of console every command prints through: it interprets nothing in what it prints.

    What the user or a model wrote (answers, model names, ``--system`` text, paths, a server's reasons) is printed
    as it is: no console markup (``[/INST]``, ``d[key]``), no emoji codes (``:smile:``), no highlighting. Styling
    is explicit, with :func:`styled` (or rich ``Text``).
    """
    from rich.console import Console  # rich costs ~50 ms: loaded when something is printed, not at start

    return Console(stderr=stderr, markup=False, emoji=False, highlight=False, **kw)


def styled(*parts: str | tuple[str, str]) -> Text:
    """Text from plain strings and (text, style) pairs; no part is read as markup: ``styled(("Notice:", "yellow"),
    " ", notice)``."""
    from rich.text import Text

    return Text.assemble(*parts)


def err_console() -> Console:
    return console(stderr=True, soft_wrap=True)


def out_console() -> Console:
    # Piped output keeps whole lines (ids, URLs) instead of folding them at 80 columns.
    return console(soft_wrap=True, width=None if sys.stdout.isatty() else 250)


class _Finite:
    """Mixed into click's float types: ``nan``, ``inf`` and ``1e999`` are refused like any other bad value."""

    def convert(self, value: tp.Any, param: click.Parameter | None, ctx: click.Context | None) -> tp.Any:
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = 0.0  # not a number at all: the float type says so
        if not math.isfinite(number):  # before a range's check: "-inf is not in the range x>=0" misleads
            self.fail(f"{value!r} is not a finite number.", param, ctx)  # type: ignore[attr-defined]
        return super().convert(value, param, ctx)  # type: ignore[misc]


class FiniteFloat(_Finite, click.types.FloatParamType):
    pass


class FiniteFloatRange(_Finite, click.FloatRange):
    pass


def finite_floats(command: click.Command) -> click.Command:
    """Make every float option and argument of ``command`` (and of its subcommands) refuse nan and infinity."""
    for param in command.params:
        kind = param.type
        if isinstance(kind, _Finite):
            continue
        if isinstance(kind, click.FloatRange):
            param.type = FiniteFloatRange(kind.min, kind.max, kind.min_open, kind.max_open, kind.clamp)
        elif isinstance(kind, click.types.FloatParamType):
            param.type = FiniteFloat()
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            finite_floats(sub)
    return command


def is_tty() -> bool:
    return sys.stderr.isatty()


json_option = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON on stdout.")
