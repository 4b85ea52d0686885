"""Submission: the one job-script renderer and the submitit executors that submit it.

* one replica of N > 1 nodes -> a heterogeneous job: component 0 = the leader (1 node, pinned to the
  model's host when it has one), component 1 = the N-1 followers; ``srun --het-group=0,1`` starts one task
  per node, rank 0 is the leader.
* R > 1 replicas -> a job array of R plain N-node jobs; rank 0 of each is its leader.
* one node -> a plain job.
* ``--executor local`` -> submitit's local executor: N tasks on this machine, all on 127.0.0.1.

submitit's Slurm executor knows no hetjobs: the hetjob script comes from :func:`render_job_script` (which
builds on submitit's own sbatch renderer, so values are shell-quoted the same way). Every executor starts its
tasks through :mod:`speedslurm.node.entry`, which holds Slurm's time-limit warning before its slow imports and
gives every component's task the leader's job id, so they all find the one pickled job. What this needs of
submitit beyond its public surface lives in :mod:`speedslurm.cluster.submitit_adapter`.
"""

from __future__ import annotations

import re
import shlex
import sys
import typing as tp

from ..errors import UsageError
from ..planning.plan import Plan, check_script_values
from ..planning.sbatchopts import as_parameters, one_line, sbatch_line
from ..rundir.layout import RunDir
from .submitit_adapter import (
    sbatch_text,
)

# Slurm's SIGUSR2 warning before the time limit; the job side treats it like SIGTERM.
SIGNAL_DELAY_S = 60
# slurmctld checks time limits every 30 s (PERIODIC_TIMEOUT) and sends the warning at the first check at
# which it is due within the next 30 s, so it comes up to this much earlier than asked.
SLURM_CHECK_PERIOD_S = 30
# The shortest warning asked for: it still comes at least this long before the end, whatever the check's phase.
MIN_SIGNAL_DELAY_S = 10


def _one_line(text: str) -> str:
    """``text`` with line breaks and other control characters replaced: a value that reached the script
    across a line break would start a line of its own, and sbatch reads every ``#SBATCH`` line as an option."""
    return one_line(text)


def signal_delay_s(plan: Plan) -> int:
    """How long before its time limit Slurm warns the job (``--signal=USR2@S``).

    A minute, but the warning comes between S and S + 30 s before the end (SLURM_CHECK_PERIOD_S), so a short
    job asks for less: S + 30 s at most half its limit, but S at least MIN_SIGNAL_DELAY_S. A one-minute job
    asks for 10 s and is warned 20 to 50 s after it starts; asking for 30 s let the warning come at once.
    """
    half = plan.time_minutes * 60 // 2
    return max(MIN_SIGNAL_DELAY_S, min(SIGNAL_DELAY_S, half - SLURM_CHECK_PERIOD_S))


def job_name(plan: Plan) -> str:
    return _one_line(f"speedslurm-{plan.model.name}")[:64]


