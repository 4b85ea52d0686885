"""Read a GGUF model's shape and size from its header, without touching the weights.

The header is parsed directly from a memory map, using the ``gguf`` package's type tables
(value types, quantisation block sizes, file types). ``gguf.GGUFReader`` is not used on purpose: it
builds a numpy view for every element of every array field, which takes about 10 s for a model with a
262k-token vocabulary; this parser skips arrays and reads such a header in a few tens of milliseconds.

A model split into shards (``name-00001-of-00003.gguf`` ...) is read from its first shard; the other
shards are found next to it, and their tensor bytes and file sizes are added up.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import mmap
import os
import re
import struct
import sys
import types
import typing as tp
from pathlib import Path

from ..errors import UsageError

__all__ = ["GGUFInfo", "read_gguf_info", "gguf_info_from_fields", "shard_paths"]

_MAGIC = b"GGUF"
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.")
_SHARD_RE = re.compile(r"^(?P<stem>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
# GGUF value type id -> struct format of one scalar (strings and arrays handled apart).
_SCALAR_FMT = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9

Scalar = int | float | bool | str


def gguf_constants() -> types.ModuleType:
    """The ``gguf`` package's ``constants`` module (type tables), loaded without the package's ``__init__``.

    ``import gguf.constants`` first runs ``gguf/__init__.py``, which imports numpy, the writer, the vocabulary
    and metadata tools: about 170 ms where ``constants.py`` alone takes about 20 ms, and every command that
    reads a header (``plan``, ``up``) pays it before submitting. ``constants.py`` imports only the standard
    library, so it is loaded from its file under a private name; where that file cannot be found (an unusual
    installation), the package is imported as usual.
    """
    name = "speedslurm._gguf_constants"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec("gguf")   # finds the package without running its __init__
    locations = list(spec.submodule_search_locations or []) if spec else []
    path = Path(locations[0]) / "constants.py" if locations else None
    file_spec = importlib.util.spec_from_file_location(name, path) if path and path.is_file() else None
    if file_spec is None or file_spec.loader is None:
        import gguf.constants

        return gguf.constants
    module = importlib.util.module_from_spec(file_spec)
    sys.modules[name] = module
    try:
        file_spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


@dataclasses.dataclass(frozen=True)
class GGUFInfo:
    """What sizing a deployment needs to know about a GGUF model (all shards together)."""

    path: Path                   # the file to pass to llama-server (first shard of a split model)
    architecture: str
    name: str | None
    n_layer: int
    n_head: int
    n_head_kv: int
    n_embd: int
    head_dim: int                # per-head size of K
    head_dim_v: int              # per-head size of V
    context_length: int          # training context
    file_type: str | None        # quantisation name, e.g. "Q4_K_M"
    tensor_bytes: int            # sum of all tensors' sizes, all shards
    file_bytes: int              # sum of all shards' file sizes
    n_tensors: int
    n_vocab: int
    split_count: int = 1
    shards: tuple[Path, ...] = ()
    metadata: tp.Mapping[str, Scalar] = dataclasses.field(default_factory=dict, repr=False, compare=False)
    # Where the bytes sit, as llama.cpp places them: block i (``blk.i.*``) on its layer's device; the output
    # layer (``output.weight``, ``output_norm`` and any other tensor outside the blocks) after the last block;
    # the input embedding (``token_embd``) on the host. A model without ``output.weight`` ties it to the
    # embedding, which llama.cpp then duplicates onto the output layer's device (``output_bytes`` counts it).
    layer_bytes: tuple[int, ...] = ()
    output_bytes: int = 0
    embd_bytes: int = 0
    tied_output: bool = False

    def kv_cache_bytes(self, n_ctx: int, bytes_per_element: float = 2) -> int:
        """Bytes of K and V cache for ``n_ctx`` tokens in total (f16 by default)."""
        per_token = self.n_layer * self.n_head_kv * (self.head_dim + self.head_dim_v)
        return int(per_token * n_ctx * bytes_per_element)


def gguf_info_from_fields(*, n_layer: int, n_head: int, n_embd: int, tensor_bytes: int,
                          n_head_kv: int | None = None, head_dim: int | None = None,
                          head_dim_v: int | None = None, context_length: int = 8192,
                          architecture: str = "llama", name: str | None = None,
                          file_type: str | None = None, n_vocab: int = 32000, n_tensors: int = 0,
                          file_bytes: int | None = None, split_count: int = 1,
                          path: str | os.PathLike[str] = "model.gguf") -> GGUFInfo:
    """Build a :class:`GGUFInfo` from plain numbers (for planning without a file).

    Example, Llama-3.1-70B Q4_K_S: ``gguf_info_from_fields(n_layer=80, n_head=64, n_head_kv=8,
    n_embd=8192, head_dim=128, tensor_bytes=40 * 2**30)``.
    """
    hd = head_dim if head_dim is not None else n_embd // n_head
    return GGUFInfo(
        path=Path(path), architecture=architecture, name=name, n_layer=n_layer, n_head=n_head,
        n_head_kv=n_head_kv if n_head_kv is not None else n_head, n_embd=n_embd, head_dim=hd,
        head_dim_v=head_dim_v if head_dim_v is not None else hd, context_length=context_length,
        file_type=file_type, tensor_bytes=tensor_bytes,
        file_bytes=file_bytes if file_bytes is not None else tensor_bytes, n_tensors=n_tensors,
        n_vocab=n_vocab, split_count=split_count, shards=(Path(path),),
    )


@dataclasses.dataclass
class _Header:
    kv: dict[str, Scalar]
    array_len: dict[str, int]
    tensor_bytes: int
    n_tensors: int
    tensor_type_bytes: dict[int, int]
    layer_bytes: dict[int, int] = dataclasses.field(default_factory=dict)
    other_bytes: int = 0            # output norm and other tensors outside the blocks
    embd_bytes: int = 0
    output_weight_bytes: int | None = None   # None: no output.weight in this file


class _Parser:
    """Sequential reader over a memory-mapped GGUF header."""

    def __init__(self, buf: tp.Any, path: Path) -> None:
        self.buf, self.path, self.off = buf, path, 0
        self.endian = "<"

    def _unpack(self, fmt: str) -> tp.Any:
        size = struct.calcsize(fmt)
        if self.off + size > len(self.buf):
            raise UsageError(f"{self.path} is truncated or not a valid GGUF file (header runs past the end)")
        (val,) = struct.unpack_from(self.endian + fmt, self.buf, self.off)
        self.off += size
        return val

    def _string(self) -> str:
        n = self._unpack("Q")
        raw = self.buf[self.off:self.off + n]
        if len(raw) != n:
            raise UsageError(f"{self.path} is truncated or not a valid GGUF file (string runs past the end)")
        self.off += n
        return bytes(raw).decode("utf-8", errors="replace")

    def _skip_strings(self, count: int) -> None:
        # Only the lengths matter; walking them is much cheaper than decoding.
        buf, off = self.buf, self.off
        unpack = struct.Struct(self.endian + "Q").unpack_from   # a compiled Struct: about 1/3 faster per item
        for _ in range(count):
            off += 8 + unpack(buf, off)[0]
        if off > len(buf):
            raise UsageError(f"{self.path} is truncated or not a valid GGUF file (array runs past the end)")
        self.off = off

    def _value(self, vtype: int) -> tuple[Scalar | None, int | None]:
        """Return (scalar or None, array length or None); arrays are skipped except short int ones."""
        if vtype == _STRING:
            return self._string(), None
        if vtype in _SCALAR_FMT:
            return self._unpack(_SCALAR_FMT[vtype]), None
        if vtype != _ARRAY:
            raise UsageError(f"{self.path}: unknown GGUF value type {vtype} at byte {self.off}")
        itype, count = self._unpack("I"), self._unpack("Q")
        if itype == _STRING:
            self._skip_strings(count)
        elif itype in _SCALAR_FMT:
            size = struct.calcsize(_SCALAR_FMT[itype])
            if itype in (4, 5) and count <= 4096:
                # Per-layer int arrays (e.g. head_count_kv on some models): keep their maximum.
                vals = struct.unpack_from(f"{self.endian}{count}{_SCALAR_FMT[itype]}", self.buf, self.off)
                self.off += size * count
                return (max(vals) if vals else 0), count
            self.off += size * count
        elif itype == _ARRAY:
            for _ in range(count):
                self._value(_ARRAY)
        else:
            raise UsageError(f"{self.path}: unknown GGUF array item type {itype}")
        return None, count

    def parse(self) -> _Header:
        consts = gguf_constants()
        GGML_QUANT_SIZES, GGMLQuantizationType = consts.GGML_QUANT_SIZES, consts.GGMLQuantizationType

        if bytes(self.buf[:4]) != _MAGIC:
            raise UsageError(f"{self.path} is not a GGUF file (bad magic)",
                             fix="pass a .gguf model file (llama.cpp format)")
        self.off = 4
        version = self._unpack("I")
        if version & 0xFFFF == 0:  # written big-endian
            self.endian, self.off = ">", 4
            version = self._unpack("I")
        if version < 2:
            raise UsageError(f"{self.path} is GGUF version {version}, which is too old to read",
                             fix="convert it again with a current llama.cpp")
        n_tensors, n_kv = self._unpack("Q"), self._unpack("Q")
        kv: dict[str, Scalar] = {}
        array_len: dict[str, int] = {}
        for _ in range(n_kv):
            key = self._string()
            val, alen = self._value(self._unpack("I"))
            if val is not None:
                kv[key] = val
            if alen is not None:
                array_len[key] = alen
        total = 0
        by_type: dict[int, int] = {}
        layers: dict[int, int] = {}
        other = embd = 0
        output: int | None = None
        for _ in range(n_tensors):
            name = self._string()
            n_dims = self._unpack("I")
            n_el = 1
            for _ in range(n_dims):
                n_el *= self._unpack("Q")
            ttype = self._unpack("I")
            self._unpack("Q")  # data offset
            try:
                block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ttype)]
            except (ValueError, KeyError):
                raise UsageError(f"{self.path} uses tensor type {ttype}, unknown to the installed gguf package",
                                 fix="upgrade it: pip install -U gguf") from None
            nbytes = n_el // block * type_size
            total += nbytes
            by_type[ttype] = by_type.get(ttype, 0) + nbytes
            m = _BLOCK_RE.match(name)
            if m:
                layers[int(m[1])] = layers.get(int(m[1]), 0) + nbytes
            elif name == "token_embd.weight":
                embd += nbytes
            elif name == "output.weight":
                output = (output or 0) + nbytes
            else:
                other += nbytes
        return _Header(kv, array_len, total, n_tensors, by_type, layers, other, embd, output)


def _read_header(path: Path) -> _Header:
    if not path.exists():
        raise UsageError(f"model file {path} does not exist", fix="check the path or the model name")
    if not path.is_file():
        raise UsageError(f"{path} is not a file", fix="pass a .gguf model file")
    with path.open("rb") as fh:
        if os.fstat(fh.fileno()).st_size < 24:
            raise UsageError(f"{path} is not a GGUF file (bad magic)", fix="pass a .gguf model file")
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            try:
                return _Parser(mm, path).parse()
            except struct.error:
                raise UsageError(f"{path} is truncated or not a valid GGUF file (header runs past the end)",
                                 fix="download or copy the file again") from None


def shard_paths(path: str | os.PathLike[str]) -> list[Path]:
    """All shards of the model whose first shard is ``path`` (just ``[path]`` when not split).

    Raises :class:`UsageError` if a shard is missing or ``path`` is not the first shard.
    """
    p = Path(path)
    m = _SHARD_RE.match(p.name)
    if not m:
        return [p]
    no, count = int(m["no"]), int(m["count"])
    if no != 1:
        first = p.with_name(f"{m['stem']}-00001-of-{m['count']}.gguf")
        raise UsageError(f"{p} is shard {no} of {count}; pass the first shard", fix=f"use {first}")
    shards = [p.with_name(f"{m['stem']}-{i:05d}-of-{m['count']}.gguf") for i in range(1, count + 1)]
    missing = [s.name for s in shards if not s.exists()]
    if missing and p.exists():
        raise UsageError(f"split model {p.name} is missing {len(missing)} of {count} shards: {', '.join(missing)}",
                         fix=f"put all shards in {p.parent}")
    return shards


def _file_type_name(kv: tp.Mapping[str, Scalar], by_type: dict[int, int]) -> str | None:
    consts = gguf_constants()
    GGMLQuantizationType, LlamaFileType = consts.GGMLQuantizationType, consts.LlamaFileType

    ft = kv.get("general.file_type")
    if isinstance(ft, int) and not isinstance(ft, bool):
        try:
            return LlamaFileType(ft).name.removeprefix("MOSTLY_").removeprefix("ALL_")
        except ValueError:
            return f"file_type {ft}"
    if by_type:  # no file_type key: name it after the type holding most bytes
        ttype = max(by_type, key=lambda t: by_type[t])
        try:
            return GGMLQuantizationType(ttype).name
        except ValueError:
            return None
    return None


def _int(kv: tp.Mapping[str, Scalar], key: str, default: int | None = None) -> int:
    val = kv.get(key, default)
    if val is None or isinstance(val, (str, float)):
        raise KeyError(key)
    return int(val)


def read_gguf_info(path: str | os.PathLike[str]) -> GGUFInfo:
    """Read a GGUF model's metadata (every shard of a split model); no tensor data is read."""
    first = Path(path).expanduser()
    shards = shard_paths(first)
    head = _read_header(first)
    kv = head.kv
    split_count = int(kv.get("split.count", 1))
    if split_count > 1 and len(shards) != split_count:
        raise UsageError(f"{first} says it is split into {split_count} files, but its name does not follow "
                         "NAME-00001-of-0000N.gguf, so the other shards cannot be found",
                         fix="keep the shard names llama.cpp's gguf-split wrote")
    tensor_bytes, n_tensors, by_type = head.tensor_bytes, head.n_tensors, dict(head.tensor_type_bytes)
    layers, other, embd, output = dict(head.layer_bytes), head.other_bytes, head.embd_bytes, head.output_weight_bytes
    for shard in shards[1:]:
        h = _read_header(shard)
        tensor_bytes += h.tensor_bytes
        n_tensors += h.n_tensors
        for t, b in h.tensor_type_bytes.items():
            by_type[t] = by_type.get(t, 0) + b
        for i, b in h.layer_bytes.items():
            layers[i] = layers.get(i, 0) + b
        other += h.other_bytes
        embd += h.embd_bytes
        if h.output_weight_bytes is not None:
            output = (output or 0) + h.output_weight_bytes
    arch = kv.get("general.architecture")
    if not isinstance(arch, str):
        raise UsageError(f"{first} has no general.architecture key; it is not a llama.cpp model file")
    a = arch
    try:
        n_layer = _int(kv, f"{a}.block_count")
        n_embd = _int(kv, f"{a}.embedding_length")
        n_head = _int(kv, f"{a}.attention.head_count")
    except KeyError as exc:
        raise UsageError(f"{first} ({arch}) lacks the metadata key {exc.args[0]}; cannot size it") from None
    n_head_kv = _int(kv, f"{a}.attention.head_count_kv", n_head)
    head_dim = _int(kv, f"{a}.attention.key_length", n_embd // max(n_head, 1))
    head_dim_v = _int(kv, f"{a}.attention.value_length", head_dim)
    n_vocab = head.array_len.get("tokenizer.ggml.tokens") or _int(kv, f"{a}.vocab_size", 0)
    name = kv.get("general.name")
    return GGUFInfo(
        path=first, architecture=arch, name=name if isinstance(name, str) else None,
        n_layer=n_layer, n_head=n_head, n_head_kv=n_head_kv, n_embd=n_embd,
        head_dim=head_dim, head_dim_v=head_dim_v,
        context_length=_int(kv, f"{a}.context_length", 0),
        file_type=_file_type_name(kv, by_type), tensor_bytes=tensor_bytes,
        file_bytes=sum(s.stat().st_size for s in shards), n_tensors=n_tensors, n_vocab=n_vocab,
        split_count=max(split_count, len(shards)), shards=tuple(shards), metadata=dict(kv),
        layer_bytes=tuple(layers.get(i, 0) for i in range(n_layer)),
        output_bytes=other + (embd if output is None else output), embd_bytes=embd, tied_output=output is None,
    )
