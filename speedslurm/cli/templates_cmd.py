"""``speedslurm templates DIR``: the plain-sbatch templates and the job side they run, written into DIR."""

from __future__ import annotations

import shutil
from pathlib import Path

import click

from ..errors import UsageError
from . import cli
from .common import print_json

TEMPLATES = ("llama-rpc-hetjob.sbatch", "llama-rpc-array.sbatch", "build-llama.sbatch")


def write_templates(folder: Path) -> list[Path]:
    """Copy the templates into ``folder`` and build ``speedslurm-node.pyz`` beside them; returns the files."""
    from ..ops.nodepyz import build
    from ..settings.packaged import TEMPLATES as TEMPLATE_DIR
    from ..settings.packaged import data_dir

    source = data_dir(TEMPLATE_DIR)
    if source is None:
        raise UsageError("this installation of speedslurm carries no sbatch templates",
                         fix="reinstall speedslurm (the wheel ships them as speedslurm/sbatch_templates)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        written = []
        for name in TEMPLATES:
            shutil.copyfile(source / name, folder / name)
            (folder / name).chmod(0o755)
            written.append(folder / name)
        written.append(build(folder))
    except OSError as exc:
        raise UsageError(f"cannot write the templates into {folder}: {exc.strerror or exc}",
                         fix="choose a folder you can write, on a filesystem the nodes mount") from None
    return written


@cli.command("templates")
@click.argument("folder", type=click.Path(file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the written files as JSON.")
def templates_cmd(folder: Path, as_json: bool) -> None:
    """Write the plain-sbatch templates and speedslurm-node.pyz (the job side they run) into FOLDER.

    \b
    Submit them with plain sbatch where speedslurm is not installed on the nodes (they need only python3):
      sbatch --export=ALL,MODEL=/shared/m.gguf FOLDER/llama-rpc-hetjob.sbatch
    """
    files = write_templates(folder)
    if as_json:
        print_json({"files": [str(p.absolute()) for p in files]})
        return
    for path in files:
        click.echo(str(path))
