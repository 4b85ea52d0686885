"""Slurm queries: partitions, node addresses, job states. Every call goes through :func:`proc.call`."""

from __future__ import annotations

import dataclasses
import os
import shlex
import shutil
import time
import typing as tp
from pathlib import Path

from ..errors import CommandError, UsageError
from ..rundir.records import JobId
from .proc import call

# Slurm states that end a job for good.
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
                "BOOT_FAIL", "DEADLINE", "REVOKED", "SPECIAL_EXIT", "GONE"}
# What squeue is asked about each job: id, state, reason, nodes, restart count (the start a requeued job is at),
# time used and node count (the node-hours it holds so far), time left (when it reaches its limit: a batch hands
# over to a successor before it does).
SQUEUE_FIELDS = "JobArrayID:|,State:|,Reason:|,NodeList:|,RestartCnt:|,TimeUsed:|,NumNodes:|,TimeLeft:"
# What sacct is asked about a job squeue no longer lists: its end, and what it held (node-hours, GPU-hours).
SACCT_FIELDS = "JobID,State,ExitCode,NodeList,ElapsedRaw,NNodes,AllocTRES"
# GONE: not in the queue any more, and accounting has no record (yet: slurmdbd may lag behind).
BAD_STATES = FINAL_STATES - {"COMPLETED", "GONE"}


def have_slurm() -> bool:
    return shutil.which("sbatch") is not None


@dataclasses.dataclass(frozen=True)
class JobState:
    job_id: str          # as Slurm prints it
    state: str           # RUNNING, PENDING, COMPLETED, ...
    reason: str = ""
    exit_code: str = ""
    nodes: str = ""
    restarts: int | None = None  # Slurm's restart count (squeue's RestartCnt): which start the job is at
    # What it held (None: not known): seconds run, node-seconds (each component's nodes x its elapsed time),
    # GPU-seconds (only where accounting counts gres/gpu in AllocTRES).
    elapsed_s: int | None = None
    node_s: float | None = None
    gpu_s: float | None = None
    time_left_s: int | None = None  # squeue's TimeLeft of a running job (None: not known, or no limit)

    @property
    def final(self) -> bool:
        # COMPLETING: the job is over and Slurm is killing what is left of it; nothing in it serves any more.
        return self.state.split()[0] in FINAL_STATES or self.state.startswith("COMPLETING")


def partition_info(partition: str | None) -> dict[str, tp.Any]:
    """Nodes of a partition (or the default one): {'name', 'nodes': [...], 'gres': {...}, 'states': {...}}."""
    argv = ["sinfo", "-h", "-N", "-o", "%N|%P|%G|%t"]
    if partition:
        argv += ["-p", partition]
    out = call(argv, timeout=20)
    nodes: dict[str, dict[str, str]] = {}
    name = partition
    for line in out.splitlines():
        parts = line.strip().split("|")
        if len(parts) != 4:
            continue
        node, part, gres, state = parts
        if partition is None and not part.endswith("*"):
            continue
        name = part.rstrip("*")
        nodes[node] = {"gres": gres, "state": state}
    if not nodes:
        known = partitions()
        raise UsageError(f"partition {partition or '(default)'!r} does not exist or has no nodes",
                         fix=f"set cluster.partition to one of: {', '.join(known) or '(none found)'}")
    return {"name": name, "nodes": sorted(nodes), "detail": nodes}


def partitions() -> list[str]:
    try:
        out = call(["sinfo", "-h", "-o", "%P"], timeout=20)
    except CommandError:
        return []
    return sorted({p.strip().rstrip("*") for p in out.split() if p.strip()})


