"""Typed errors. Every user-facing failure names the problem and the fix.

The CLI's exit statuses, all of them (the CLI's ``main`` maps each error to its ``exit_code``):

* 0: done; for a batch (``run``, ``submit``): every request has a successful line;
* 1: a failure at run time (a job that failed, a server that died, a batch that could not go on);
* 2: bad input or a configuration problem, found before anything is queued;
* 3: a batch ran to its end, but some requests failed (their error lines are in the results file; running
  the same command again retries them);
* 130: interrupted (Ctrl-C).
"""

from __future__ import annotations


class SpeedslurmError(Exception):
    """Base error; ``fix`` is printed on its own line after the message."""

    exit_code = 1

    def __init__(self, message: str, fix: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.fix = fix

    def render(self) -> str:
        if self.fix:
            return f"{self.message}\nFix: {self.fix}"
        return self.message


class UsageError(SpeedslurmError):
    """Bad input, caught before anything is queued (exit code 2)."""

    exit_code = 2


class ConfigError(UsageError):
    """A settings file or value is wrong (exit code 2)."""


class CommandError(SpeedslurmError):
    """An external command failed; carries its argv, exit code and stderr."""

    def __init__(self, argv: list[str], returncode: int, stdout: str, stderr: str) -> None:
        tail = (stderr or stdout).strip()[-2000:]
        super().__init__(f"`{' '.join(argv)}` failed with exit code {returncode}: {tail}")
        self.argv = argv
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr


class RequestsFailed(SpeedslurmError):
    """A batch ran to its end but some requests got error lines (exit code 3)."""

    exit_code = 3


class DeploymentFailed(SpeedslurmError):
    """A deployment failed while starting or serving (exit code 1)."""

    def __init__(self, message: str, fix: str | None = None, log_tail: str = "") -> None:
        super().__init__(message, fix)
        self.log_tail = log_tail

    def render(self) -> str:
        text = super().render()
        if self.log_tail:
            text += "\n--- last log lines ---\n" + self.log_tail.rstrip()
        return text
