"""``speedslurm templates DIR``: the plain-sbatch templates and the job side they run, written into DIR."""

from __future__ import annotations

from pathlib import Path

import click

from .. import api
from . import cli
from .common import print_json


@cli.command("templates")
@click.argument("folder", type=click.Path(file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the written files as JSON.")
def templates_cmd(folder: Path, as_json: bool) -> None:
    """Write the plain-sbatch templates and speedslurm-node.pyz (the job side they run) into FOLDER.

    \b
    Submit them with plain sbatch where speedslurm is not installed on the nodes (they need only python3):
      sbatch --export=ALL,MODEL=/shared/m.gguf FOLDER/llama-rpc-hetjob.sbatch
    """
    files = api.write_templates(folder)
    if as_json:
        print_json({"files": [str(p.absolute()) for p in files]})
        return
    for path in files:
        click.echo(str(path))
