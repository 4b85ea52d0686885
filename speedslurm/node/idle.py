"""Idle release: a replica whose llama-server has had no request for ``llama.idle_timeout`` ends its job.

Activity is read from llama-server itself, every few seconds, by the leader's supervision loop: its
``/metrics`` (Prometheus text, with the API key). A sample is activity when a request is being processed or
waits (``llamacpp:requests_processing``, ``llamacpp:requests_deferred``), or when a token counter grew since the
previous sample (``llamacpp:prompt_tokens_total``, ``llamacpp:tokens_predicted_total``, ``llamacpp:n_decode_total``):
a request that came and went between two samples still counts. A sample that cannot be read is counted as
activity: the replica is only released on what llama-server said.

Standard library only: the job side imports it on the nodes.
"""

from __future__ import annotations

import re
import time
import typing as tp

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_TERM = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
GAUGES = ("llamacpp:requests_processing", "llamacpp:requests_deferred")
COUNTERS = ("llamacpp:prompt_tokens_total", "llamacpp:tokens_predicted_total", "llamacpp:n_decode_total")


def parse_duration(value: tp.Any) -> float:
    """Seconds in ``value``: ``90s``, ``30m``, ``2h``, ``1d``, ``1h30m``, ``30:00`` or ``1:00:00`` (Slurm's
    [H:]MM:SS), or a plain number of seconds; ``0``: never. :class:`ValueError` naming the value otherwise."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a duration (forms: 90s, 30m, 2h, 1h30m; 0: never)")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"{value!r} is not a duration: it is negative")
        return float(value)
    text = str(value).strip().lower().replace(" ", "")
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        if seconds < 0 or seconds != seconds:
            raise ValueError(f"{value!r} is not a duration: it is negative")
        return seconds
    clock = re.fullmatch(r"(?:(\d+):)?(\d+):(\d+)", text)  # Slurm's [H:]MM:SS
    if clock:
        hours, minutes, secs = (int(g) if g else 0 for g in clock.groups())
        return float(hours * 3600 + minutes * 60 + secs)
    terms = _TERM.findall(text)
    if not text or "".join(n + u for n, u in terms) != text:
        raise ValueError(f"{value!r} is not a duration (forms: 90s, 30m, 2h, 1h30m; 0: never)")
    return sum(float(n) * _UNITS[u] for n, u in terms)


def format_duration(seconds: float) -> str:
    """``20s``, ``30m``, ``2h``, ``1h30m``: the shortest form of a whole number of seconds."""
    s = int(round(seconds))
    if s < 60 or s % 60:
        return f"{s}s" if s < 60 else f"{s // 60}m{s % 60}s"
    m = s // 60
    if m < 60 or m % 60:
        return f"{m}m" if m < 60 else f"{m // 60}h{m % 60}m"
    return f"{m // 60}h"


def parse_metrics(text: str) -> dict[str, float]:
    """The samples of a Prometheus text page (labels dropped): name -> value."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) < 2:
            continue
        name = parts[0].split("{", 1)[0]
        try:
            out[name] = float(parts[1])
        except ValueError:
            continue
    return out


def is_active(previous: tp.Mapping[str, float] | None, now: tp.Mapping[str, float]) -> bool:
    """Whether llama-server served a request between two ``/metrics`` samples (``previous`` None: the first)."""
    if any(now.get(g, 0) > 0 for g in GAUGES):
        return True
    if previous is None:
        return False
    return any(now.get(c, 0) > previous.get(c, 0) for c in COUNTERS)


def check_interval(timeout_s: float) -> float:
    """How often to sample: every 5 s, more often for a timeout under a minute (a tenth of it, at least 1 s)."""
    return max(1.0, min(5.0, timeout_s / 10))


def read_metrics(url: str, api_key: str, timeout: float = 5.0) -> dict[str, float]:
    """llama-server's ``/metrics`` at ``url`` (base URL); raises OSError (URLError, HTTPError) when unreadable."""
    import urllib.request  # imported here: the job side starts without it

    req = urllib.request.Request(url.rstrip("/") + "/metrics", headers={"Authorization": f"Bearer {api_key}"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return parse_metrics(resp.read().decode("utf-8", "replace"))


class IdleWatch:
    """Samples llama-server's activity at most every :func:`check_interval` and says when it has been idle for
    ``timeout_s`` (``timeout_s`` 0: never). The idle clock starts at construction (the replica's ready time)."""

    def __init__(self, timeout_s: float, read: tp.Callable[[], dict[str, float]],
                 clock: tp.Callable[[], float] = time.monotonic) -> None:
        self.timeout_s = timeout_s
        self.read = read
        self.clock = clock
        self.interval = check_interval(timeout_s) if timeout_s > 0 else 0.0
        self.last_active = clock()
        self.last_check = float("-inf")
        self.previous: dict[str, float] | None = None

    def idle(self) -> bool:
        """Sample when due; True once no activity was seen for ``timeout_s``."""
        if self.timeout_s <= 0:
            return False
        now = self.clock()
        if now - self.last_check < self.interval:
            return False
        self.last_check = now
        try:
            sample = self.read()
        except (OSError, ValueError):
            self.last_active = now  # unreadable: not known to be idle
            return False
        if is_active(self.previous, sample):
            self.last_active = now
        self.previous = sample
        return now - self.last_active >= self.timeout_s
