"""What the gateway counts: per alias and key requests, tokens and errors; wait and latency histograms; node-hours.

:class:`Usage` holds the counters that go on across restarts (``usage.json``); :func:`prometheus` writes them,
with the pool's gauges, in Prometheus' text format for ``GET /metrics``.
"""

from __future__ import annotations

import bisect
import typing as tp

# Seconds: a request's wait for a replica (a cold start takes minutes) and its time to the answer.
WAIT_BUCKETS = (0.001, 0.005, 0.025, 0.1, 0.5, 1, 5, 30, 60, 300, 900)
LATENCY_BUCKETS = (0.005, 0.025, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
COUNTS = ("requests", "prompt_tokens", "completion_tokens", "errors")
RETIRED_KEPT = 1000  # ended replicas remembered, so that a request finishing after its replica ended adds no entry


class Histogram:
    def __init__(self, bounds: tp.Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0
        self.n = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.n += 1

    def to_json(self) -> dict[str, tp.Any]:
        return {"counts": self.counts, "sum": self.sum, "n": self.n}

    @classmethod
    def load(cls, bounds: tp.Sequence[float], data: tp.Any) -> Histogram:
        """The histogram saved by :meth:`to_json`; an empty one for anything else (other buckets, damage)."""
        h = cls(bounds)
        counts = data.get("counts") if isinstance(data, dict) else None
        if isinstance(counts, list) and len(counts) == len(h.counts) and all(
                isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts):
            h.counts, h.sum, h.n = list(counts), _number(data.get("sum")), sum(counts)
        return h

    def lines(self, name: str, labels: str) -> list[str]:
        out, running = [], 0
        for bound, count in zip(self.bounds, self.counts, strict=False):
            running += count
            out.append(f'{name}_bucket{{{labels},le="{bound:g}"}} {running}')
        out.append(f'{name}_bucket{{{labels},le="+Inf"}} {self.n}')
        out.append(f"{name}_sum{{{labels}}} {self.sum:.6f}")
        out.append(f"{name}_count{{{labels}}} {self.n}")
        return out


def _zero() -> dict[str, float]:
    return {c: 0 for c in COUNTS}


UNUSED = "(unused)"  # node-hours of replicas that served no token: nobody's share


class Usage:
    """Counters by (alias, key name), node-seconds by alias and by key; :meth:`to_json` / :meth:`load` for
    ``usage.json``.

    A key's node-hours are its share of each replica's: the replica's node-seconds times the key's share of the
    tokens that replica served (``replicas``: the live ones, folded into ``key_node_seconds`` when they end)."""

    def __init__(self) -> None:
        self.by: dict[tuple[str, str], dict[str, float]] = {}
        self.codes: dict[tuple[str, str, int], int] = {}
        self.node_seconds: dict[str, float] = {}
        self.key_node_seconds: dict[str, float] = {}
        self.replicas: dict[str, dict[str, tp.Any]] = {}  # replica -> {alias, node_seconds, tokens: {key: n}}
        self.retired: dict[str, None] = {}  # the last RETIRED_KEPT replicas shared out, oldest first
        self.unauthorized = 0
        self.wait: dict[str, Histogram] = {}
        self.latency: dict[str, Histogram] = {}

    def count(self, alias: str, key: str, status: int, prompt_tokens: int = 0, completion_tokens: int = 0,
              wait_s: float | None = None, latency_s: float | None = None, replica: str | None = None) -> None:
        if replica is not None and prompt_tokens + completion_tokens > 0 and replica not in self.retired:
            tokens = self._replica(alias, replica)["tokens"]
            tokens[key] = tokens.get(key, 0) + prompt_tokens + completion_tokens
        row = self.by.setdefault((alias, key), _zero())
        row["requests"] += 1
        row["prompt_tokens"] += prompt_tokens
        row["completion_tokens"] += completion_tokens
        if status >= 400:
            row["errors"] += 1
        code = (alias, key, status)
        self.codes[code] = self.codes.get(code, 0) + 1
        if wait_s is not None:
            self.wait.setdefault(alias, Histogram(WAIT_BUCKETS)).observe(wait_s)
        if latency_s is not None:
            self.latency.setdefault(alias, Histogram(LATENCY_BUCKETS)).observe(latency_s)

    def _replica(self, alias: str, replica: str) -> dict[str, tp.Any]:
        return self.replicas.setdefault(replica, {"alias": alias, "node_seconds": 0.0, "tokens": {}})

    def hold(self, alias: str, replica: str, node_seconds: float) -> None:
        self.node_seconds[alias] = self.node_seconds.get(alias, 0.0) + node_seconds
        self._replica(alias, replica)["node_seconds"] += node_seconds

    def retire(self, replica: str) -> None:
        """``replica`` ended: its node-hours are shared out among the keys for good."""
        entry = self.replicas.pop(replica, None)
        self.retired[replica] = None  # a request that ends after this counts its tokens, not a new replica
        if len(self.retired) > RETIRED_KEPT:
            del self.retired[next(iter(self.retired))]
        if entry is not None:
            for key, seconds in _shares(entry).items():
                self.key_node_seconds[key] = self.key_node_seconds.get(key, 0.0) + seconds

    def key_node_hours(self) -> dict[str, float]:
        total = dict(self.key_node_seconds)
        for entry in self.replicas.values():
            for key, seconds in _shares(entry).items():
                total[key] = total.get(key, 0.0) + seconds
        return {k: round(v / 3600, 6) for k, v in total.items()}

    # ------------------------------------------------------------------------------------------ reports

    def per_key(self) -> dict[str, dict[str, float]]:
        return self._folded(1, self.key_node_hours())

    def per_alias(self) -> dict[str, dict[str, float]]:
        return self._folded(0, {a: round(s / 3600, 6) for a, s in self.node_seconds.items()})

    def _folded(self, by: int, node_hours: tp.Mapping[str, float]) -> dict[str, dict[str, float]]:
        """The counts summed by alias (``by`` 0) or by key (1), with each one's node-hours."""
        out: dict[str, dict[str, float]] = {}
        for pair, row in self.by.items():
            total = out.setdefault(pair[by], {**_zero(), "node_hours": 0.0})
            for c in COUNTS:
                total[c] += row[c]
        for name, hours in node_hours.items():
            out.setdefault(name, {**_zero(), "node_hours": 0.0})["node_hours"] = hours
        return out

    def to_json(self) -> dict[str, tp.Any]:
        return {"by": [{"alias": a, "key": k, **{c: int(v) for c, v in row.items()}}
                       for (a, k), row in sorted(self.by.items())],
                "node_seconds": self.node_seconds, "key_node_seconds": self.key_node_seconds,
                "replicas": self.replicas, "unauthorized": self.unauthorized,
                "codes": [{"alias": a, "key": k, "code": c, "n": n} for (a, k, c), n in sorted(self.codes.items())],
                "wait": {a: h.to_json() for a, h in self.wait.items()},
                "latency": {a: h.to_json() for a, h in self.latency.items()}}

    @classmethod
    def load(cls, data: tp.Mapping[str, tp.Any]) -> Usage:
        usage = cls()
        for row in data.get("by") or []:
            if isinstance(row, dict) and isinstance(row.get("alias"), str) and isinstance(row.get("key"), str):
                usage.by[(row["alias"], row["key"])] = {c: _number(row.get(c)) for c in COUNTS}
        seconds = data.get("node_seconds")
        if isinstance(seconds, dict):
            usage.node_seconds = {str(a): _number(s) for a, s in seconds.items()}
        seconds = data.get("key_node_seconds")
        if isinstance(seconds, dict):
            usage.key_node_seconds = {str(k): _number(s) for k, s in seconds.items()}
        replicas = data.get("replicas")
        if isinstance(replicas, dict):
            for name, entry in replicas.items():
                if isinstance(entry, dict) and isinstance(entry.get("tokens"), dict):
                    usage.replicas[str(name)] = {"alias": str(entry.get("alias") or ""),
                                                 "node_seconds": _number(entry.get("node_seconds")),
                                                 "tokens": {str(k): int(_number(v)) for k, v in entry["tokens"].items()}}
        usage.unauthorized = int(_number(data.get("unauthorized")))
        for row in data.get("codes") or []:
            if isinstance(row, dict) and isinstance(row.get("alias"), str) and isinstance(row.get("key"), str) \
                    and isinstance(row.get("code"), int):
                usage.codes[(row["alias"], row["key"], row["code"])] = int(_number(row.get("n")))
        for attr, bounds in (("wait", WAIT_BUCKETS), ("latency", LATENCY_BUCKETS)):
            saved = data.get(attr)
            if isinstance(saved, dict):
                setattr(usage, attr, {str(a): Histogram.load(bounds, h) for a, h in saved.items()})
        return usage


def _shares(entry: tp.Mapping[str, tp.Any]) -> dict[str, float]:
    """A replica's node-seconds by key, in proportion to the tokens each key was served there."""
    tokens: dict[str, int] = entry["tokens"]
    total = sum(tokens.values())
    if not total:
        return {UNUSED: float(entry["node_seconds"])} if entry["node_seconds"] else {}
    return {k: entry["node_seconds"] * n / total for k, n in tokens.items()}


def _number(value: tp.Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0 else 0.0


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def prometheus(usage: Usage, gauges: tp.Mapping[str, tp.Any]) -> str:
    """The text for ``GET /metrics``. ``gauges``: ``queue`` (alias -> waiting requests), ``replicas`` ((alias,
    state) -> count), ``in_flight`` (alias -> requests being answered)."""
    lines: list[str] = []

    def head(name: str, kind: str, text: str) -> None:
        lines.append(f"# HELP {name} {text}")
        lines.append(f"# TYPE {name} {kind}")

    head("speedslurm_gateway_requests_total", "counter", "Requests answered, by alias, key and HTTP status")
    for (alias, key, code), n in sorted(usage.codes.items()):
        lines.append(f'speedslurm_gateway_requests_total{{alias="{_label(alias)}",key="{_label(key)}",'
                     f'code="{code}"}} {n}')
    head("speedslurm_gateway_tokens_total", "counter", "Tokens of the answered requests, by alias, key and kind")
    for (alias, key), row in sorted(usage.by.items()):
        for kind in ("prompt", "completion"):
            lines.append(f'speedslurm_gateway_tokens_total{{alias="{_label(alias)}",key="{_label(key)}",'
                         f'kind="{kind}"}} {int(row[kind + "_tokens"])}')
    head("speedslurm_gateway_errors_total", "counter", "Requests answered with an error status, by alias and key")
    for (alias, key), row in sorted(usage.by.items()):
        lines.append(f'speedslurm_gateway_errors_total{{alias="{_label(alias)}",key="{_label(key)}"}} '
                     f'{int(row["errors"])}')
    head("speedslurm_gateway_unauthorized_total", "counter", "Requests refused for a missing or wrong key")
    lines.append(f"speedslurm_gateway_unauthorized_total {usage.unauthorized}")
    head("speedslurm_gateway_queue_length", "gauge", "Requests waiting for a replica, by alias")
    for alias, n in sorted(gauges.get("queue", {}).items()):
        lines.append(f'speedslurm_gateway_queue_length{{alias="{_label(alias)}"}} {n}')
    head("speedslurm_gateway_in_flight", "gauge", "Requests being answered by a replica, by alias")
    for alias, n in sorted(gauges.get("in_flight", {}).items()):
        lines.append(f'speedslurm_gateway_in_flight{{alias="{_label(alias)}"}} {n}')
    head("speedslurm_gateway_replicas", "gauge", "Replicas by alias and state")
    for (alias, state), n in sorted(gauges.get("replicas", {}).items()):
        lines.append(f'speedslurm_gateway_replicas{{alias="{_label(alias)}",state="{state}"}} {n}')
    head("speedslurm_gateway_node_hours_total", "counter", "Node-hours held by each alias's replicas")
    for alias, seconds in sorted(usage.node_seconds.items()):
        lines.append(f'speedslurm_gateway_node_hours_total{{alias="{_label(alias)}"}} {seconds / 3600:.6f}')
    head("speedslurm_gateway_key_node_hours_total", "counter",
         "Node-hours by key: each replica's node-hours shared by the tokens each key was served there")
    for key, hours in sorted(usage.key_node_hours().items()):
        lines.append(f'speedslurm_gateway_key_node_hours_total{{key="{_label(key)}"}} {hours:.6f}')
    head("speedslurm_gateway_wait_seconds", "histogram", "Time a request waited for a replica, by alias")
    for alias, h in sorted(usage.wait.items()):
        lines.extend(h.lines("speedslurm_gateway_wait_seconds", f'alias="{_label(alias)}"'))
    head("speedslurm_gateway_latency_seconds", "histogram", "Time from a request to its whole answer, by alias")
    for alias, h in sorted(usage.latency.items()):
        lines.extend(h.lines("speedslurm_gateway_latency_seconds", f'alias="{_label(alias)}"'))
    return "\n".join(lines) + "\n"
