"""``speedslurm submit``: up -> wait -> run the batch -> down, in one command."""

from __future__ import annotations

import typing as tp

import click

if tp.TYPE_CHECKING:
    from rich.console import Console

from ..errors import DeploymentFailed
from . import cli
from .batch_cmds import BATCH_EXIT_STATUSES, batch_options, execute, options_from
from .common import err_console, is_tty, resume_command, settings_from
from .deploy_cmds import _model_options, _progress_printer, idle_timeout_option


@cli.command("submit", epilog=BATCH_EXIT_STATUSES)
@_model_options
@click.option("--keep", is_flag=True, help="Leave the deployment running after the batch (and after Ctrl-C).")
@idle_timeout_option
@click.option("--handover-before", type=float, default=None, metavar="SECONDS",
              help="This long before the job's time limit, start a successor deployment and move the batch onto "
                   "it; the old one finishes its requests in flight and is cancelled. 0: never "
                   "[default: run.handover_before_s, 600].")
@click.option("--ready-timeout", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Give up when no replica is ready after this many seconds [default: wait as long as the job waits].")
@batch_options
@click.pass_context
def submit_cmd(ctx: click.Context, model: str, executor: str | None, nodes: int | None, replicas: int,
               ctx_size: int | None, time_limit: str | None, keep: bool, ready_timeout: float | None,
               idle_timeout: str | None, handover_before: float | None, **kw: tp.Any) -> None:
    """Start a deployment, run a prompts file through it, and stop it.

    \b
    Everything is checked before anything is queued: the prompts file (every line), the results file,
    the model, the binaries and the partition. The batch starts on the first ready replica and adds the
    others as they come up. Running the same command again resumes: prompts that already have a
    successful line are skipped. Ctrl-C stops cleanly, cancels the job (unless --keep) and prints the
    command that resumes.
    """
    from .. import api

    options = options_from(kw, settings_from(ctx).run.outage_s)
    json_mode = bool(kw["json_mode"])
    err = err_console()
    again = resume_command()
    # Bad prompts or --out: exit 2, nothing queued.
    prepared = api.prepare_prompts(kw["prompts"], kw["out"], options)
    started = []

    def run(source: tp.Any, batch: tp.Any, opts: tp.Any) -> tp.Any:
        started.append(True)
        return execute(source, batch, opts, json_mode)

    try:
        api.submit(model, prepared.prompts, nodes=nodes, replicas=replicas, ctx=ctx_size, time_limit=time_limit,
                   executor=executor, keep=keep, ready_timeout=ready_timeout, options=options,
                   settings=settings_from(ctx, llama__idle_timeout=idle_timeout,
                                          run__handover_before_s=handover_before),
                   on_update=_progress_printer(json_mode),
                   on_message=lambda text: _say(err, text, json_mode), prepared=prepared,
                   run=run)
    except KeyboardInterrupt:
        if started:
            raise
        # Ctrl-C during the batch ends in SystemExit(130) from execute(), after the summary: this is before it.
        err.print(f"Interrupted before the batch started; nothing was sent. To start again: {again}")
        raise SystemExit(130) from None
    except DeploymentFailed as exc:
        # Nothing was sent yet: the same command starts a new deployment and runs the whole batch.
        exc.fix = f"{exc.fix}; nothing was sent: run the same command again to retry ({again})"
        raise
    finally:
        prepared.close()


def _say(err: Console, text: str, json_mode: bool) -> None:
    """The workflow's messages on stderr; the start line only where it does not mix with JSON on a pipe."""
    if text.startswith("deployment ") and json_mode and not is_tty():
        return
    err.print(text, markup=False)
