"""Client start-up: what reading the settings and a model's header imports, and that the faster paths give the
same values as the libraries' usual ones."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from speedslurm.settings import configs_dir, package_defaults_path


def _run(code: str, *args: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.split("\n")


def test_reading_a_header_imports_neither_the_gguf_package_nor_numpy(tiny_gguf: Path) -> None:
    code = ("import sys; from speedslurm.ggufinfo import read_gguf_info; info = read_gguf_info(sys.argv[1]); "
            "print(info.file_type); print(sorted(m for m in ('gguf', 'numpy') if m in sys.modules))")
    assert _run(code, str(tiny_gguf))[:2] == ["F16", "[]"]


def test_the_type_tables_are_the_gguf_packages() -> None:
    import gguf.constants

    from speedslurm.ggufinfo import gguf_constants

    mine = gguf_constants()
    assert mine is not gguf.constants   # loaded apart from the package, under its own name
    assert {t.name: v for t, v in mine.GGML_QUANT_SIZES.items()} == {
        t.name: v for t, v in gguf.constants.GGML_QUANT_SIZES.items()}
    assert [(t.name, t.value) for t in mine.LlamaFileType] == [(t.name, t.value) for t in gguf.constants.LlamaFileType]


def test_loading_the_settings_uses_pydantic_core_without_pydantic() -> None:
    code = ("import sys; from speedslurm.settings import load_settings; s = load_settings(profile='testbed', "
            "environ={}); print(s.cluster.name); print(sorted(m for m in ('pydantic', 'pydantic_core') "
            "if m in sys.modules))")
    assert _run(code)[:2] == ["testbed", "['pydantic_core']"]


def test_the_fast_yaml_parser_reads_every_packaged_file_as_safe_load_does() -> None:
    from speedslurm.settings_layers import load_yaml

    cdir = configs_dir()
    assert cdir is not None
    files = [package_defaults_path(), *sorted(cdir.glob("*.yaml"))]
    assert len(files) >= 4
    for path in files:
        assert json.dumps(load_yaml(path, required=True), sort_keys=True, default=str) == json.dumps(
            yaml.safe_load(path.read_text()) or {}, sort_keys=True, default=str), path