def slurm_parameters(plan: Plan, run_dir: RunDir) -> dict[str, tp.Any]:
    """submitit parameters of the main component (the leader's for a hetjob, every task's for an array).

    Every path to a job script (``up``, ``submit``, ``plan``, ``render``; hetjob, array, plain) comes here
    first: a value with a line break would start a shell line of the script, so it is refused here (exit 2).
    """
    check_script_values(plan, str(run_dir.root))
    params: dict[str, tp.Any] = {
        "job_name": job_name(plan),
        "time": plan.time_minutes,
        "nodes": 1 if plan.heterogeneous else plan.nodes,
        "ntasks_per_node": 1,
        "signal_delay_s": signal_delay_s(plan),
        "srun_args": ["--kill-on-bad-exit=1"] + (["--het-group=0,1"] if plan.heterogeneous else []),
        "wckey": "speedslurm",
        "setup": [f"export SPEEDSLURM_RUN_DIR={shlex.quote(str(run_dir.root))}",
                  'export SPEEDSLURM_JOB_ID="$SLURM_JOB_ID"'],
    }
    if plan.partition:
        params["partition"] = plan.partition
    if plan.gres:
        params["gres"] = plan.gres
    if plan.leader_host and plan.heterogeneous:
        params["nodelist"] = plan.leader_host
    elif plan.leader_host and plan.nodes == 1:
        params["nodelist"] = plan.leader_host
    # No exclusion of the followers' warm nodes (speedslurm.cluster.warmcache) here: Slurm 22.05 carries component 0's
    # --exclude into component 1, whose --nodelist it would then refuse ("Invalid node name specified").
    if plan.exclude:
        params["exclude"] = ",".join(plan.exclude)
    if plan.account:
        params["account"] = plan.account
    if plan.qos:
        params["qos"] = plan.qos
    if plan.cpus_per_node:
        params["cpus_per_task"] = plan.cpus_per_node
    extra: dict[str, tp.Any] = {"mem": plan.mem_per_node} if plan.mem_per_node else {}
    # cluster.sbatch: checked against sbatch's options when the plan was made; submitit renders them
    # among its own lines (sorted, values shell-quoted).
    extra.update(as_parameters(plan.sbatch))
    if extra:
        params["additional_parameters"] = extra
    return params


def follower_component_lines(plan: Plan) -> list[str]:
    """``#SBATCH`` lines of component 1 (the followers) of a hetjob."""
    lines = ["#SBATCH hetjob", f"#SBATCH --nodes={plan.nodes - 1}", "#SBATCH --ntasks-per-node=1"]
    if plan.partition:
        lines.append(f"#SBATCH --partition={shlex.quote(plan.partition)}")
    if plan.gres:
        lines.append(f"#SBATCH --gres={shlex.quote(plan.gres)}")
    exclude = [*plan.exclude, *([plan.leader_host] if plan.leader_host else [])]
    if exclude:
        lines.append(f"#SBATCH --exclude={shlex.quote(','.join(exclude))}")
    if plan.warm_nodes:
        # Nodes idle at submission that hold a warm rpc cache of the model (speedslurm.cluster.warmcache).
        lines.append(f"#SBATCH --nodelist={shlex.quote(','.join(plan.warm_nodes))}")
    lines.append(f"#SBATCH --time={plan.time_minutes}")
    # Slurm resets most options (--constraint among them) for each component: repeat cluster.sbatch here.
    lines += [sbatch_line(name, value) for name, value in as_parameters(plan.sbatch).items()]
    return lines


def render_job_script(plan: Plan, run_dir: RunDir, command: str) -> str:
    """The sbatch script for ``plan``; ``command`` is the (already quoted) task command run by srun.

    Pure: the same inputs give the same text (golden-file tested).
    """
    params = slurm_parameters(plan, run_dir)
    map_count = plan.replicas if plan.replicas > 1 else None
    text = sbatch_text(command, run_dir.submitit_dir, map_count, **params)
    lines = text.split("\n")
    lines.insert(1, f"# speedslurm deployment {run_dir.deployment_id}: {_one_line(plan.model.name)} on "
                    f"{plan.nodes} node(s) x {plan.replicas} replica(s) ({plan.layout})")
    if plan.heterogeneous:
        last = max(i for i, line in enumerate(lines) if line.startswith("#SBATCH"))
        lines[last + 1:last + 1] = follower_component_lines(plan)
    return "\n".join(lines)


class SbatchRefused(UsageError):
    """sbatch refused the job (exit code 2): nothing was queued. ``setting`` names what to change."""

    def __init__(self, message: str, fix: str, setting: str | None) -> None:
        super().__init__(message, fix)
        self.setting = setting


