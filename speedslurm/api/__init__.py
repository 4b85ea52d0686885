"""The Python API: start a deployment, wait until it serves, talk to it, run batches through it, stop it.

Every command of the CLI is a thin layer over these functions (it parses flags, calls them and prints)::

    import speedslurm

    with speedslurm.start("Q4_K_S") as dep:          # submits, returns at once; stopped when the block ends
        dep.wait_ready(timeout=1800)                  # DeploymentFailed (with the log tail) if it cannot start
        client = dep.client()                         # an openai.OpenAI for the first ready replica
        summary = dep.run_batch([{"prompt": "Hello"}], out="results.jsonl")

Errors are the project's typed errors (:mod:`speedslurm.errors`): ``UsageError`` (bad input, nothing queued),
``DeploymentFailed``, ``SpeedslurmError``; each names the problem, and ``.fix`` says what to do. Settings come
from the same layers as the CLI's (``SPEEDSLURM_PROFILE``, ``SPEEDSLURM_CONFIG``, ``SPEEDSLURM_*``, the user's
config file); :func:`load_settings` gives them with a profile, a config file or ``KEY=VALUE`` overrides.
"""

from __future__ import annotations

import importlib
import typing as tp

if tp.TYPE_CHECKING:
    from .batches import batch_options, prepare_prompts, run_batch
    from .builds import Built, build_llama
    from .deployments import (
        Deployment,
        Stopped,
        connect,
        connect_running,
        deployment_source,
        list_deployments,
        load_settings,
        start,
        submit,
        up,
    )

# name -> submodule: each is imported when first used (``speedslurm up`` needs neither batches nor builds)
_WHERE = {"batch_options": "batches", "prepare_prompts": "batches", "run_batch": "batches",
          "Built": "builds", "build_llama": "builds",
          **{n: "deployments" for n in ("Deployment", "Stopped", "connect", "connect_running", "deployment_source",
                                         "list_deployments", "load_settings", "start", "submit", "up")}}

__all__ = ["Built", "Deployment", "Stopped", "batch_options", "build_llama", "connect", "connect_running",
           "deployment_source", "list_deployments", "load_settings", "prepare_prompts", "run_batch", "start",
           "submit", "up"]


def __getattr__(name: str) -> tp.Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
