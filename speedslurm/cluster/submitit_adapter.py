"""The one place that relies on what submitit does not offer publicly (tested range: see pyproject.toml).

submitit submits every job of speedslurm (its public surface: ``SlurmExecutor``/``LocalExecutor``,
``update_parameters``, ``submit``, ``map_array``, ``Job.job_id``). Three things it has no public hook for are
done here, and only here:

* **The job script.** submitit's Slurm executor knows no heterogeneous jobs (leader component + followers
  component). :func:`sbatch_text` calls its private renderer ``submitit.slurm.slurm._make_sbatch_string``
  (so every value is shell-quoted and every flag rendered as submitit renders its own), and
  :class:`ScriptSlurmExecutor` overrides ``_make_submission_file_text`` (the script a submission writes) and
  ``_num_tasks`` (the task count of the pickled job: every node of the hetjob, not just component 0's).
* **The task command.** ``_submitit_command_str`` (a property of every executor) is replaced by
  ``python -u -m speedslurm.node.entry FOLDER``: submitit's own entry imports submitit before anything can hold
  Slurm's time-limit warning.
* **The local controller's start.** submitit's ``start_controller`` hands the controller the caller's
  environment and pipes; :class:`DetachedLocalExecutor` overrides ``_submit_command`` with a copy of it that
  starts ``python -m submitit.local._local FOLDER`` in its own session, with /dev/null, a log file and the
  environment without a surrounding Slurm job's variables, and builds the ``LocalJob`` itself.

One more thing relies on submitit's files but lives on the job side, which never imports submitit:
``node/entry.py``'s ``run_submitted`` runs a task whose pickled callable is ``node.roles.serve`` itself (0.3-0.6 s
sooner to the servers), reading the pickle ``JobPaths`` names and writing the ``("success", value)`` result pickle
that submitit's own entry writes. Its assumptions are checked here with the others.

:func:`assumptions` lists what these overrides rely on; ``tests/unit/test_submitit_adapter.py`` checks each one
against the installed submitit, so a release that changes them fails there with a message naming the change,
not in a user's deployment.
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import typing as tp
from pathlib import Path

import submitit
import submitit.local.local
from submitit.slurm import slurm as submitit_slurm

# The submitit versions this adapter was tested with; pyproject.toml pins the same range.
TESTED = ">=1.5.4,<1.6"


def sbatch_text(command: str, folder: Path, map_count: int | None, **params: tp.Any) -> str:
    """submitit's sbatch script for ``params`` (SlurmExecutor parameter names) and the task ``command``."""
    return str(submitit_slurm._make_sbatch_string(command=command, folder=folder, map_count=map_count, **params))


def entry_command(python: str, folder: Path) -> str:
    """The task command: the job side's entry, which holds the time-limit warning before importing submitit."""
    import shlex

    return " ".join([python, "-u -m speedslurm.node.entry", shlex.quote(str(folder))])


class EntrySlurmExecutor(submitit.SlurmExecutor):
    """submitit's Slurm executor whose tasks start through :mod:`speedslurm.node.entry`."""

    @property
    def _submitit_command_str(self) -> str:
        return entry_command(self.python, Path(self.folder))


class ScriptSlurmExecutor(EntrySlurmExecutor):
    """submitit's Slurm executor that submits the script ``render(command)`` gives, as ``ntasks`` tasks."""

    def __init__(self, folder: Path, render: tp.Callable[[str], str], ntasks: int,
                 python: str | None = None) -> None:
        super().__init__(folder=folder, max_num_timeout=0, python=python)
        self._render = render
        self._ntasks = ntasks

    def _make_submission_file_text(self, command: str, uid: str) -> str:
        return self._render(command)

    def _num_tasks(self) -> int:
        return self._ntasks