# What sbatch says when it refuses a job -> the settings that asked for it (first match wins: "Invalid account
# or account/partition combination" is the account's, "QOS not permitted to use this partition" the qos's).
# ``cluster.sbatch.X`` stands for the option X of cluster.sbatch.
REFUSALS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (r"feature|constraint", ("cluster.sbatch.constraint",)),
    (r"\bqos\b|quality of service", ("cluster.qos",)),
    (r"reservation", ("cluster.sbatch.reservation",)),
    (r"account", ("cluster.account",)),
    (r"partition", ("cluster.partition",)),
    (r"\bgres\b|generic resource", ("cluster.gres_per_node",)),
    (r"memory|\bmem\b", ("cluster.mem_per_node",)),
    (r"time limit", ("cluster.time",)),
    (r"node name|nodelist", ("cluster.exclude", "the model's host")),
    (r"node configuration|cpu count|cpus", ("cluster.cpus_per_node", "cluster.gres_per_node",
                                             "cluster.mem_per_node", "cluster.sbatch.constraint")),
    (r"licen[cs]e", ("cluster.sbatch.licenses",)),
    (r"cluster", ("cluster.sbatch.clusters",)),
)
UNKNOWN_REFUSAL = ("cluster.partition", "cluster.account", "cluster.qos", "cluster.sbatch")


def refused_settings(message: str) -> tuple[str, ...]:
    """The settings to change for sbatch's refusal ``message`` (its stderr)."""
    for pattern, settings in REFUSALS:
        if re.search(pattern, message, re.IGNORECASE):
            return settings
    return UNKNOWN_REFUSAL


def _origin(plan: Plan, setting: str) -> str:
    """Where ``setting`` of the plan was set ("" when it was not: sbatch or the cluster chose)."""
    origins = plan.origins
    if setting.startswith("cluster.sbatch."):
        option = setting.removeprefix("cluster.sbatch.")
        if not any(name == option.replace("-", "_") for name, _ in plan.sbatch):
            return ""
        for key, where in origins.items():  # written as the user wrote it: constraint, C, mail_type, ...
            if key.startswith("cluster.sbatch."):
                from ..planning.sbatchopts import sbatch_options

                try:
                    names = [n for n, _ in sbatch_options({key.removeprefix("cluster.sbatch."): "x"})]
                except UsageError:
                    continue
                if names == [option.replace("-", "_")]:
                    return where
        return origins.get("cluster.sbatch", "")
    if setting == "the model's host":
        return plan.leader_host or ""
    value = {"cluster.partition": plan.partition, "cluster.account": plan.account, "cluster.qos": plan.qos,
             "cluster.gres_per_node": plan.gres, "cluster.mem_per_node": plan.mem_per_node,
             "cluster.cpus_per_node": plan.cpus_per_node, "cluster.exclude": plan.exclude,
             "cluster.time": plan.time_minutes}.get(setting, True)
    return origins.get(setting, "default") if value else ""


def refusal(plan: Plan, stderr: str) -> SbatchRefused:
    """The error for sbatch's refusal of ``plan``'s job: sbatch's own words and the setting(s) to change,
    with where each was set (the file, variable or flag), those the plan sets first."""
    words = " ".join(line.strip() for line in stderr.strip().splitlines() if line.strip()) or "(no message)"
    settings = refused_settings(words)
    where = {s: _origin(plan, s) for s in settings}
    ordered = sorted(settings, key=lambda s: not where[s])  # stable: the table's order among the set ones
    parts = []
    for s in ordered:
        if s == "the model's host":
            parts.append(f"the model's host ({where[s]}) in the registry" if where[s] else "")
        else:
            parts.append(f"{s} (not set)" if not where[s] else f"{s} (its default)" if where[s] == "default"
                         else f"{s} (set in {where[s]})")
    parts = [p for p in parts if p]
    fix = ("check " + ", or ".join(parts) + "; `speedslurm plan` prints the job's #SBATCH lines") if parts else \
        "check the job's #SBATCH lines (`speedslurm plan` prints them) against what the cluster allows"
    return SbatchRefused(f"sbatch refused the job: {words}", fix, ordered[0] if ordered else None)


def python_command() -> str:
    return shlex.quote(sys.executable)
