"""Where the runner finds replicas: an :class:`EndpointSource` is polled for ready and failed replicas.

* :class:`StaticSource` — one OpenAI-compatible server given by URL (``run --base-url``);
* :class:`RunDirSource` — a deployment's run directory: ``r<R>/endpoint.json`` appears when replica R is READY,
  ``r<R>/failed.json`` when it gave up.
"""

from __future__ import annotations

import dataclasses
import json
import time
import typing as tp
import urllib.error
import urllib.parse
import urllib.request

from ..errors import SpeedslurmError, UsageError
from ..polling import Backoff
from ..rundir.layout import RunDir
from ..rundir.records import ContractError, Endpoint, Failed

DEFAULT_SLOTS = 4


@dataclasses.dataclass
class SourceState:
    """One look at the replicas: the ready ones, the failed ones (replica -> why) and whether more can come."""

    ready: list[Endpoint]
    failed: dict[int, str]
    finished: bool  # True when no replica that is not ready now can become ready later
    # Replicas to send nothing new to (their deployment hands over to a successor); they are told of as
    # ``source.drained(r)`` once nothing of theirs is in flight.
    draining: frozenset[int] = frozenset()
    ends_at: dict[int, float] = dataclasses.field(default_factory=dict)  # replica -> its job's end (epoch s)
    # Failed replicas whose job side saw their server exit (its failed.json): a death of the server, which the
    # requests in flight on it are charged with; a job that ended (cancelled, timed out, its node lost) is none.
    crashed: frozenset[int] = frozenset()


class EndpointSource(tp.Protocol):
    """Anything the runner can poll for replicas. A source may also have ``hurry()``, which the runner calls
    when it sees a replica fail by itself: the source should look at its slower evidence (Slurm) soon."""

    def poll(self) -> SourceState: ...


def describe_failure(failure: Failed) -> str:
    """A one-line reason from a failed.json record."""
    return failure.describe() or "failed (no reason recorded)"


class StaticSource:
    """Fixed servers (one URL, or endpoint files); ready from the start, and nothing else will come.

    Replica numbers must be distinct; endpoints that share one (files from different deployments) are
    renumbered 0..N-1 in the order given.
    """

    def __init__(self, endpoints: Endpoint | tp.Sequence[Endpoint]) -> None:
        eps = [endpoints] if isinstance(endpoints, Endpoint) else list(endpoints)
        if len({e.replica for e in eps}) != len(eps):
            eps = [dataclasses.replace(e, replica=i) for i, e in enumerate(eps)]
        self.endpoints = eps

    @classmethod
    def probe(cls, base_url: str, api_key: str | None, parallel: int | None = None,
              timeout: float = 10.0) -> StaticSource:
        """Build the source for ``--base-url``: slots from ``/props`` ``total_slots`` (else 4), model from ``/v1/models``.

        Raises :class:`UsageError` for a malformed URL or a rejected API key, :class:`SpeedslurmError` when the
        server cannot be reached: a refused or dropped connection is tried again with backoff for up to
        ``min(timeout, 5)`` seconds (a server that drops a few connections is no reason to stop).
        """
        url = base_url.rstrip("/")
        if url.endswith("/v1"):
            url = url[:-3]
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise UsageError(f"--base-url {base_url!r} is not an http(s) URL",
                             fix="e.g. --base-url http://127.0.0.1:8080")
        key = api_key or ""
        model = ""
        slots = parallel
        props = _get_json(url + "/props", key, timeout, base_url)
        if props is not None and slots is None:
            total = props.get("total_slots")
            if isinstance(total, int) and not isinstance(total, bool) and total > 0:
                slots = total
        models = _get_json(url + "/v1/models", key, timeout, base_url)
        if models is not None:
            data = models.get("data")
            if isinstance(data, list) and data and isinstance(data[0], dict):
                model = str(data[0].get("id", ""))
        ep = Endpoint(url=url, api_key=key, model=model, deployment_id="", replica=0, job_id="",
                      leader_node=parsed.hostname or "", follower_nodes=[], rpc_servers=[], llama_version="",
                      parallel=slots or DEFAULT_SLOTS, ctx=0, started_at=0.0, ready_at=time.time())
        return cls(ep)

    def poll(self) -> SourceState:
        return SourceState(list(self.endpoints), {}, True)


def _get_json(url: str, key: str, timeout: float, shown: str,
              sleep: tp.Callable[[float], None] = time.sleep) -> dict[str, tp.Any] | None:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    tries_for = min(timeout, 5.0)
    start, delay = time.monotonic(), 0.25
    while True:
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - http(s) checked above
                data = json.loads(resp.read())
                return data if isinstance(data, dict) else None
        except urllib.error.HTTPError as exc:
            if exc.code == 401:
                raise UsageError(f"the server at {shown} rejected the API key (401 Unauthorized)",
                                 fix="pass the server's key with --api-key K") from None
            return None  # endpoint not offered by this server: fall back to defaults
        except (urllib.error.URLError, OSError) as exc:
            spent = time.monotonic() - start
            if spent + delay > tries_for:
                reason = getattr(exc, "reason", exc)
                raise SpeedslurmError(f"cannot reach the server at {shown}: {reason} (tried for {spent:.0f} s)",
                                      fix="check the URL and that the server is running") from None
            sleep(delay)  # refused or dropped: a server restarting, or a short network blip
            delay = min(delay * 2, 2.0)
        except (ValueError, RecursionError):  # not JSON, or nested too deep to read: use the defaults
            return None