class DetachedLocalExecutor(submitit.LocalExecutor):
    """submitit's local executor whose controller outlives the client and holds none of its pipes.

    submitit starts the controller with the client's stdin/stdout/stderr; a deployment left running by
    ``speedslurm up`` would then keep a caller's pipe open (``$(speedslurm up ...)`` would never return)
    and die with the terminal. Here it gets its own session, /dev/null and a log file instead, and the
    environment ``environment`` gives (default: this process's). Its tasks start through
    :mod:`speedslurm.node.entry`, as on Slurm.
    """

    def __init__(self, folder: Path, environment: tp.Callable[[], dict[str, str]] | None = None) -> None:
        super().__init__(folder=folder)
        self._environment = environment or (lambda: dict(os.environ))

    @property
    def _submitit_command_str(self) -> str:
        return entry_command(self.python, Path(self.folder))

    def _submit_command(self, command: str) -> submitit.local.local.LocalJob[tp.Any]:
        # The same variables as submitit.local.local.start_controller sets (its controller reads them).
        ntasks = self.parameters.get("tasks_per_node", 1)
        env = self._environment()
        env.update(
            SUBMITIT_LOCAL_NTASKS=str(ntasks), SUBMITIT_LOCAL_COMMAND=command,
            SUBMITIT_LOCAL_TIMEOUT_S=str(int(60 * self.parameters.get("timeout_min", 2.0))),
            SUBMITIT_LOCAL_SIGNAL_DELAY_S=str(int(self.parameters.get("signal_delay_s", 30))),
            SUBMITIT_LOCAL_NODEID="0", SUBMITIT_LOCAL_JOB_NUM_NODES="1", SUBMITIT_STDERR_TO_STDOUT="",
            SUBMITIT_EXECUTOR="local", SUBMITIT_LOCAL_WITH_SHELL="",
        )
        folder = Path(self.folder)
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "controller.log", "ab") as log:
            process = subprocess.Popen([sys.executable, "-m", "submitit.local._local", str(folder)], env=env,
                                       stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        job: submitit.local.local.LocalJob[tp.Any] = submitit.local.local.LocalJob(
            folder=folder, job_id=str(process.pid), process=process, tasks=list(range(ntasks)))
        job._cancel_at_deletion = False  # the deployment outlives this process
        return job


# ----------------------------------------------------------------------------------------------------------
# What the overrides above assume of submitit (checked by the tests against the installed version)


def _params(fn: tp.Callable[..., tp.Any]) -> list[str]:
    return list(inspect.signature(fn).parameters)


def assumptions() -> list[tuple[str, tp.Callable[[], bool]]]:
    """(what this adapter assumes, a check of it against the installed submitit), one per assumption."""
    from submitit.core import core, submission, utils
    from submitit.local import local

    controller_env = inspect.getsource(local.Controller.__init__) + inspect.getsource(local.Controller.start_tasks)
    return [
        ("submitit.slurm.slurm._make_sbatch_string(command, folder, ..., map_count, ...) renders the script",
         lambda: callable(getattr(submitit_slurm, "_make_sbatch_string", None))
         and {"command", "folder", "map_count", "srun_args", "setup", "signal_delay_s",
              "additional_parameters"} <= set(_params(submitit_slurm._make_sbatch_string))),
        ("SlurmExecutor._make_submission_file_text(self, command, uid) gives the script it submits",
         lambda: _params(submitit.SlurmExecutor._make_submission_file_text) == ["self", "command", "uid"]),
        ("SlurmExecutor._num_tasks(self) gives the task count of a submitted job",
         lambda: _params(submitit.SlurmExecutor._num_tasks) == ["self"]),
        ("PicklingExecutor._submitit_command_str is a property giving the task command",
         lambda: isinstance(inspect.getattr_static(core.PicklingExecutor, "_submitit_command_str"), property)
         and isinstance(inspect.getattr_static(submitit.SlurmExecutor, "_submitit_command_str"), property)
         and isinstance(inspect.getattr_static(submitit.LocalExecutor, "_submitit_command_str"), property)),
        ("LocalExecutor._submit_command(self, command) starts the controller and returns its LocalJob",
         lambda: _params(submitit.LocalExecutor._submit_command) == ["self", "command"]),
        ("LocalJob(folder, job_id, process, tasks) and its _cancel_at_deletion flag",
         lambda: {"folder", "job_id", "process", "tasks"} <= set(_params(local.LocalJob.__init__))
         and "_cancel_at_deletion" in inspect.getsource(local.LocalJob)),
        ("python -m submitit.local._local FOLDER runs the controller, configured by the SUBMITIT_LOCAL_* "
         "variables that start_controller sets",
         lambda: all(name in controller_env for name in (
             "SUBMITIT_LOCAL_NTASKS", "SUBMITIT_LOCAL_COMMAND", "SUBMITIT_LOCAL_TIMEOUT_S",
             "SUBMITIT_LOCAL_SIGNAL_DELAY_S", "SUBMITIT_STDERR_TO_STDOUT", "SUBMITIT_LOCAL_WITH_SHELL"))
         and all(name in inspect.getsource(local.start_controller) for name in (
             "SUBMITIT_LOCAL_NODEID", "SUBMITIT_LOCAL_JOB_NUM_NODES", "SUBMITIT_EXECUTOR"))
         and "Controller" in Path(local.__file__).with_name("_local.py").read_text()),
        # node/entry.py's run_submitted, the job side's own run of a submitted task:
        ("JobPaths names a task's files FOLDER/<job>_submitted.pkl and FOLDER/<job>_<rank>_result.pkl",
         lambda: (utils.JobPaths("/f/%j", job_id="12", task_id=3).submitted_pickle.name,
                  utils.JobPaths("/f/%j", job_id="12", task_id=3).result_pickle.name)
         == ("12_submitted.pkl", "12_3_result.pkl")),
        ("a submitted DelayedSubmission keeps function, args and kwargs as plain attributes",
         lambda: {"function", "args", "kwargs"} <= set(vars(utils.DelayedSubmission(print, 1, a=2)))),
        ("a task's result pickle is ('success', value) (or ('error', traceback text)), as Job reads it",
         lambda: '("success", result)' in inspect.getsource(submission)
         and '"success"' in inspect.getsource(core.Job._get_outcome_and_result)),
        ("a local task knows its job and rank from SUBMITIT_LOCAL_JOB_ID and SUBMITIT_LOCAL_GLOBALID",
         lambda: all(name in inspect.getsource(local) for name in ("SUBMITIT_LOCAL_JOB_ID",
                                                                   "SUBMITIT_LOCAL_GLOBALID"))),
    ]


def version() -> str:
    return str(getattr(submitit, "__version__", "unknown"))
