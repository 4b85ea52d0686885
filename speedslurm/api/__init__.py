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
    from ..batch.prepare import BatchOptions as BatchOptions
    from ..batch.runner import BatchFailed as BatchFailed
    from ..batch.runner import BatchInterrupted as BatchInterrupted
    from ..batch.sources import EndpointSource as EndpointSource
    from ..batch.summary import Summary as Summary
    from ..deployments.status import ReplicaStatus as ReplicaStatus
    from ..settings.settings import Settings as Settings
    from .batches import batch_options, prepare_prompts, run_batch, run_prepared
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
    from .handover import HandoverSource, handover_source
    from .workflows import (
        Logs,
        Planned,
        Rendered,
        base_url_source,
        build_options,
        describe_settings,
        doctor,
        endpoint_file_source,
        executor_names,
        log_tail,
        logs,
        models,
        plan,
        pull_model,
        read_results,
        render,
        status_rows,
        statuses_probe,
        write_templates,
    )

# name -> the module that defines it, imported when the name is first used (``speedslurm up`` needs neither
# batches nor builds): the API's own modules, and the types and errors its functions take or raise
_WHERE = {"batch_options": ".batches", "prepare_prompts": ".batches", "run_batch": ".batches",
          "run_prepared": ".batches", "Built": ".builds", "build_llama": ".builds",
          **{n: ".deployments" for n in ("Deployment", "Stopped", "connect", "connect_running", "deployment_source",
                                          "list_deployments", "load_settings", "start", "submit", "up")},
          "HandoverSource": ".handover", "handover_source": ".handover",
          **{n: ".workflows" for n in ("Logs", "Planned", "Rendered", "base_url_source", "build_options",
                                        "describe_settings", "doctor", "endpoint_file_source", "executor_names", "log_tail",
                                        "logs",
                                        "models", "plan", "pull_model", "read_results", "render", "status_rows",
                                        "statuses_probe", "write_templates")},
          "BatchOptions": "..batch.prepare", "BatchFailed": "..batch.runner", "BatchInterrupted": "..batch.runner",
          "EndpointSource": "..batch.sources", "Summary": "..batch.summary", "ReplicaStatus": "..deployments.status",
          "Settings": "..settings.settings"}

__all__ = ["BatchFailed", "BatchInterrupted", "BatchOptions", "Built", "Deployment", "EndpointSource",
           "HandoverSource", "Logs", "Planned", "Rendered", "ReplicaStatus", "Settings", "Stopped",
           "Summary", "base_url_source", "batch_options", "build_llama", "build_options", "connect",
           "connect_running", "deployment_source", "describe_settings", "doctor", "endpoint_file_source",
           "executor_names", "handover_source", "list_deployments", "load_settings", "log_tail", "logs",
           "models", "plan", "prepare_prompts", "pull_model", "read_results", "render", "run_batch",
           "run_prepared", "start", "status_rows", "statuses_probe", "submit", "up", "write_templates"]


def __getattr__(name: str) -> tp.Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
