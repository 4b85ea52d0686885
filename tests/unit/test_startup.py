"""Client start-up: what reading the settings and a model's header imports, and that the faster paths give the
same values as the libraries' usual ones."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import typing as tp
from pathlib import Path

import pytest
import yaml

from speedslurm.settings.layers import configs_dir, package_defaults_path


def _run(code: str, *args: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.split("\n")


def test_reading_a_header_imports_neither_the_gguf_package_nor_numpy(tiny_gguf: Path) -> None:
    code = ("import sys; from speedslurm.model.gguf import read_gguf_info; info = read_gguf_info(sys.argv[1]); "
            "print(info.file_type); print(sorted(m for m in ('gguf', 'numpy') if m in sys.modules))")
    assert _run(code, str(tiny_gguf))[:2] == ["F16", "[]"]


def test_the_type_tables_are_the_gguf_packages() -> None:
    import gguf.constants

    from speedslurm.model.gguf import gguf_constants

    mine = gguf_constants()
    assert mine is not gguf.constants   # loaded apart from the package, under its own name
    assert {t.name: v for t, v in mine.GGML_QUANT_SIZES.items()} == {
        t.name: v for t, v in gguf.constants.GGML_QUANT_SIZES.items()}
    assert [(t.name, t.value) for t in mine.LlamaFileType] == [(t.name, t.value) for t in gguf.constants.LlamaFileType]


def test_loading_the_settings_uses_pydantic_core_without_pydantic() -> None:
    code = ("import sys; from speedslurm.settings.settings import load_settings; s = load_settings(profile='testbed', "
            "environ={}); print(s.cluster.name); print(sorted(m for m in ('pydantic', 'pydantic_core') "
            "if m in sys.modules))")
    assert _run(code)[:2] == ["testbed", "['pydantic_core']"]


def test_the_fast_yaml_parser_reads_every_packaged_file_as_safe_load_does() -> None:
    from speedslurm.settings.layers import load_yaml

    cdir = configs_dir()
    assert cdir is not None
    files = [package_defaults_path(), *sorted(cdir.glob("*.yaml"))]
    assert len(files) >= 4
    for path in files:
        assert json.dumps(load_yaml(path, required=True), sort_keys=True, default=str) == json.dumps(
            yaml.safe_load(path.read_text()) or {}, sort_keys=True, default=str), path


@pytest.fixture
def counted_reads(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[Path]:
    """Header reads done by the cache (the real reader, counted), with the cache in ``tmp_path/cache``."""
    from speedslurm.model import cache as ggufcache
    from speedslurm.model.gguf import read_gguf_info

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    reads: list[Path] = []

    def counting(path: Path) -> tp.Any:
        reads.append(path)
        return read_gguf_info(path)

    monkeypatch.setattr(ggufcache, "read_gguf_info", counting)
    return reads


def test_a_header_is_read_once_and_again_when_its_file_changes(tiny_gguf: Path, tmp_path: Path,
                                                               counted_reads: list[Path]) -> None:
    from speedslurm.model.cache import cached_gguf_info
    from speedslurm.model.gguf import read_gguf_info

    model = tmp_path / "m.gguf"
    shutil.copy(tiny_gguf, model)
    first = cached_gguf_info(model)
    assert first == read_gguf_info(model) and len(counted_reads) == 1
    again = cached_gguf_info(model)
    assert again == first and again.metadata == first.metadata and again.shards == (model,)
    assert len(counted_reads) == 1          # from the cache
    os.utime(model, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert cached_gguf_info(model) == first and len(counted_reads) == 2   # touched: read again
    model.write_bytes(model.read_bytes().replace(b"speedslurm-tiny-llama-", b"speedslurm-tiny-llamb-", 1))
    assert cached_gguf_info(model).name == first.name.replace("llama-", "llamb-", 1)   # rewritten: the new header
    assert len(counted_reads) == 3


def test_a_broken_or_unwritable_cache_only_costs_a_read(tiny_gguf: Path, tmp_path: Path,
                                                         counted_reads: list[Path],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from speedslurm.model.cache import cache_dir, cached_gguf_info

    good = cached_gguf_info(tiny_gguf)
    (entry,) = cache_dir().glob("*.json")
    entry.write_text('{"key": [1')                      # torn or edited by hand
    assert cached_gguf_info(tiny_gguf) == good and len(counted_reads) == 2
    assert cached_gguf_info(tiny_gguf) == good and len(counted_reads) == 2   # written again, whole
    monkeypatch.setenv("XDG_CACHE_HOME", str(entry))    # a file where the folder should be
    assert cached_gguf_info(tiny_gguf) == good and len(counted_reads) == 3


def test_a_missing_model_is_still_the_readers_error(tmp_path: Path, counted_reads: list[Path]) -> None:
    from speedslurm.errors import UsageError
    from speedslurm.model.cache import cached_gguf_info

    with pytest.raises(UsageError, match="does not exist"):
        cached_gguf_info(tmp_path / "absent.gguf")


def test_the_cache_keeps_only_the_entries_written_last(tiny_gguf: Path, tmp_path: Path, counted_reads: list[Path],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from speedslurm.model import cache as ggufcache

    monkeypatch.setattr(ggufcache, "KEEP", 2)
    models = [tmp_path / f"m{i}.gguf" for i in range(4)]
    written: set[Path] = set()
    past = time.time_ns() - 100 * 10**9
    for i, model in enumerate(models):
        shutil.copy(tiny_gguf, model)
        ggufcache.cached_gguf_info(model)
        # The entry just written gets a time of its own, one second after the one before and older than any
        # written next: the order is the order of writing, however many are written within the clock's tick.
        for entry in set(ggufcache.cache_dir().glob("*.json")) - written:
            os.utime(entry, ns=(past + i * 10**9, past + i * 10**9))
            written.add(entry)
    assert len(list(ggufcache.cache_dir().glob("*.json"))) == 2
    ggufcache.cached_gguf_info(models[-1])
    assert len(counted_reads) == 4          # the last model is still cached


def _counting_binaries(folder: Path, help_text: str = "--kv-unified  one KV cache for all slots") -> Path:
    """llama-server and ggml-rpc-server stand-ins that log each run (program and arguments) to ``runs.log``."""
    log = folder / "runs.log"
    for name, answer in (("llama-server", f'case "$1" in --version) echo "version: 7 (abc)" >&2;; '
                                          f'*) echo "{help_text}";; esac'),
                         ("ggml-rpc-server", 'echo "usage: rpc-server"')):
        (folder / name).write_text(f'#!/bin/sh\necho "$(basename "$0") $*" >> {log}\n{answer}\n')
        (folder / name).chmod(0o755)
    return log


def test_the_client_asks_each_binary_each_question_once(tmp_path: Path) -> None:
    from speedslurm.node.binaries import env_for, find_llama_binaries, kv_unified

    log = _counting_binaries(tmp_path)
    found = find_llama_binaries(tmp_path, path_env="")
    env = env_for(found)
    assert (env, found.version, kv_unified(found.llama_server, env)) == ({}, "7 (abc)", True)
    assert found.version == "7 (abc)" and env_for(found) == {}
    assert sorted(log.read_text().splitlines()) == [
        "ggml-rpc-server --help", "llama-server --help", "llama-server --version"]


def test_a_rebuilt_binary_is_asked_again(tmp_path: Path) -> None:
    from speedslurm.node.binaries import env_for, find_llama_binaries, kv_unified

    log = _counting_binaries(tmp_path)
    found = find_llama_binaries(tmp_path, path_env="")
    assert kv_unified(found.llama_server, env_for(found)) is True
    _counting_binaries(tmp_path, help_text="an older build without the flag")   # same path, new file
    again = find_llama_binaries(tmp_path, path_env="")
    assert kv_unified(again.llama_server, env_for(again)) is False
    assert len(log.read_text().splitlines()) == 6


@pytest.mark.parametrize(("help_text", "takes_fit"), [
    ("-fit,  --fit [on|off]   whether to adjust unset arguments to fit in device memory", True),
    ("-fitt, --fit-target MiB0,MiB1   target margin per device", False),
    ("--kv-unified  one KV cache for all slots", False),
])
def test_the_fitting_pass_is_turned_off_only_where_the_build_has_it(tmp_path: Path, help_text: str,
                                                                     takes_fit: bool) -> None:
    from speedslurm.node.binaries import env_for, find_llama_binaries, fit_flag

    _counting_binaries(tmp_path, help_text=help_text)
    found = find_llama_binaries(tmp_path, path_env="")
    assert fit_flag(found.llama_server, env_for(found)) is takes_fit


def test_each_command_is_found_in_the_module_that_defines_it() -> None:
    # `speedslurm up` imports only up's module; the table that says where each command lives must stay complete
    from speedslurm import cli

    cli._register()
    for name, command in cli.cli.commands.items():
        assert name in cli._COMMANDS, f"add {name!r} to speedslurm.cli._COMMANDS"
        defined_in = command.callback.__module__ if command.callback else ""
        subcommands = getattr(command, "commands", {}).values()
        modules = {defined_in, *(c.callback.__module__ for c in subcommands if c.callback)}
        assert f"speedslurm.cli.{cli._COMMANDS[name]}" in modules, (name, modules)


def test_a_command_loads_only_its_own_module() -> None:
    out = _run("import sys; from speedslurm.cli import main\n"
               "try:\n    main(['up', '--help'])\nexcept SystemExit:\n    pass\n"
               "print(sorted(m for m in sys.modules if m.startswith('speedslurm.cli.')))")
    assert out[-2] == "['speedslurm.cli.common', 'speedslurm.cli.deploy_cmds']"


def test_the_api_names_are_the_lazy_table() -> None:
    import speedslurm.api as api

    assert sorted(api.__all__) == sorted(api._WHERE)
    assert all(getattr(api, name) is not None for name in api.__all__)
