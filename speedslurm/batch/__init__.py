"""Batch inference: stream a JSONL prompts file through every ready replica, append OpenAI Batch result lines.

Public API (see :mod:`speedslurm.batch.runner` for the behaviour)::

    prepared = prepare_batch(prompts_path, out_path, options)    # validates; UsageError before anything is sent
    summary = run_batch(source, prepared, options, console)      # BatchFailed (1) / BatchInterrupted (130)
    prepared.close()
"""

from __future__ import annotations

from .inputs import RequestDefaults, scan_prompts
from .results import ResultsFile, final_view
from .runner import (
    BatchFailed,
    BatchInterrupted,
    BatchOptions,
    PreparedBatch,
    prepare_batch,
    run_batch,
    run_batch_async,
)
from .sources import EndpointSource, RunDirSource, SourceState, StaticSource
from .summary import Summary, percentile

__all__ = [
    "BatchFailed", "BatchInterrupted", "BatchOptions", "EndpointSource", "PreparedBatch", "RequestDefaults",
    "ResultsFile", "RunDirSource", "SourceState", "StaticSource", "Summary", "final_view", "percentile",
    "prepare_batch", "run_batch", "run_batch_async", "scan_prompts",
]
