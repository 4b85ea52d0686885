"""The end-of-run summary: counts, tokens, throughput, latency percentiles, per-replica counts."""

from __future__ import annotations

import dataclasses
import math
import typing as tp
from array import array

from rich.console import Console
from rich.table import Table
from rich.text import Text

if tp.TYPE_CHECKING:
    from ..rundir.records import Endpoint


def percentile(values: tp.Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100) with linear interpolation between closest ranks (numpy's default)."""
    n = len(values)
    if n == 0:
        return None
    ordered = sorted(values)
    pos = (n - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, n - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclasses.dataclass
class Summary:
    """What one run did. ``ok``/``failed`` count this run's requests, each custom_id once; ``skipped`` were
    already done in an earlier run; ``invalid`` are input lines that got an error line (``--skip-invalid``)."""

    results_path: str
    total: int = 0  # requests in the prompts file (valid lines)
    ok: int = 0
    failed: int = 0
    skipped: int = 0
    invalid: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    wall_s: float = 0.0
    retries: int = 0
    status: str = "completed"  # completed | interrupted | failed
    latencies: array[float] = dataclasses.field(default_factory=lambda: array("d"), repr=False)
    per_replica: dict[int, int] = dataclasses.field(default_factory=dict)
    failed_replicas: dict[int, str] = dataclasses.field(default_factory=dict)
    errors: dict[str, int] = dataclasses.field(default_factory=dict)  # error code -> count
    # Requests suspected of crashing their server (in flight on two replicas that died): marked in this run
    # (counted in ``failed``) or by an earlier one and not sent (``suspected_skipped``; --retry-suspected sends them).
    suspected: list[str] = dataclasses.field(default_factory=list)
    suspected_skipped: int = 0
    # The node-hours (GPU-hours) its deployment held over the run, and their source (speedslurm.deployments.nodehours).
    usage: dict[str, tp.Any] | None = None
    # The deployments that served it (one, or several when one handed over to a successor before its time
    # limit): per deployment its id, job ids, replicas (as the run numbers them), requests served, and when it was
    # submitted, ready, drained and cancelled (epoch seconds, None: not reached or not known). Empty for servers
    # given by URL.
    deployments: list[dict[str, tp.Any]] = dataclasses.field(default_factory=list)

    @property
    def remaining(self) -> int:
        """Requests without a successful line after this run (to send on resume)."""
        return self.total - self.ok - self.skipped

    @property
    def completion_tok_s(self) -> float:
        return self.completion_tokens / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def requests_s(self) -> float:
        return (self.ok + self.failed) / self.wall_s if self.wall_s > 0 else 0.0

    def latency(self, q: float) -> float | None:
        return percentile(self.latencies, q)

    def to_json(self) -> dict[str, tp.Any]:
        p50, p95 = self.latency(50), self.latency(95)
        return {
            "status": self.status,
            "results": self.results_path,
            "requests": {"total": self.total, "ok": self.ok, "failed": self.failed, "skipped": self.skipped,
                         "invalid": self.invalid, "remaining": self.remaining},
            "tokens": {"prompt": self.prompt_tokens, "completion": self.completion_tokens},
            "completion_tok_s": round(self.completion_tok_s, 2),
            "requests_s": round(self.requests_s, 2),
            "latency_s": {"p50": None if p50 is None else round(p50, 4),
                          "p95": None if p95 is None else round(p95, 4)},
            "wall_s": round(self.wall_s, 3),
            "retries": self.retries,
            "errors": dict(sorted(self.errors.items())),
            "suspected": {"ids": list(self.suspected), "skipped": self.suspected_skipped},
            "replicas": {str(r): n for r, n in sorted(self.per_replica.items())},
            "failed_replicas": {str(r): why for r, why in sorted(self.failed_replicas.items())},
            "node_hours": self.usage["node_hours"] if self.usage else None,
            "gpu_hours": self.usage["gpu_hours"] if self.usage else None,
            "node_hours_source": self.usage["node_hours_source"] if self.usage else None,
            "deployments": [{**d, "served": self.served_by(d)} for d in self.deployments],
        }

    def suspected_line(self) -> str:
        """The requests suspected of crashing their server, and what becomes of them."""
        n = len(self.suspected)
        shown = ", ".join(self.suspected[:10]) + (f" and {n - 10} more" if n > 10 else "")
        return (f"{shown}: {'each was' if n > 1 else 'it was'} in flight on 2 replicas that died; not sent again "
                "(--retry-suspected sends them)")

    def served_by(self, deployment: dict[str, tp.Any]) -> int:
        """Requests answered by one of :attr:`deployments`."""
        return sum(self.per_replica.get(r, 0) for r in deployment.get("replicas", ()))

    def render(self, console: Console) -> None:
        """Print the summary as a small table."""
        p50, p95 = self.latency(50), self.latency(95)
        table = Table(title=f"Batch {self.status}", show_header=False, box=None, pad_edge=False)
        table.add_column(style="bold")
        table.add_column()

        def add(*cells: str | Text) -> None:  # Text cells: nothing in them (a path, a reason) is read as markup
            table.add_row(*(c if isinstance(c, Text) else Text(c) for c in cells))

        add("requests", f"{self.ok} ok, {self.failed} failed, {self.skipped} skipped (done earlier)"
            + (f", {self.invalid} invalid lines" if self.invalid else "") + f" of {self.total}")
        add("tokens", f"{self.prompt_tokens} prompt, {self.completion_tokens} completion")
        add("throughput", f"{self.completion_tok_s:.1f} completion tok/s, {self.requests_s:.1f} requests/s")
        add("latency", "-" if p50 is None else f"p50 {p50:.3f} s, p95 {tp.cast(float, p95):.3f} s")
        add("wall time", f"{self.wall_s:.1f} s")
        if self.per_replica:
            add("replicas", ", ".join(f"r{r}: {n}" for r, n in sorted(self.per_replica.items())))
        for d in self.deployments:
            add(f"deployment {d['id']}", _deployment_line(d, self.served_by(d)))
        for r, why in sorted(self.failed_replicas.items()):
            add(f"replica r{r}", Text.assemble(("failed", "red"), f": {why}"))
        if self.errors:
            add("errors", ", ".join(f"{code}: {n}" for code, n in sorted(self.errors.items())))
        if self.suspected:
            add("suspected", self.suspected_line())
        if self.usage:
            gpu = self.usage["gpu_hours"]
            add("node-hours", f"{self.usage['node_hours']:.3f}"
                + (f" ({gpu:.3f} GPU-hours)" if gpu is not None else "")
                + f", from {self.usage['node_hours_source']}")
        add("results", self.results_path)
        console.print(table)


def deployments_of(endpoints: tp.Iterable[Endpoint]) -> list[dict[str, tp.Any]]:
    """:attr:`Summary.deployments` from the endpoints of the replicas a run used, for a source that does not
    name its deployments itself: one entry per deployment id, in the order first seen (none for a server given
    by URL, whose endpoint names no deployment)."""
    out: dict[str, dict[str, tp.Any]] = {}
    for ep in endpoints:
        if not ep.deployment_id:
            continue
        d = out.setdefault(ep.deployment_id, {"id": ep.deployment_id, "job_ids": [], "replicas": [],
                                              "submitted_at": None, "ready_at": None, "drained_at": None,
                                              "cancelled_at": None})
        if ep.job_id and ep.job_id not in d["job_ids"]:
            d["job_ids"].append(ep.job_id)
        if ep.replica not in d["replicas"]:
            d["replicas"].append(ep.replica)
        if ep.ready_at and (d["ready_at"] is None or ep.ready_at < d["ready_at"]):
            d["ready_at"] = ep.ready_at
    for d in out.values():
        d["replicas"].sort()
    return list(out.values())


def _deployment_line(d: dict[str, tp.Any], served: int) -> str:
    """One deployment of the run: its replicas, what it served, and when each step happened (local time)."""
    import time

    steps = [f"{word} {time.strftime('%H:%M:%S', time.localtime(d[key]))}"
             for key, word in (("submitted_at", "submitted"), ("ready_at", "ready"), ("drained_at", "drained"),
                               ("cancelled_at", "cancelled")) if d.get(key)]
    reps = ", ".join(f"r{r}" for r in d.get("replicas", ()))
    return f"{reps}: {served} served; " + ", ".join(steps)