class RunDirSource:
    """Replicas of one deployment, read from its run directory.

    ``job_alive`` (optional) says whether the deployment's job(s) still run; when it returns False every replica
    that has not failed is reported failed ("the job ended") and the source is finished. ``job_failures``
    (optional) names replicas whose own job ended (replica -> why), for deployments with one job per replica.
    Both are called at most every ``alive_every`` seconds (they may ask Slurm); with ``alive_most`` the interval
    doubles up to it while nothing changes (their answer, the ready and failed replicas), and returns to
    ``alive_every`` on a change or :meth:`hurry`. The run directory's files are read at every poll, and nothing
    read from them is kept: ``accept`` can reject a stale endpoint file (another job's, or an earlier start's of a
    requeued job), after which the replica is neither ready nor failed until its next start's endpoint appears.
    """

    def __init__(self, run_dir: RunDir, replicas: int, job_alive: tp.Callable[[], bool] | None = None,
                 accept: tp.Callable[[Endpoint], bool] | None = None, alive_every: float = 2.0,
                 clock: tp.Callable[[], float] = time.monotonic,
                 job_failures: tp.Callable[[], dict[int, str]] | None = None,
                 accept_failure: tp.Callable[[int, Failed], bool] | None = None,
                 alive_most: float | None = None) -> None:
        self.run_dir = run_dir
        self.replicas = replicas
        self.job_alive = job_alive
        self.job_failures = job_failures
        self.accept = accept
        self.accept_failure = accept_failure
        self.alive_every = alive_every
        self.clock = clock
        self._ready: dict[int, Endpoint] = {}
        self._failed: dict[int, str] = {}
        self._crashed: set[int] = set()  # failed replicas whose failed.json says their server exited
        self._backoff = Backoff(alive_every, alive_every if alive_most is None else alive_most, clock)
        self._job_ended = False
        # The node-hours its deployment held over a span (epoch seconds): set by the deployment's source.
        self.usage: tp.Callable[[float, float], dict[str, tp.Any]] | None = None
        self._job_failed: dict[int, str] = {}  # the checks' last answer
        # Each replica's job's end (epoch seconds), as its deployment's checks last learnt it (Slurm's TimeLeft).
        self.ends_at: dict[int, float] = {}

    def poll(self) -> SourceState:
        """Read every replica's files afresh (a requeued job's next start replaces its endpoint, and its earlier
        start's files stop counting once ``accept`` knows of the new start); ask the checks when due."""
        asked = self._ask(due_only=True)
        ready, failed = self._look()
        if not asked and any(r not in self._failed for r in failed):
            # A failure file just appeared: before the replica is given up for good, ask Slurm (it may say
            # the job was requeued, and the file is its earlier start's).
            self._backoff.hurry()
            if self._ask(due_only=True):
                ready, failed = self._look()
        self._ready, self._failed = ready, failed
        self._backoff.note((sorted(self._ready), sorted(self._failed.items()), self._job_ended), asked)
        finished = self._job_ended or len(self._ready) + len(self._failed) >= self.replicas
        return SourceState(sorted(self._ready.values(), key=lambda e: e.replica), dict(self._failed), finished,
                           ends_at=dict(self.ends_at), crashed=frozenset(self._crashed & set(self._failed)))

    def _ask(self, due_only: bool) -> bool:
        """Ask ``job_alive``/``job_failures`` (when due); True when they were asked."""
        checks = self.job_alive is not None or self.job_failures is not None
        if not checks or self._job_ended or len(self._failed) >= self.replicas or not self._backoff.due():
            return False
        if self.job_alive is not None and not self.job_alive():
            self._job_ended = True
        found = self.job_failures() if self.job_failures is not None else {}
        self._job_failed = {r: why for r, why in found.items() if 0 <= r < self.replicas}
        return True

    def _look(self) -> tuple[dict[int, Endpoint], dict[int, str]]:
        ready: dict[int, Endpoint] = {}
        failed: dict[int, str] = {}
        for r in range(self.replicas):
            failure = self._read_failure(r)
            if failure is None:
                self._crashed.discard(r)
            if failure is None and r in self._job_failed:
                failure = self._job_failed[r]
            if failure is None and self._job_ended:
                failure = "the job ended (cancelled, timed out or its node failed)"
            if failure is not None:
                failed[r] = failure
                continue
            ep = self._read_endpoint(r)
            if ep is not None and (self.accept is None or self.accept(ep)):
                ready[r] = ep
        return ready, failed

    def hurry(self) -> None:
        """Ask ``job_alive``/``job_failures`` at the next poll, and often for a while: a replica just failed
        in the runner's eyes, and they may know why."""
        self._backoff.hurry()

    def _read_failure(self, r: int) -> str | None:
        try:
            info = self.run_dir.failure(r)
        except OSError:
            return None  # unreadable for now; next poll
        except ContractError as exc:
            return exc.message  # a failure file this version cannot read: the replica is not serving
        if info is None or (self.accept_failure is not None and not self.accept_failure(r, info)):
            return None  # none, or left by another job in this run directory
        if info.cause == "failed" and info.exit_code is not None:
            self._crashed.add(r)
        else:
            self._crashed.discard(r)
        return describe_failure(info)

    def _read_endpoint(self, r: int) -> Endpoint | None:
        try:
            return self.run_dir.endpoint(r)
        except (ContractError, OSError):
            return None
