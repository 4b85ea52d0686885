"""The gateway's folder (``gateway.dir``, mode 0700): what it keeps between runs and what ``gateway status`` reads.

* ``keys.json`` — the users' hashed keys (:mod:`.keys`);
* ``deployments.json`` — alias -> the ids of the deployments it started, so that a restart re-attaches to those
  still running instead of submitting new jobs;
* ``usage.json`` — per key and alias: requests, tokens, errors (written every few seconds and on exit; the counts
  go on across restarts);
* ``gateway.json`` — the running gateway's URL and pid, and ``admin_key`` (0600): how ``gateway status`` and
  ``gateway usage`` reach it. Neither is a user's key.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import stat
import time
import typing as tp
from pathlib import Path

from ..errors import UsageError
from ..rundir.layout import make_private_dir
from ..rundir.records import write_json_atomic, write_text_atomic

DEPLOYMENTS = "deployments.json"
USAGE = "usage.json"
RUNNING = "gateway.json"
ADMIN_KEY = "admin_key"
LOCK = "gateway.lock"


def read_json(path: Path, default: tp.Any) -> tp.Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return default
    except (OSError, ValueError):
        return default


class Folder:
    """A gateway folder: records read and written by the running gateway and by ``gateway status``."""

    def __init__(self, path: Path) -> None:
        self.root = Path(os.path.expanduser(path))

    def open(self) -> Folder:
        make_private_dir(self.root, "gateway folder", "gateway.dir")
        return self

    # ------------------------------------------------------------------------------ single gateway per folder

    def lock(self) -> tp.Any:
        """Hold the folder's lock for the gateway's life; :class:`UsageError` if another gateway holds it."""
        import fcntl

        fd = os.open(self.root / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            running = self.running()
            where = f" (pid {running.get('pid')}, {running.get('url')})" if running else ""
            raise UsageError(f"another gateway runs from {self.root}{where}",
                             fix="stop it first, or give this one its own folder with --set gateway.dir=PATH") from None
        return fd

    # ------------------------------------------------------------------------------ deployments

    def deployments(self) -> tuple[dict[str, list[str]], dict[str, str]]:
        """The deployments that are not over, by alias, and which of them were started to succeed which
        (successor -> the deployment near its time limit)."""
        data = read_json(self.root / DEPLOYMENTS, {})
        if not isinstance(data, dict):
            return {}, {}
        aliases, successors = data.get("aliases"), data.get("successors")
        if not isinstance(aliases, dict):  # written before successors were kept: the aliases alone
            aliases, successors = data, {}
        by_alias = {str(a): [str(i) for i in ids] for a, ids in aliases.items() if isinstance(ids, list)}
        kept = {str(k): str(v) for k, v in successors.items()} if isinstance(successors, dict) else {}
        return by_alias, kept

    def write_deployments(self, by_alias: dict[str, list[str]], successors: dict[str, str]) -> None:
        write_json_atomic(self.root / DEPLOYMENTS, {"aliases": by_alias, "successors": successors})

    # ------------------------------------------------------------------------------ usage

    def usage(self) -> dict[str, tp.Any]:
        data = read_json(self.root / USAGE, {})
        return data if isinstance(data, dict) else {}

    def write_usage(self, data: dict[str, tp.Any]) -> None:
        write_json_atomic(self.root / USAGE, data)

    # ------------------------------------------------------------------------------ the running gateway

    def announce(self, url: str) -> str:
        """Record that a gateway serves ``url`` from this folder; returns the admin key it accepts."""
        key = "ssa-" + secrets.token_urlsafe(32)
        write_text_atomic(self.root / ADMIN_KEY, key)
        write_json_atomic(self.root / RUNNING, {"url": url, "pid": os.getpid(), "started_at": time.time()})
        return key

    def retire(self) -> None:
        for name in (RUNNING, ADMIN_KEY):
            with contextlib.suppress(FileNotFoundError):
                (self.root / name).unlink()

    def running(self) -> dict[str, tp.Any]:
        data = read_json(self.root / RUNNING, {})
        return data if isinstance(data, dict) else {}

    def admin_key(self) -> str:
        path = self.root / ADMIN_KEY
        try:
            st = path.stat()
            if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
                raise UsageError(f"{path} can be read by others", fix=f"chmod 600 {path}, then restart the gateway")
            return path.read_text().strip()
        except FileNotFoundError:
            raise UsageError(f"no gateway runs from {self.root}",
                             fix="start one with `speedslurm gateway --model ALIAS=MODEL`") from None