def job_states(job_ids: tp.Iterable[str]) -> dict[str, JobState]:
    """States of jobs (arrays and hetjobs expanded: keys like 123, 123_1, 123+1) from squeue, then sacct.

    squeue is the authority on live jobs: a recorded job it no longer lists has ended, whatever accounting
    says, since slurmdbd takes records asynchronously and can lag behind (still RUNNING, or no record yet).
    Such a job gets sacct's final state when there is one, else ``GONE``.

    One squeue call for all of them (it lists the ids it knows and skips the others), and sacct only for the
    jobs squeue did not list (or for all, when the controller did not answer): each call is a request that
    slurmctld or slurmdbd serves.
    """
    wanted = [str(j) for j in job_ids]
    ids = sorted({JobId.base_of(j) for j in wanted})
    if not ids:
        return {}
    queued: dict[str, JobState] = {}
    squeue_ok = True
    try:
        # -O, not -o: the restart count has no %-letter. JobArrayID prints what %i does (123, 123_4, 123+1).
        out = call(["squeue", "-h", "-j", ",".join(ids), "-O", SQUEUE_FIELDS], timeout=20)
    except CommandError as exc:
        out = ""
        # An id Slurm has forgotten is an answer ("Invalid job id"); a controller that does not answer is not.
        squeue_ok = "Invalid job id" in exc.stderr
    for line in out.splitlines():
        parts = line.strip().split("|")
        if len(parts) >= 4:
            restarts = int(parts[4]) if len(parts) > 4 and parts[4].strip().isdigit() else None
            elapsed = time_used_s(parts[5]) if len(parts) > 5 else None
            nnodes = _int(parts[6]) if len(parts) > 6 else None
            node_s = float(elapsed * nnodes) if elapsed is not None and nnodes is not None else None
            left = time_used_s(parts[7]) if len(parts) > 7 and parts[1].strip() == "RUNNING" else None
            queued[parts[0]] = JobState(parts[0], parts[1], parts[2], "", parts[3], restarts, elapsed, node_s,
                                        time_left_s=left)
    accounted: dict[str, JobState] = {}
    unlisted = sorted({JobId.base_of(j) for j in wanted if state_for(j, queued) is None}) \
        if squeue_ok else ids
    acct = ""
    if unlisted:
        try:
            acct = call(["sacct", "-n", "-X", "-P", "-j", ",".join(unlisted), "-o", SACCT_FIELDS],
                        timeout=20, check=False)
        except CommandError:
            acct = ""
    for line in acct.splitlines():
        parts = line.strip().split("|")
        if len(parts) >= 4:
            elapsed = _int(parts[4]) if len(parts) > 4 else None
            nnodes = _int(parts[5]) if len(parts) > 5 else None
            gpus = alloc_gpus("|".join(parts[6:])) if len(parts) > 6 else None
            accounted[parts[0]] = JobState(
                parts[0], parts[1].split()[0], "", parts[2], parts[3], None, elapsed,
                float(elapsed * nnodes) if elapsed is not None and nnodes is not None else None,
                float(elapsed * gpus) if elapsed is not None and gpus is not None else None)
    states = dict(queued)
    for key, acc in accounted.items():
        if key not in states and (acc.final or not squeue_ok):
            states[key] = acc
    if squeue_ok:
        for jid in wanted:
            if state_for(jid, queued) is None:
                last = state_for(jid, accounted)
                states[jid] = with_usage(jid, last, accounted) if last is not None and last.final \
                    else JobState(jid, "GONE")
    return states


def _int(text: str) -> int | None:
    text = text.strip()
    return int(text) if text.isdigit() else None


def time_used_s(text: str) -> int | None:
    """squeue's TimeUsed (``12:34``, ``1:02:03``, ``2-01:02:03``) in seconds; None when it is not one."""
    text = text.strip()
    days, _, clock = text.rpartition("-")
    try:
        fields = [int(f) for f in clock.split(":")]
        d = int(days) if days else 0
    except ValueError:
        return None
    if not 1 <= len(fields) <= 3:
        return None
    seconds = 0
    for f in fields:
        seconds = seconds * 60 + f
    return d * 86400 + seconds


def alloc_gpus(tres: str) -> int | None:
    """GPUs in an AllocTRES (``billing=8,cpu=8,gres/gpu=2,mem=64G,node=2``); None when GPUs are not counted."""
    for item in tres.split(","):
        name, _, value = item.strip().partition("=")
        if name == "gres/gpu" and value.strip().isdigit():
            return int(value)
    return None


def with_usage(job_id: str, state: JobState, states: dict[str, JobState]) -> JobState:
    """``state`` (:func:`state_for`'s pick) with what all of the job's rows held: a hetjob's components each
    have their nodes and time, summed here."""
    key = _parse(job_id)
    if job_id in states or key is None or key.task:
        return state
    rows = [s for k, s in states.items() if (p := _parse(k)) and p.component and p.job == key.job]
    if not rows:
        return state
    node_s = [s.node_s for s in rows if s.node_s is not None]
    gpu_s = [s.gpu_s for s in rows if s.gpu_s is not None]
    elapsed = [s.elapsed_s for s in rows if s.elapsed_s is not None]
    return dataclasses.replace(state, elapsed_s=max(elapsed) if elapsed else None,
                               node_s=sum(node_s) if node_s else None, gpu_s=sum(gpu_s) if gpu_s else None)


