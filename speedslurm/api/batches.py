"""Batches from Python: prompts from a JSONL file or a list of dicts, through a deployment or any endpoint
source; the run's summary comes back."""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import typing as tp
from pathlib import Path

from ..errors import UsageError

if tp.TYPE_CHECKING:
    from rich.console import Console

    from ..batch.runner import BatchOptions, PreparedBatch
    from ..batch.sources import EndpointSource
    from ..batch.summary import Summary
    from .deployments import Deployment

RunFn = tp.Callable[["EndpointSource", "PreparedBatch", "BatchOptions"], "Summary"]
Prompts = tp.Union[str, "os.PathLike[str]", tp.Iterable[tp.Mapping[str, tp.Any]]]


def batch_options(**flags: tp.Any) -> BatchOptions:
    """:class:`~speedslurm.batch.runner.BatchOptions` from keyword flags (max_tokens, temperature, system,
    concurrency, timeout, retries, skip_invalid, quiet, client, lock, outage, retry_suspected); an unknown name
    is a UsageError."""
    from ..batch.runner import BatchOptions

    names = {f.name for f in dataclasses.fields(BatchOptions)}
    unknown = sorted(set(flags) - names)
    if unknown:
        raise UsageError(f"unknown batch option(s): {', '.join(unknown)}", fix=f"use: {', '.join(sorted(names))}")
    return BatchOptions(**flags)


def prepare_prompts(prompts: Prompts, out: str | os.PathLike[str] | None,
                    options: BatchOptions) -> PreparedBatch:
    """Read and check the prompts (a JSONL file's path, or dicts) and open the results file (UsageError if bad).

    Dicts are request bodies as a prompts file holds them (``{"prompt": ...}``, ``{"messages": [...]}``, OpenAI
    Batch lines); they need ``out``. Running the same prompts into the same ``out`` again resumes."""
    from ..batch.runner import prepare_batch

    out_path = Path(out) if out is not None else None
    if isinstance(prompts, (str, os.PathLike)):
        return prepare_batch(prompts if isinstance(prompts, str) else Path(prompts), out_path, options)
    if out is None:
        raise UsageError("prompts given as a list need a results file",
                         fix='pass out="results.jsonl" (running the same prompts into it again resumes)')
    with tempfile.TemporaryDirectory(prefix="speedslurm-prompts-") as folder:
        path = Path(folder) / "prompts.jsonl"
        count = 0
        with open(path, "w", encoding="utf-8") as fh:
            for count, item in enumerate(prompts, 1):
                if not isinstance(item, tp.Mapping):
                    raise UsageError(f"prompt {count} is a {type(item).__name__}, not a dict",
                                     fix='give each prompt as a dict, e.g. {"prompt": "..."} or {"messages": [...]}')
                fh.write(json.dumps(item, ensure_ascii=False) + "\n")
        # prepare_batch copies the prompts into its own spool as it reads them: the file may go afterwards.
        try:
            prepared = prepare_batch(path, out_path, options)
        except UsageError as exc:
            exc.message = exc.message.replace(str(path), "prompt list")  # line N of the file: the list's Nth
            exc.args = (exc.message,)
            raise
    prepared.display = f"the {count} prompt(s) given"
    return prepared


def run_batch(source: EndpointSource | Deployment, prompts: Prompts, out: str | os.PathLike[str] | None = None, *,
              options: BatchOptions | None = None, console: Console | None = None, **flags: tp.Any) -> Summary:
    """Send ``prompts`` through ``source`` (a :class:`Deployment`, or any endpoint source) and return the run's
    :class:`~speedslurm.batch.summary.Summary` (ok, failed, skipped, tokens, throughput, latencies).

    Results are OpenAI Batch output lines appended to ``out`` (default: ``<prompts>.results.jsonl``); prompts
    with a successful line there already are skipped. ``flags`` (or ``options``) shape the run: max_tokens,
    temperature, system, concurrency, timeout, retries, skip_invalid, client, lock, quiet (default True: no
    progress bar), outage (seconds an unreachable replica is probed before it is given up, default 300),
    retry_suspected. Requests that failed are counted in ``summary.failed`` (their error lines are in ``out``);
    a run that cannot go on raises ``BatchFailed``, Ctrl-C ``BatchInterrupted`` (both carry ``.summary``). A
    request in flight on two replicas that died is suspected of crashing its server: it gets a
    ``suspected_crash`` error line, is not sent again, and later runs into the same ``out`` skip it
    (``summary.suspected``, ``summary.suspected_skipped``) unless ``retry_suspected=True``.
    """
    from ..batch.runner import run_batch as run

    if options is None:
        options = batch_options(**{"quiet": True, **flags})
    elif flags:
        raise UsageError(f"pass either options or flags, not both (got {', '.join(sorted(flags))})",
                         fix="put the flags into the BatchOptions")
    from . import deployments

    if isinstance(source, deployments.Deployment):
        source = deployments.deployment_source(source)
    prepared = prepare_prompts(prompts, out, options)
    try:
        return run(source, prepared, options, console)
    finally:
        prepared.close()


def run_prepared(source: EndpointSource, prepared: PreparedBatch, options: BatchOptions,
                 console: Console | None = None) -> Summary:
    """Run a batch already read (:func:`prepare_prompts`; the caller closes it) through ``source``; progress
    and replica messages go to ``console``. Raises as :func:`run_batch` does."""
    from ..batch.runner import run_batch as run

    return run(source, prepared, options, console)
