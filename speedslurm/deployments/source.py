"""A deployment as a batch's endpoint source: its run directory (the replicas' endpoints as they come up), plus
the executor's view of its jobs (a replica whose job ended is dropped, one requeued is awaited), the time Slurm
leaves each job (a batch hands over before it), and the node-hours it held over the batch.
"""

from __future__ import annotations

import time
import typing as tp

from ..cluster.executor import SLURM_FIRST_S
from ..cluster.registry import executor_for
from ..errors import UsageError
from ..rundir.layout import Deployment, script_path
from .status import endpoint_is_current, failure_is_current, replica_statuses

if tp.TYPE_CHECKING:
    from ..batch.sources import EndpointSource


def deployment_source(record: Deployment) -> EndpointSource:
    """The replicas of a deployment as a batch's endpoint source: its run directory, plus the executor's view
    of its jobs (a replica whose job ended is dropped, one that comes up is added)."""
    from ..batch.sources import RunDirSource, describe_failure

    statuses = replica_statuses(record, {})  # the run directory says whether it was submitted
    if all(st.state == "UNSUBMITTED" for st in statuses):
        raise UsageError(f"deployment {record.id} was rendered but not submitted: nothing will serve it",
                         fix=f"submit it with `sbatch {script_path(record)}`, then run this command again")

    # Each replica's current start (Slurm's restart count) as last asked: a requeued job keeps its id, and the
    # files of its earlier start (an endpoint with a dead port, a failure) are not taken for the new start's.
    restarts: dict[int, int | None] = {}
    last: dict[str, tp.Any] = {}  # the statuses the last look got, and when: the batch's node-hours use them

    def job_failures() -> dict[int, str]:
        out = {}
        statuses = replica_statuses(record)
        last.update(statuses=statuses, at=time.time())
        at = time.time()
        for st in statuses:
            restarts[st.replica] = st.restarts
            if st.time_left_s is not None and st.state != "PENDING":
                source.ends_at[st.replica] = at + st.time_left_s  # when Slurm ends it: a batch hands over before
            if st.state == "PENDING" and st.restarts:
                continue  # requeued: it starts again, with a new endpoint
            if not st.failure and st.job_state.startswith("COMPLETING"):
                continue  # over, but Slurm does not say how yet (CANCELLED, TIMEOUT, ...): ask again soon
            if st.state in ("FAILED", "ENDED"):
                why = describe_failure(st.failure) if st.failure else \
                    f"job {st.job_id} ended ({st.job_state or 'gone'}{': ' + st.reason if st.reason else ''})"
                out[st.replica] = why
        return out

    # Slurm is asked a second after a change, then less and less often while the batch runs undisturbed; the
    # runner hurries the source when it sees a replica fail. Local processes cost Slurm nothing: every second.
    source = RunDirSource(record.run_dir, record.replicas, job_failures=job_failures, alive_every=SLURM_FIRST_S,
                          alive_most=executor_for(record).alive_most_s,
                          accept=lambda ep: endpoint_is_current(record, ep, restarts.get(ep.replica)),
                          accept_failure=lambda r, info: failure_is_current(record, r, info, restarts.get(r)))

    def usage(started: float, ended: float) -> dict[str, tp.Any]:
        from .nodehours import batch_usage

        if not last:  # never looked: the run directory and the recorded ends (no question to Slurm)
            last.update(statuses=replica_statuses(record, {}), at=time.time())
        return batch_usage(record, last["statuses"], started, ended, last["at"])

    source.usage = usage
    return source
