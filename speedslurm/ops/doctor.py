"""``speedslurm doctor``: is this cluster ready for a deployment? One pass/fail line per check, with the fix.

Checks, in order: Slurm's client commands answer; the partition exists and has GPU nodes; the llama.cpp
binaries are found and come from one build; the run directory is private (0700, not under a folder others
can write); the nodes see the run directory (a probe file written here is read by an ``srun`` task on every
node: the filesystem is shared); each node's cluster address can bind the configured ports; registry
models are present; munge signs and verifies a credential.

Every external command goes through ``call`` (default :func:`speedslurm.cluster.proc.call`), so tests can replace it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import shutil
import stat
import sys
import typing as tp
from pathlib import Path

from ..cluster import slurm
from ..cluster.proc import call as proc_call
from ..errors import CommandError, UsageError
from ..settings.settings import Settings

Call = tp.Callable[..., str]


@dataclasses.dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""

    def to_json(self) -> dict[str, tp.Any]:
        return dataclasses.asdict(self)


def _fail_from(name: str, exc: Exception, fix: str) -> Check:
    message = exc.message if isinstance(exc, (UsageError, CommandError)) else str(exc)
    own_fix = getattr(exc, "fix", None)
    return Check(name, False, message, own_fix or fix)


# ----------------------------------------------------------------------------------------------------------
# Slurm


def check_slurm_commands(call: Call = proc_call) -> Check:
    missing = [c for c in ("sbatch", "squeue", "sacct", "srun", "sinfo") if shutil.which(c) is None]
    if missing:
        return Check("slurm commands", False, f"not on PATH: {', '.join(missing)}",
                     "run on a Slurm login node, or add Slurm's bin folder to PATH")
    problems = []
    for argv, what in ((["squeue", "-h", "-o", "%i", "-u", str(os.getuid())], "squeue"),
                       (["sacct", "-n", "-X", "-S", "now-1hours", "-o", "JobID"], "sacct")):
        try:
            call(argv, timeout=30)
        except CommandError as exc:
            problems.append(f"{what}: {exc.stderr.strip()[-200:] or exc.message}")
    if problems:
        return Check("slurm commands", False, "; ".join(problems),
                     "check that slurmctld (and slurmdbd for sacct) answer: `scontrol ping`, `sacctmgr show cluster`")
    return Check("slurm commands", True, "sbatch, squeue, sacct, srun and sinfo answer")


def check_partition(settings: Settings) -> tuple[Check, list[str]]:
    """The partition and its usable GPU nodes (the nodes are returned for the checks that run on them)."""
    name = settings.cluster.partition
    try:
        info = slurm.partition_info(name)
    except (UsageError, CommandError) as exc:
        return _fail_from("partition", exc, "set cluster.partition to a partition `sinfo` lists"), []
    nodes = [n for n in info["nodes"] if n not in settings.cluster.exclude]
    bad_states = ("down", "drain", "drng", "fail", "maint", "unk", "npc", "futr")
    usable = [n for n in nodes if not info["detail"][n]["state"].rstrip("*~#!%$@^-").startswith(bad_states)]
    gpu = [n for n in usable if "gpu" in info["detail"][n]["gres"]]
    label = f"partition {info['name']}"
    if not usable:
        return Check("partition", False, f"{label}: no node is up ({len(nodes)} in all)",
                     "ask the admins why the nodes are down (`sinfo -R`)"), []
    if settings.cluster.gres_per_node and "gpu" in settings.cluster.gres_per_node and not gpu:
        return Check("partition", False, f"{label}: {len(usable)} node(s) up, none with gres gpu",
                     "choose a GPU partition (cluster.partition), or set cluster.gres_per_node: null for CPU nodes"), usable
    return Check("partition", True, f"{label}: {len(usable)} node(s) up, {len(gpu)} with GPUs "
                 f"({', '.join(usable)})"), usable


# ----------------------------------------------------------------------------------------------------------
# Binaries


def check_binaries(settings: Settings) -> Check:
    from ..node.binaries import check_same_build, find_llama_binaries

    try:
        bins = find_llama_binaries(settings.llama.bin_dir)
        version = bins.version
        check_same_build(bins.build_id, bins.rpc_version(), where=f"{bins.llama_server} and {bins.rpc_server}")
    except UsageError as exc:
        return _fail_from("binaries", exc, "set llama.bin_dir (see `speedslurm build-llama`)")
    return Check("binaries", True, f"{bins.llama_server} and {bins.rpc_server.name} ({bins.source}), "
                 f"version {version}, one build ({bins.build_id})")


# ----------------------------------------------------------------------------------------------------------
# Run directory


def check_run_dir_private(settings: Settings) -> Check:
    from ..rundir.layout import check_parent_not_world_writable, make_private_dir

    root = settings.run.root
    try:
        check_parent_not_world_writable(root)
        make_private_dir(root)
    except (UsageError, OSError) as exc:
        return _fail_from("run directory private", exc, "set run.dir to a folder of your own (mode 0700)")
    mode = stat.S_IMODE(root.stat().st_mode)
    return Check("run directory private", True, f"{root} (mode {mode:04o}, owned by you)")


def node_probe_argv(python: str, probe: Path, ports: list[int], addresses: dict[str, str], node: str,
                    partition: str | None, wait_s: int = 60) -> list[str]:
    """One srun task on ``node``; ``--immediate`` so a node busy with other jobs does not hold doctor up."""
    argv = ["srun", "--nodes=1", "--ntasks=1", f"--nodelist={node}", "--cpus-per-task=1", "--mem=100M",
            "--time=3", f"--immediate={wait_s}", "--job-name=speedslurm-doctor"]
    if partition:
        argv.append(f"--partition={partition}")
    # The job side's own look (speedslurm.node.net.probe): the cluster address as a role would find and check it.
    return [*argv, python, "-m", "speedslurm.node.entry", "probe", str(probe), json.dumps(ports), json.dumps(addresses)]


def parse_node_probe(output: str) -> dict[str, tp.Any] | None:
    for line in output.splitlines():
        if line.startswith("DOCTOR "):
            return tp.cast(dict[str, tp.Any], json.loads(line[len("DOCTOR "):]))
    return None


def _probe_node(call: Call, argv: list[str]) -> tuple[dict[str, tp.Any] | None, str]:
    """(the node's answer, or None and why not)."""
    try:
        out = call(argv, timeout=180)
    except CommandError as exc:
        answer = parse_node_probe(exc.stdout or "")
        if answer is not None:
            return answer, ""
        text = (exc.stderr or exc.stdout).strip().splitlines()
        return None, text[-1] if text else exc.message
    answer = parse_node_probe(out)
    return (answer, "") if answer is not None else (None, "no output")


def check_on_nodes(settings: Settings, nodes: list[str], call: Call = proc_call,
                   python: str = sys.executable) -> list[Check]:
    """'run directory shared' and 'free ports', from one srun task on each node (in parallel).

    A node busy with other jobs cannot run the probe; it is named as not checked. At least one node must
    answer, and every node that answers must see the probe file and bind the ports.
    """
    from concurrent.futures import ThreadPoolExecutor

    if not nodes:
        why = "no usable node in the partition (see the partition check)"
        return [Check("run directory shared", False, why, "fix the partition first"),
                Check("free ports", False, why, "fix the partition first")]
    root = settings.run.root
    token = secrets.token_hex(8)
    probe = root / f".doctor-probe-{token}"
    ports = [p for p in (settings.llama.server_port, settings.llama.rpc_port) if p] or [0]
    addresses = {n: e.address for n, e in settings.cluster.nodes.items() if e.address}
    try:
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        probe.write_text(token + "\n")
        try:
            with ThreadPoolExecutor(max_workers=min(16, len(nodes))) as pool:
                results = list(pool.map(lambda n: _probe_node(call, node_probe_argv(
                    python, probe, ports, addresses, n, settings.cluster.partition)), nodes))
        finally:
            probe.unlink(missing_ok=True)
    except OSError as exc:
        fail = _fail_from("run directory shared", exc, "set run.dir to a folder you can write")
        return [fail, dataclasses.replace(fail, name="free ports")]
    answers = {n: a for n, (a, _why) in zip(nodes, results, strict=True) if a is not None}
    silent = {n: why for n, (a, why) in zip(nodes, results, strict=True) if a is None}
    unchecked = f"; not checked (busy or not answering): {', '.join(f'{n} ({w})' for n, w in silent.items())}" \
        if silent else ""
    if not answers:
        fix = "run doctor again when some node is idle; check that srun works in the partition"
        why = "no node could run the probe" + unchecked
        return [Check("run directory shared", False, why, fix), Check("free ports", False, why, fix)]
    blind = [f"{n} ({a.get('probe_error', 'other content')})" for n, a in answers.items() if a.get("probe") != token]
    if blind:
        shared = Check("run directory shared", False, f"{root} is not visible on: {', '.join(blind)}",
                       "set run.dir to a folder on a filesystem every node mounts (e.g. your home on NFS)")
    else:
        shared = Check("run directory shared", True, f"{root} is visible on {', '.join(answers)}{unchecked}")
    taken = [f"{n} {a.get('address') or 'no usable address'}:{p} ({why})" for n, a in answers.items()
             for p, why in a.get("ports", {}).items() if why != "free"]
    wanted = ", ".join(str(p) if p else "any" for p in ports)
    if taken:
        free = Check("free ports", False, f"cannot bind: {'; '.join(taken)}",
                     "set llama.server_port / llama.rpc_port to 0 (pick a free port) or to ports that are free")
    else:
        addrs = ", ".join(f"{n}={a.get('address')}" for n, a in answers.items())
        free = Check("free ports", True, f"port(s) {wanted} bindable on {addrs}{unchecked}")
    return [shared, free]


# ----------------------------------------------------------------------------------------------------------
# Models, munge


def check_models(settings: Settings) -> Check:
    if not settings.models:
        return Check("model files", True, "no registry models configured")
    missing: list[str] = []
    present: list[str] = []
    remote: list[str] = []
    for name, entry in sorted(settings.models.items()):
        if entry.host:  # on that node's local disk: the job side checks it there
            remote.append(f"{name} (on {entry.host})")
            continue
        absent = [str(p) for p in entry.paths if not p.is_file()]
        if absent:
            missing.append(f"{name}: {', '.join(absent)}")
        else:
            present.append(name)
    if missing:
        first = missing[0].split(":")[0]
        return Check("model files", False, "missing: " + "; ".join(missing),
                     f"download them: `speedslurm models pull {first}` (or fix models.NAME.files)")
    detail = f"present: {', '.join(present) or '-'}"
    if remote:
        detail += f"; on a node's local disk, not checked: {', '.join(remote)}"
    return Check("model files", True, detail)


def check_munge(call: Call = proc_call) -> Check:
    fix = "start munged on this machine and every node, with the same /etc/munge/munge.key"
    try:
        cred = call(["munge", "-n"], timeout=20)
        out = call(["unmunge"], input=cred, timeout=20)
    except CommandError as exc:
        return Check("munge", False, exc.message, fix)
    if "STATUS:" in out and "Success" not in out:
        return Check("munge", False, out.strip().splitlines()[0], fix)
    return Check("munge", True, "munge -n | unmunge: Success")


def run_checks(settings: Settings, *, call: Call = proc_call, on_nodes: bool = True) -> list[Check]:
    checks = [check_slurm_commands(call)]
    part, nodes = check_partition(settings)
    checks += [part, check_binaries(settings), check_run_dir_private(settings)]
    if on_nodes:
        checks += check_on_nodes(settings, nodes, call)
    checks += [check_models(settings), check_munge(call)]
    return checks
