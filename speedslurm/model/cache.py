"""A model's header, read once: what :func:`speedslurm.model.gguf.read_gguf_info` found, kept in the user's cache.

Reading a header walks every string of the vocabulary (262,144 of them for Gemma 3) and loads gguf's type
tables: tens of milliseconds that ``plan``, ``up`` and ``submit`` would spend before submitting, each time, for
a file that does not change. The result is kept as JSON in ``$XDG_CACHE_HOME/speedslurm/gguf-headers/``
(``~/.cache/speedslurm/gguf-headers/``), one file per model path, and used only while every shard still has the
recorded path, size, modification time (ns), inode and device: a file replaced, rewritten or touched is read
again. A cache that cannot be read or written is ignored (the header is then read as usual); the newest
``KEEP`` entries written last are kept.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import typing as tp
import zlib
from pathlib import Path

from ..errors import UsageError
from .gguf import GGUFInfo, read_gguf_info, shard_paths

_FORMAT = 1
KEEP = 64   # entries kept in the cache folder


def cache_dir(environ: tp.Mapping[str, str] | None = None) -> Path:
    environ = os.environ if environ is None else environ
    base = environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "speedslurm" / "gguf-headers"


def _identity(path: Path) -> list[list[tp.Any]]:
    out = []
    for shard in shard_paths(path):
        st = shard.stat()
        out.append([str(shard), st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev])
    return out


def _fields() -> list[str]:
    return [f.name for f in dataclasses.fields(GGUFInfo)]


def _to_json(info: GGUFInfo) -> dict[str, tp.Any]:
    out: dict[str, tp.Any] = {}
    for name in _fields():
        value = getattr(info, name)
        if isinstance(value, Path):
            value = str(value)
        elif isinstance(value, tuple):
            value = [str(x) if isinstance(x, Path) else x for x in value]
        elif isinstance(value, tp.Mapping):
            value = dict(value)
        out[name] = value
    return out


def _from_json(data: dict[str, tp.Any]) -> GGUFInfo:
    hints = tp.get_type_hints(GGUFInfo)
    values: dict[str, tp.Any] = {}
    for name in _fields():
        value, hint = data[name], hints[name]
        if hint is Path:
            value = Path(value)
        elif tp.get_origin(hint) is tuple:
            value = tuple(Path(x) for x in value) if tp.get_args(hint)[0] is Path else tuple(value)
        values[name] = value
    return GGUFInfo(**values)


def _prune(folder: Path) -> None:
    """Keep the KEEP entries written last (models not read for long, or deleted, leave the cache)."""
    entries = sorted(folder.glob("*.json"), key=lambda p: p.stat().st_mtime_ns)
    for old in entries[:-KEEP]:
        old.unlink(missing_ok=True)


def cached_gguf_info(path: str | os.PathLike[str], environ: tp.Mapping[str, str] | None = None) -> GGUFInfo:
    """:func:`read_gguf_info`, from the cache while the file(s) are unchanged."""
    first = Path(path)
    try:
        identity = _identity(first)
    except (OSError, UsageError):   # missing shards and the like: the reader gives the error
        return read_gguf_info(first)
    key = [_FORMAT, _fields(), identity]
    entry = cache_dir(environ) / f"{zlib.crc32(str(first.absolute()).encode()):08x}.json"
    try:
        data = json.loads(entry.read_text())
        if data["key"] == json.loads(json.dumps(key)):
            return _from_json(data["info"])
    except (OSError, ValueError, TypeError, KeyError):
        pass
    info = read_gguf_info(first)
    tmp = entry.with_name(f".{entry.name}.{os.getpid()}")
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"key": key, "info": _to_json(info)}))
        os.replace(tmp, entry)   # readers see the old entry or the new one, never half of one
        _prune(entry.parent)
    except (OSError, ValueError):
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    return info
