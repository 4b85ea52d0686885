"""Extra sbatch options (the ``cluster.sbatch`` setting): checked against Slurm's option list, rendered as lines.

A cluster profile or a user's config may add options such as ``constraint``, ``reservation`` or
``mail-type`` to every job speedslurm submits. Names are sbatch's long options, with ``-`` or ``_``
(``mail-type`` = ``mail_type``; one-letter aliases such as ``C`` work too), checked against the table of
sbatch options that simple-slurm ships; a value of ``true`` is a bare flag (``exclusive: true``), and
``false`` or ``null`` leaves the option out (so a later layer can drop one a profile set).

Options that speedslurm sets itself (partition, time, nodes, output, ...) are refused with the setting that
controls them, and so are values with a line break or another control character: in an ``#SBATCH`` line
it would end the comment and start a shell line.

Checked when the plan is made, so a bad option stops ``plan``, ``up``, ``submit`` and ``render`` before
anything is submitted; :mod:`speedslurm.cluster.script` renders the options into the one job script.
"""

from __future__ import annotations

import difflib
import functools
import re
import shlex
import typing as tp

from ..errors import ConfigError

SETTING = "cluster.sbatch"
# The one guard against control characters: a line break (or any C0 control, DEL) in a value that reaches a job
# script would end its line there, and the rest would run as an option or as shell.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def has_control(text: str) -> bool:
    """Whether ``text`` holds a line break or another control character (C0 or DEL)."""
    return _CONTROL.search(text) is not None


def one_line(text: str) -> str:
    """``text`` with each control character replaced by ``?``: safe on one line of a job script."""
    return _CONTROL.sub("?", text)

# Options speedslurm renders itself (or that change how sbatch runs), with what to use instead.
MANAGED: dict[str, str] = {
    "partition": "set cluster.partition",
    "account": "set cluster.account",
    "qos": "set cluster.qos",
    "gres": "set cluster.gres_per_node",
    "time": "set cluster.time, or pass --time",
    "exclude": "set cluster.exclude",
    "mem": "set cluster.mem_per_node",
    "cpus_per_task": "set cluster.cpus_per_node",
    "nodes": "pass --nodes",
    "ntasks": "pass --nodes (speedslurm runs one task per node)",
    "ntasks_per_node": "pass --nodes (speedslurm runs one task per node)",
    "array": "pass --replicas",
    "nodelist": "name the node in the model's `host:` registry entry",
    "nodefile": "name the node in the model's `host:` registry entry",
    "job_name": "leave it out: speedslurm names the job after the model",
    "output": "leave it out: `speedslurm logs` and failure reports read the job's own log files",
    "error": "leave it out: `speedslurm logs` and failure reports read the job's own log files",
    "open_mode": "leave it out: `speedslurm logs` and failure reports read the job's own log files",
    "signal": "leave it out: the job side stops cleanly on the warning signal speedslurm asks for",
    "wrap": "leave it out: the job script is speedslurm's",
    "parsable": "leave it out: speedslurm reads sbatch's answer itself",
    "test_only": "use `speedslurm plan` to see the job without submitting it",
    "wait": "leave it out: `speedslurm up` waits for the deployment itself",
}

Value = str | bool  # a value, or True for a bare flag


@functools.lru_cache(maxsize=1)
def _table() -> tuple[tuple[str, ...], dict[str, str]]:
    """(long option names, one-letter alias -> long name) from simple-slurm's table of sbatch options.

    simple-slurm builds its argument parser from ``arguments.txt`` (one option a line: the long name with
    ``_`` for ``-``, then its one-letter alias if any) through ``simple_slurm.core.read_simple_txt``; that
    reader is its only way to the table, so this is the one place that touches it (tests/unit/test_sbatchopts.py
    fails loudly if it changes, and pyproject.toml pins simple-slurm below 0.4).
    """
    from simple_slurm.core import read_simple_txt

    names: list[str] = []
    short: dict[str, str] = {}
    for row in read_simple_txt("arguments.txt"):
        row = [cell for cell in row if cell]
        if not row:
            continue
        names.append(row[0])
        for alias in row[1:]:
            short[alias] = row[0]
    return tuple(names), short


def option_names() -> tuple[str, ...]:
    """sbatch's long option names as simple-slurm knows them, with ``_`` for ``-`` (``mail_type``)."""
    return _table()[0]


