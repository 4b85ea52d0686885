"""A second llama.cpp "build" for tests: a copy of the RPC server whose libggml-rpc carries another build-id."""

from __future__ import annotations

import os
import shutil
import typing as tp
from pathlib import Path


def patched_rpc_build(src: Path, dst: Path) -> Path:
    """Copy ``src``'s RPC server and ggml libraries to ``dst``, flipping libggml-rpc's GNU build-id."""
    from speedslurm.node.binaries import _elf_build_id

    dst.mkdir()
    for item in src.iterdir():
        if item.name == "ggml-rpc-server" or item.name.startswith("libggml"):
            if item.is_symlink():
                os.symlink(os.readlink(item), dst / item.name)
            else:
                shutil.copy2(item, dst / item.name)
    lib = (dst / "libggml-rpc.so").resolve()
    old = bytes.fromhex(tp.cast(str, _elf_build_id(lib)))
    data = lib.read_bytes()
    assert data.count(old) == 1
    lib.write_bytes(data.replace(old, bytes(b ^ 0xFF for b in old)))
    return dst
