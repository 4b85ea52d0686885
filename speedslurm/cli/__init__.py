"""Click front end. Thin: each command parses flags, calls the library, prints.

Command modules register themselves on :data:`cli`; they are imported here (cheap: no work at import time).
"""

from __future__ import annotations

import signal
import sys
import types

import click

from .. import __version__
from ..errors import SpeedslurmError


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
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
    from . import batch_cmds, cluster_cmds, deploy_cmds, results_cmd, submit_cmd, templates_cmd, top_cmd  # noqa: F401


def _stop_like_ctrl_c(signum: int, frame: types.FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    _register()
    # SIGTERM and SIGHUP (`timeout`, a dropped ssh session, an outer job's time limit) do what Ctrl-C does:
    # stop cleanly, cancel the deployment unless --keep, leave a valid results file, say how to resume.
    for sig in (signal.SIGTERM, signal.SIGHUP):
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
