"""Commands (see speedslurm.cli)."""

from __future__ import annotations

from . import cli  # noqa: F401
