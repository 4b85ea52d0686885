"""speedslurm: run GGUF models across Slurm nodes with llama.cpp RPC and push prompt batches through them.

The Python API (:mod:`speedslurm.api`) is reachable from here: ``speedslurm.start(...)``, ``speedslurm.connect``,
``speedslurm.up``, ``speedslurm.submit``, ``speedslurm.run_batch``, ``speedslurm.load_settings``. It is imported on
first use, so ``import speedslurm`` stays cheap (the job side on a node imports this package too).
"""

from __future__ import annotations

import typing as tp

__version__ = "0.1.0"

_API = ("Deployment", "Stopped", "batch_options", "connect", "list_deployments", "load_settings", "run_batch",
        "start", "submit", "up")

__all__ = ["__version__", *_API]

if tp.TYPE_CHECKING:
    from .api import (  # noqa: F401
        Deployment,
        Stopped,
        batch_options,
        connect,
        list_deployments,
        load_settings,
        run_batch,
        start,
        submit,
        up,
    )


def __getattr__(name: str) -> tp.Any:
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'speedslurm' has no attribute {name!r}")