def flag(name: str) -> str:
    """``mail_type`` -> ``mail-type``: how sbatch spells the option."""
    return name.replace("_", "-")


def _canonical(key: str, source: str) -> str:
    names, short = _table()
    name = key.strip().lstrip("-")
    if name in short:
        name = short[name]
    name = name.replace("-", "_")
    if name in names:
        return name
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    hint = (f"did you mean {' or '.join(flag(c) for c in close)}? " if close else "")
    raise ConfigError(f"{source}: unknown sbatch option '{key}' in {SETTING}",
                      fix=f"{hint}{SETTING} takes sbatch's long options (see `man sbatch`), e.g. "
                          f"constraint, reservation, mail-type, comment")


def check_value(name: str, value: tp.Any, source: str = "settings") -> Value:
    """The value of option ``name`` as rendered: a string, or True for a bare flag. Refuses control characters."""
    if isinstance(value, bool):
        return value
    if not isinstance(value, (str, int, float)):
        raise ConfigError(f"{source}: {SETTING}.{flag(name)} must be a string, a number or true/false, "
                          f"not {value!r}",
                          fix=f"write it as sbatch takes it, e.g. {flag(name)}: \"a,b\"")
    return refuse_control(f"{SETTING}.{flag(name)}", str(value), source)


def refuse_control(setting: str, value: str, source: str | None = None) -> str:
    """``value`` of ``setting``, or :class:`ConfigError` (exit 2) if it holds a line break or another control
    character: every value that reaches the job script passes here (an ``#SBATCH`` line, a quoted shell word
    alike, a line break ends the line and the next one runs as shell). ``source`` names where it was set."""
    if has_control(value):
        raise ConfigError(f"{source + ': ' if source else ''}{setting} = {value!r} contains a line break or "
                          "another control character, which would start a new line of the job script",
                          fix=f"write {setting} on one line, without control characters")
    return value


def sbatch_options(options: tp.Mapping[str, tp.Any], origins: tp.Mapping[str, str] | None = None
                   ) -> tuple[tuple[str, Value], ...]:
    """Check ``cluster.sbatch`` and return its options as sorted (name with ``_``, value) pairs.

    ``origins`` (``Settings.origins``) names the file, variable or flag each option came from in errors.
    Raises :class:`ConfigError` for an unknown option (with the close matches), one speedslurm sets itself
    (with the setting to use), one given twice (``mail-type`` and ``mail_type``) or a value with a control
    character. Options whose value is false or null are left out.
    """
    origins = origins or {}
    seen: dict[str, str] = {}
    out: dict[str, Value] = {}
    for key, value in options.items():
        source = origins.get(f"{SETTING}.{key}") or origins.get(SETTING) or "settings"
        name = _canonical(str(key), source)
        if name in MANAGED:
            raise ConfigError(f"{source}: {SETTING}.{key} is not allowed: speedslurm sets --{flag(name)} itself",
                              fix=f"{MANAGED[name]}, and remove {flag(name)} from {SETTING}")
        if name in seen:
            raise ConfigError(f"{source}: {SETTING} gives --{flag(name)} twice, as '{seen[name]}' and '{key}'",
                              fix=f"spell it one way ({flag(name)}) in every file")
        seen[name] = str(key)
        if value is None or value is False:
            continue
        out[name] = check_value(name, value, source)
    return tuple(sorted(out.items()))


def as_parameters(options: tp.Iterable[tuple[str, Value]]) -> dict[str, Value]:
    """``Plan.sbatch`` as submitit's ``additional_parameters``, every name and value checked again for control
    characters (a :class:`~speedslurm.planning.plan.Plan` can be made by hand, without :func:`sbatch_options`)."""
    out: dict[str, Value] = {}
    for name, value in options:
        refuse_control(f"{SETTING} option name", name)
        out[name] = refuse_control(f"{SETTING}.{flag(name)}", value) if isinstance(value, str) else value
    return out


def sbatch_line(name: str, value: Value) -> str:
    """One ``#SBATCH`` line, rendered as submitit renders its own: ``--name=<shell-quoted value>``."""
    if value is True:
        return f"#SBATCH --{flag(name)}"
    return f"#SBATCH --{flag(name)}={shlex.quote(str(value))}"
