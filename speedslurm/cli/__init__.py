"""Click front end. Thin: each command parses flags, calls the library, prints.

Command modules register themselves on :data:`cli`; a command's module is imported when the command is asked
for (a start of ``speedslurm up`` does not import ``run``'s or ``doctor``'s), every module for ``--help``.
"""

from __future__ import annotations

import importlib
import signal
import sys
import types

import click

from .. import __version__
from ..errors import SpeedslurmError

# command -> the module that defines it (``models`` also gets ``models pull`` from cluster_cmds)
_COMMANDS = {
    "config": "deploy_cmds", "plan": "deploy_cmds", "up": "deploy_cmds", "status": "deploy_cmds",
    "endpoint": "deploy_cmds", "logs": "deploy_cmds", "down": "deploy_cmds", "models": "cluster_cmds",
    "render": "cluster_cmds", "build-llama": "cluster_cmds", "doctor": "cluster_cmds", "run": "batch_cmds",
    "show": "results_cmd", "submit": "submit_cmd", "templates": "templates_cmd", "top": "top_cmd",
    "gateway": "gateway_cmd",
}


class _LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        _register()
        return super().list_commands(ctx)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in _COMMANDS:
            importlib.import_module(f"{__name__}.{_COMMANDS[cmd_name]}")
        command = super().get_command(ctx, cmd_name)
        if command is not None:
            from .common import finite_floats  # every float flag refuses nan and inf

            finite_floats(command)
        return command


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="speedslurm")
@click.option("--profile", envvar="SPEEDSLURM_PROFILE", default=None,
              help="Cluster profile from configs/ (e.g. gorgonas, testbed). Env: SPEEDSLURM_PROFILE.")
@click.option("--config", "config_path", envvar="SPEEDSLURM_CONFIG", default=None,
              type=click.Path(dir_okay=False), help="User config file (default ~/.config/speedslurm/config.yaml).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override one setting, e.g. --set llama.parallel=8 (repeatable).")
@click.pass_context
def cli(ctx: click.Context, profile: str | None, config_path: str | None, overrides: tuple[str, ...]) -> None:
    """Run GGUF models across Slurm GPU nodes with llama.cpp RPC, and push batches of prompts through them.

    \b
    Typical use:
      speedslurm plan   --model Q4_K_S             # how many nodes, what job, nothing submitted
      speedslurm up     --model Q4_K_S             # start a deployment, print its endpoint
      speedslurm submit --model Q4_K_S --prompts prompts.jsonl   # up, run the batch, down
      speedslurm status                            # deployments and their state
    """
    ctx.ensure_object(dict)
    ctx.obj["profile"] = profile
    ctx.obj["config_path"] = config_path
    ctx.obj["overrides"] = overrides


def _register() -> None:
    # Each module adds its commands to `cli`; importing them does no work.
    from . import (  # noqa: F401
        batch_cmds,
        cluster_cmds,
        deploy_cmds,
        gateway_cmd,
        results_cmd,
        submit_cmd,
        templates_cmd,
        top_cmd,
    )


def _stop_like_ctrl_c(signum: int, frame: types.FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    # SIGTERM and SIGHUP (`timeout`, a dropped ssh session, an outer job's time limit) do what Ctrl-C does:
    # stop cleanly, cancel the deployment unless --keep, leave a valid results file, say how to resume.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if sig == signal.SIGHUP and signal.getsignal(sig) == signal.SIG_IGN:
            continue  # started with nohup: logging out is not meant to stop it
        signal.signal(sig, _stop_like_ctrl_c)
    try:
        cli.main(args=argv, prog_name="speedslurm", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except SpeedslurmError as exc:
        click.echo(f"Error: {exc.render()}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("Interrupted.", err=True)
        sys.exit(130)
