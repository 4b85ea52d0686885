"""GGUF metadata: shape, sizes, split models and bad input."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from devtools.testmodels import write_tiny_llama_gguf
from speedslurm.errors import UsageError
from speedslurm.model.gguf import gguf_info_from_fields, read_gguf_info, shard_paths

GiB = 2**30


def test_tiny_model_shape(tiny_gguf: Path) -> None:
    info = read_gguf_info(tiny_gguf)
    assert info.architecture == "llama"
    assert (info.n_layer, info.n_head, info.n_head_kv, info.n_embd) == (8, 8, 4, 128)
    assert (info.head_dim, info.head_dim_v) == (16, 16)
    assert info.context_length == 2048
    assert info.n_vocab == 512
    assert info.file_type == "F16"
    assert info.split_count == 1 and info.shards == (tiny_gguf,)
    assert info.n_tensors == 3 + 9 * 8
    assert info.file_bytes == tiny_gguf.stat().st_size
    assert info.name is not None and info.name.startswith("speedslurm-tiny-llama-")


def test_tensor_bytes_agree_with_gguf_reader(tiny_gguf: Path) -> None:
    from gguf import GGUFReader

    reader = GGUFReader(tiny_gguf)
    info = read_gguf_info(tiny_gguf)
    assert info.tensor_bytes == sum(int(t.n_bytes) for t in reader.tensors)
    assert info.n_tensors == len(reader.tensors)
    assert 0 < info.file_bytes - info.tensor_bytes < 64 * 1024  # header and alignment only


def test_f32_model_file_type(tmp_path: Path) -> None:
    info = read_gguf_info(write_tiny_llama_gguf(tmp_path / "f32.gguf", n_layer=2, dtype="f32"))
    assert info.file_type == "F32"
    assert info.n_layer == 2


def test_not_gguf(tmp_path: Path) -> None:
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    with pytest.raises(UsageError, match=r"model.gguf is not a GGUF file \(bad magic\)") as err:
        read_gguf_info(bad)
    assert err.value.exit_code == 2


def test_tiny_non_gguf_file(tmp_path: Path) -> None:
    bad = tmp_path / "x.gguf"
    bad.write_text("hi\n")
    with pytest.raises(UsageError, match="bad magic"):
        read_gguf_info(bad)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="does not exist"):
        read_gguf_info(tmp_path / "absent.gguf")


def test_directory_is_not_a_model(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="is not a file"):
        read_gguf_info(tmp_path)


def test_truncated_header(tmp_path: Path, tiny_gguf: Path) -> None:
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_gguf.read_bytes()[:2000])
    with pytest.raises(UsageError, match="truncated"):
        read_gguf_info(cut)


@pytest.fixture(scope="module")
def split_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama_gguf(tmp_path_factory.mktemp("split") / "tiny.gguf", split_max_tensors=30)


def test_split_model_sums_all_shards(split_model: Path, tiny_gguf: Path) -> None:
    assert split_model.name == "tiny-00001-of-00003.gguf"
    info = read_gguf_info(split_model)
    whole = read_gguf_info(tiny_gguf)
    assert info.split_count == 3
    assert [s.name for s in info.shards] == [f"tiny-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    assert info.tensor_bytes == whole.tensor_bytes
    assert info.n_tensors == whole.n_tensors
    assert info.file_bytes == sum(s.stat().st_size for s in info.shards)
    assert (info.n_layer, info.n_head_kv, info.n_vocab) == (whole.n_layer, whole.n_head_kv, whole.n_vocab)


def test_split_model_needs_first_shard(split_model: Path) -> None:
    second = split_model.with_name("tiny-00002-of-00003.gguf")
    with pytest.raises(UsageError, match="shard 2 of 3; pass the first shard") as err:
        read_gguf_info(second)
    assert "tiny-00001-of-00003.gguf" in (err.value.fix or "")


def test_split_model_missing_shard(split_model: Path, tmp_path: Path) -> None:
    for i in (1, 2):
        shutil.copy(split_model.with_name(f"tiny-0000{i}-of-00003.gguf"), tmp_path)
    with pytest.raises(UsageError, match=r"missing 1 of 3 shards: tiny-00003-of-00003.gguf"):
        read_gguf_info(tmp_path / "tiny-00001-of-00003.gguf")


def test_split_model_renamed_is_caught(split_model: Path, tmp_path: Path) -> None:
    renamed = tmp_path / "renamed.gguf"
    shutil.copy(split_model, renamed)
    with pytest.raises(UsageError, match="split into 3 files"):
        read_gguf_info(renamed)


def test_shard_paths_of_a_plain_file(tmp_path: Path) -> None:
    assert shard_paths(tmp_path / "model.gguf") == [tmp_path / "model.gguf"]


def test_from_fields_llama_70b() -> None:
    info = gguf_info_from_fields(n_layer=80, n_head=64, n_head_kv=8, n_embd=8192, head_dim=128,
                                 tensor_bytes=40 * GiB, file_type="Q4_K_S")
    assert info.kv_cache_bytes(8192) == int(2.5 * GiB)  # f16 K and V, 80 layers, 8 KV heads
    assert info.file_bytes == info.tensor_bytes
    assert info.head_dim_v == 128


def test_from_fields_defaults() -> None:
    info = gguf_info_from_fields(n_layer=2, n_head=4, n_embd=256, tensor_bytes=1)
    assert (info.n_head_kv, info.head_dim) == (4, 64)