def state_for(job_id: str, states: dict[str, JobState]) -> JobState | None:
    """The state of one recorded job id (123, 123_4) among ``job_states``' keys; the worst component decides."""
    if job_id in states:
        return states[job_id]
    key = _parse(job_id)
    parsed = {k: _parse(k) for k in states}
    # a hetjob's components show as 123+0, 123+1
    matches = [s for k, s in states.items() if key and (p := parsed[k]) and p.component and p.job == key.job]
    if not matches and key and key.task:
        # a pending array shows as 123_[0-3]
        matches = [s for k, s in states.items() if (p := parsed[k]) and p.base == key.base and p.pending_array]
    if not matches:
        return None
    for s in matches:
        if s.state.split()[0] in BAD_STATES:
            return s
    running = [s for s in matches if s.state == "RUNNING"]
    return running[0] if running else matches[0]


def settled(js: JobState) -> bool:
    """Whether ``js`` is a job's last word: a final state that accounting reported once squeue no longer listed
    the job (its rows carry an exit code; squeue's never do), or GONE. A final state that squeue still shows
    is not: a job requeued (preemption, a node failure with --requeue, RequeueExit, ``scontrol requeue``) keeps
    its id and comes back to the queue, so its end is recorded only once it has left the queue for good."""
    word = js.state.split()[0] if js.state else ""
    return word == "GONE" or (word in FINAL_STATES and bool(js.exit_code))


def job_key(job_id: str) -> tuple[str, str] | None:
    """(base id, array task or "") of a job id as Slurm or speedslurm prints it (123, 123_4, 123+1, 123_[0-3])."""
    key = _parse(job_id)
    if key is None:
        return None
    return key.base, "" if key.pending_array else key.task


def _parse(job_id: str) -> JobId | None:
    try:
        return JobId.parse(job_id)
    except ValueError:
        return None


def queued_jobs_writing_to(folder: Path) -> list[str]:
    """Ids (as squeue prints them: 123, 123+0, 123_[0-1]) of this user's queued jobs whose output file lies in
    ``folder``: how a script submitted with plain sbatch is found before it runs and records its own id."""
    try:
        out = call(["squeue", "-h", "-u", str(os.getuid()), "-O", "JobArrayID:|,STDOUT:|"], timeout=20)
    except CommandError:
        return []
    prefix = str(folder).rstrip("/") + "/"
    found = []
    for line in out.splitlines():
        job_id, _, path = line.partition("|")
        if path.rstrip("|").strip().startswith(prefix):
            found.append(job_id.strip())
    return found


# The job states accounting keeps (CF and SE are refused: "not supported / accounted"): with -s, sacct lists
# jobs in any of them between -S and -E, also those that never ran.
_ALL_STATES = "BF,CA,CD,DL,F,NF,OOM,PD,PR,R,RQ,RS,RV,S,TO"


def accounted_jobs_submitted_from(script: Path, since: float) -> list[str]:
    """Ids of this user's jobs since ``since`` (epoch seconds) that ``sbatch SCRIPT`` submitted, from accounting
    (SubmitLine, relative to WorkDir): a job that ended before anything recorded its id is still found."""
    start = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(since - 60))
    try:
        out = call(["sacct", "-n", "-X", "-P", "-u", str(os.getuid()), "-S", start, "-E", "now", "-s", _ALL_STATES,
                    "-o", "JobID,SubmitLine,WorkDir"], timeout=20, check=False)
    except CommandError:
        return []
    targets = {os.path.realpath(script), os.path.normpath(os.path.abspath(script))}
    found = []
    for line in out.splitlines():
        parts = line.split("|")
        if len(parts) < 3:
            continue
        job_id, submit_line, workdir = parts[0], "|".join(parts[1:-1]), parts[-1]
        candidates = _script_candidates(submit_line, spaced=any(c.isspace() for c in str(script)))
        if any(os.path.normpath(os.path.join(workdir, c)) in targets for c in candidates):
            found.append(job_id)
    return found


def _script_candidates(submit_line: str, spaced: bool) -> set[str]:
    """What the script argument of a submit line may be. Accounting keeps the line without its quotes
    (``sbatch my job.sbatch``), so for a script whose path has a space, runs of words joined by one space."""
    try:
        words = {w for w in shlex.split(submit_line)[1:] if not w.startswith("-")}
    except ValueError:
        words = set()
    if not spaced:
        return words
    plain = submit_line.split()[1:]
    return words | {" ".join(plain[i:j]) for i in range(len(plain)) for j in range(i + 2, len(plain) + 1)}


def scancel(job_ids: tp.Iterable[str]) -> None:
    ids = [str(j) for j in job_ids]
    if ids:
        # Its own session: the terminal's Ctrl-C reaches the whole foreground process group, and a clean-up's
        # scancel must not die of the very signal it runs after.
        call(["scancel", *ids], timeout=30, new_session=True)
