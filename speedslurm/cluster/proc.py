"""The one subprocess helper: argv lists, never a shell; failures carry exit code and stderr."""

from __future__ import annotations

import subprocess
import typing as tp

from ..errors import CommandError


def call(argv: tp.Sequence[str], *, timeout: float = 60, check: bool = True,
         input: str | None = None, env: tp.Mapping[str, str] | None = None, new_session: bool = False) -> str:
    """Run ``argv`` and return its stdout; raise :class:`CommandError` on a non-zero exit.

    ``new_session``: in a session of its own, out of the terminal's reach (a Ctrl-C there does not kill it)."""
    try:
        res = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                             input=input, env=dict(env) if env is not None else None,
                             start_new_session=new_session)
    except FileNotFoundError as exc:
        raise CommandError(list(argv), 127, "", f"{argv[0]}: command not found") from exc
    except subprocess.TimeoutExpired as exc:
        raise CommandError(list(argv), 124, "", f"timed out after {timeout}s") from exc
    if check and res.returncode != 0:
        raise CommandError(list(argv), res.returncode, res.stdout, res.stderr)
    return res.stdout
