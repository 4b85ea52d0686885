"""The progress bar on stderr: done/total, failed, completion tok/s, ETA. Off when quiet or not a terminal."""

from __future__ import annotations

import typing as tp

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeRemainingColumn
from rich.text import Text


class BatchProgress:
    """Updated a few times a second by the runner's monitor, never per request (cheap at 1000s req/s)."""

    def __init__(self, console: Console, total: int, enabled: bool) -> None:
        self.enabled = enabled and console.is_terminal
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        if self.enabled:
            self._progress = Progress(
                TextColumn("[bold]batch"), BarColumn(), MofNCompleteColumn(),
                TextColumn("[red]{task.fields[failed]} failed"), TextColumn("{task.fields[tok_s]:.0f} tok/s"),
                TextColumn("{task.fields[replicas]}", markup=False), TextColumn("ETA"), TimeRemainingColumn(),
                console=console, transient=False, refresh_per_second=4)
            self._task = self._progress.add_task("batch", total=total, failed=0, tok_s=0.0, replicas="")

    def __enter__(self) -> BatchProgress:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def update(self, done: int, failed: int, tok_s: float, replicas: str) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, completed=done, failed=failed, tok_s=tok_s, replicas=replicas)

    def log(self, console: Console, message: str | Text, **kw: tp.Any) -> None:
        """Print a line above the bar (or plainly when there is no bar)."""
        if self._progress is not None:
            self._progress.console.print(message, **kw)
        else:
            console.print(message, **kw)
