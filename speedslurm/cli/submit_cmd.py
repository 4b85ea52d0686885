"""``speedslurm submit``: up -> wait -> run the batch -> down, in one command."""

from __future__ import annotations

import typing as tp

import click

from .. import deploy as dp
from ..errors import DeploymentFailed
from . import cli
from .batch_cmds import BATCH_EXIT_STATUSES, _deployment_source, batch_options, execute, options_from
from .common import err_console, resume_command
from .deploy_cmds import _model_options, do_up


@cli.command("submit", epilog=BATCH_EXIT_STATUSES)
@_model_options
@click.option("--keep", is_flag=True, help="Leave the deployment running after the batch (and after Ctrl-C).")
@click.option("--ready-timeout", type=float, default=None,
              help="Give up when no replica is ready after this many seconds [default: wait as long as the job waits].")
@batch_options
@click.pass_context
def submit_cmd(ctx: click.Context, model: str, executor: str | None, nodes: int | None, replicas: int,
               ctx_size: int | None, time_limit: str | None, keep: bool, ready_timeout: float | None,
               **kw: tp.Any) -> None:
    """Start a deployment, run a prompts file through it, and stop it.

    \b
    Everything is checked before anything is queued: the prompts file (every line), the results file,
    the model, the binaries and the partition. The batch starts on the first ready replica and adds the
    others as they come up. Running the same command again resumes: prompts that already have a
    successful line are skipped. Ctrl-C stops cleanly, cancels the job (unless --keep) and prints the
    command that resumes.
    """
    from ..batch.runner import prepare_batch

    options = options_from(kw)
    json_mode = bool(kw["json_mode"])
    err = err_console()
    prepared = prepare_batch(kw["prompts"], kw["out"], options)  # bad prompts or --out: exit 2, nothing queued
    try:
        if prepared.remaining == 0:
            err.print(f"Nothing to do: every prompt in {prepared.display} already has a successful line in "
                      f"{prepared.out}.")
            execute_nothing(prepared, json_mode)
            return
        again = resume_command()
        try:
            dep, _ = do_up(ctx, model, executor=executor, nodes=nodes, replicas=replicas, ctx_size=ctx_size,
                           time_limit=time_limit, timeout=ready_timeout, until="first", as_json=json_mode,
                           keep_on_interrupt=keep)
        except KeyboardInterrupt:
            err.print(f"Interrupted before the batch started; nothing was sent. To start again: {again}")
            raise SystemExit(130) from None
        except DeploymentFailed as exc:
            # Nothing was sent yet: the same command starts a new deployment and runs the whole batch.
            exc.fix = f"{exc.fix}; nothing was sent: run the same command again to retry ({again})"
            raise
        try:
            execute(_deployment_source(ctx, dep.id), prepared, options, json_mode)
        finally:
            if keep:
                err.print(f"Deployment {dep.id} kept running. Send more with: speedslurm run --deployment {dep.id} "
                          f"--prompts P.jsonl; stop it with: speedslurm down {dep.id}")
            else:
                dp.down(dep)
                err.print(f"Deployment {dep.id} stopped (job(s) {', '.join(dep.job_ids)} cancelled).")
    finally:
        prepared.close()


def execute_nothing(prepared: tp.Any, json_mode: bool) -> None:
    """Print the summary of a batch whose prompts are all done, without starting a deployment."""
    from ..batch.sources import StaticSource

    execute(StaticSource([]), prepared, options_from_defaults(), json_mode)


def options_from_defaults() -> tp.Any:
    from ..batch.runner import BatchOptions

    return BatchOptions(quiet=True)
