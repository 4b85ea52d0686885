"""Model resolution: a registry name or a path to a ``.gguf`` -> the files and the figures the planner needs.

Metadata is read with the ``gguf`` format (never the weights). A registry entry pinned to a ``host`` may
live on that node's local disk only; when the file is not readable here, the registry's recorded size and
architecture are used for planning and the job side checks the file on the node.
"""

from __future__ import annotations

import dataclasses
import os
import typing as tp
from pathlib import Path

from ..errors import UsageError
from ..settings.settings import ModelEntry, Settings


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A resolved model: what to pass to llama-server and what the planner counts."""

    name: str
    path: Path                 # the file llama-server opens (the first shard of a split model)
    files: tuple[Path, ...]    # every file of the model
    weights_bytes: int         # tensor bytes (or file bytes when only the registry's size is known)
    n_layer: int
    n_head_kv: int
    head_dim: int
    head_dim_v: int
    ctx: int                   # default context for this model
    host: str | None = None    # node holding the files on local disk; the leader is pinned there
    local: bool = True         # the files were read on this machine
    architecture: str | None = None
    file_type: str | None = None
    file_bytes: int | None = None
    chat_template: str | None = None  # passed to llama-server as --chat-template
    # Bytes per block, of the output layer and of the input embedding (from the header; empty when only the
    # registry's size is known): what the planner splits over the devices (see ggufinfo.GGUFInfo).
    layer_bytes: tuple[int, ...] = ()
    output_bytes: int = 0
    embd_bytes: int = 0
    tied_output: bool = False

    def kv_bytes(self, ctx: int, bytes_per_element: float = 2) -> int:
        """KV cache bytes = n_layer x ctx x n_head_kv x (head_dim_k + head_dim_v) x bytes per element."""
        return int(self.n_layer * ctx * self.n_head_kv * (self.head_dim + self.head_dim_v) * bytes_per_element)

    def to_json(self) -> dict[str, tp.Any]:
        data = dataclasses.asdict(self)
        data["path"] = str(self.path)
        data["files"] = [str(f) for f in self.files]
        return data


def _expand(path: str | os.PathLike[str]) -> Path:
    return Path(os.path.expanduser(os.path.expandvars(str(path))))


def resolve_model(settings: Settings, model: str) -> ModelSpec:
    """Resolve ``--model``: a registry name from settings, or a path to a GGUF file (first shard)."""
    entry = settings.models.get(model)
    if entry is not None:
        return _from_entry(model, entry)
    looks_like_path = model.endswith(".gguf") or os.sep in model or model.startswith(("~", "."))
    if not looks_like_path:
        known = ", ".join(sorted(settings.models)) or "(none configured)"
        raise UsageError(f"unknown model {model!r}; known models: {known}",
                         fix="pass one of the known names, or a path to a .gguf file "
                             "(`speedslurm models` lists the registry)")
    path = _expand(model)
    if not path.exists():
        raise UsageError(f"model file {path} does not exist",
                         fix="check the path, or download the model first (`speedslurm models pull NAME`)")
    return _from_file(path.stem, path, ctx=None, host=None)


def _from_file(name: str, path: Path, ctx: int | None, host: str | None) -> ModelSpec:
    from .cache import cached_gguf_info

    info = cached_gguf_info(path)
    return ModelSpec(
        name=name, path=info.path, files=tuple(info.shards) or (info.path,), weights_bytes=info.tensor_bytes,
        n_layer=info.n_layer, n_head_kv=info.n_head_kv, head_dim=info.head_dim, head_dim_v=info.head_dim_v,
        ctx=ctx or min(8192, info.context_length or 8192), host=host, local=True,
        architecture=info.architecture, file_type=info.file_type, file_bytes=info.file_bytes,
        layer_bytes=info.layer_bytes, output_bytes=info.output_bytes, embd_bytes=info.embd_bytes,
        tied_output=info.tied_output,
    )


def _from_entry(name: str, entry: ModelEntry) -> ModelSpec:
    paths = entry.paths
    if not paths:
        raise UsageError(f"model {name!r} lists no files", fix=f"add `files:` to models.{name} in your config")
    first = paths[0]
    if first.exists():
        return dataclasses.replace(_from_file(name, first, ctx=entry.ctx, host=entry.host),
                                   chat_template=entry.chat_template)
    if entry.host and entry.size_bytes and entry.arch:
        # The file lives on the host's local disk: plan from the registry's figures.
        return ModelSpec(
            name=name, path=first, files=tuple(paths), weights_bytes=int(entry.size_bytes),
            n_layer=entry.arch.n_layer, n_head_kv=entry.arch.n_head_kv, head_dim=entry.arch.head_dim,
            head_dim_v=entry.arch.head_dim, ctx=entry.ctx, host=entry.host, local=False,
            file_bytes=int(entry.size_bytes), chat_template=entry.chat_template,
        )
    raise UsageError(f"model {name!r}: file {first} does not exist",
                     fix=f"download it (`speedslurm models pull {name}`) or fix models.{name}.files in your config")


def model_rows(settings: Settings) -> list[dict[str, tp.Any]]:
    """One row per registry model: name, files, size on disk (None when absent here), description."""
    rows = []
    for name, entry in sorted(settings.models.items()):
        sizes = [p.stat().st_size if p.exists() else None for p in entry.paths]
        present = all(s is not None for s in sizes)
        rows.append({
            "name": name,
            "description": entry.description,
            "files": [str(p) for p in entry.paths],
            "present": present,
            "size_bytes": sum(s for s in sizes if s is not None) if present else entry.size_bytes,
            "ctx": entry.ctx,
            "host": entry.host,
        })
    return rows
