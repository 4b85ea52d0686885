"""A running batch's progress, published in its deployment's run directory: ``batches/<host>-<pid>.json`` (0600,
written atomically about once a second by :func:`write_progress`, from :mod:`speedslurm.batch.runstate`);
:func:`read_progress` lists the recent ones (``top``, ``status --watch``). Standard library only.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import time
import typing as tp
from pathlib import Path

from .records import read_json, write_json_atomic

# A batch whose progress file was not rewritten for this long has stopped without saying so (killed).
PROGRESS_STALE_S = 30.0


# How long a finished batch stays in the view.
PROGRESS_KEEP_S = 60.0


@dataclasses.dataclass(frozen=True)
class BatchProgressInfo:
    """What a batch running against a deployment published of itself."""

    host: str
    pid: int
    results: str
    total: int
    done: int                 # ok + failed + skipped
    failed: int
    completion_tok_s: float
    started_at: float
    updated_at: float
    status: str               # running | completed | interrupted | failed

    def to_json(self) -> dict[str, tp.Any]:
        return dataclasses.asdict(self)


def progress_dir(run_root: Path) -> Path:
    return Path(run_root) / "batches"


def _progress_path(run_root: Path) -> Path:
    return progress_dir(run_root) / f"{socket.gethostname()}-{os.getpid()}.json"


def write_progress(run_root: Path, *, results: str, total: int, done: int, failed: int, completion_tok_s: float,
                   started_at: float, status: str = "running") -> None:
    """Publish a batch's progress in the deployment's run directory (private, atomic); never fails the batch."""
    folder = progress_dir(run_root)
    try:
        folder.mkdir(mode=0o700, exist_ok=True)
        write_json_atomic(_progress_path(run_root), {
            "host": socket.gethostname(), "pid": os.getpid(), "results": results, "total": total, "done": done,
            "failed": failed, "completion_tok_s": round(completion_tok_s, 2), "started_at": started_at,
            "updated_at": time.time(), "status": status})
    except OSError:
        pass


def read_progress(run_root: Path, now: float | None = None) -> list[BatchProgressInfo]:
    """The batches running against a deployment (and those that ended in the last minute)."""
    now = time.time() if now is None else now
    folder = progress_dir(run_root)
    out = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            data = read_json(path) or {}
            info = BatchProgressInfo(
                host=str(data["host"]), pid=int(data["pid"]), results=str(data["results"]),
                total=int(data["total"]), done=int(data["done"]), failed=int(data["failed"]),
                completion_tok_s=float(data["completion_tok_s"]), started_at=float(data["started_at"]),
                updated_at=float(data["updated_at"]), status=str(data["status"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue
        age = now - info.updated_at
        if info.status == "running" and age > PROGRESS_STALE_S:
            info = dataclasses.replace(info, status="stopped (no news)")
        if age > PROGRESS_KEEP_S:
            continue
        out.append(info)
    return out
