"""The plain-sbatch templates' job: ``python3 speedslurm-node.pyz template hetjob|array --model ... ``.

``sbatch_templates/llama-rpc-hetjob.sbatch`` and ``llama-rpc-array.sbatch`` are for people who do not run the
front end: their settings block maps environment variables to the flags below and hands over to this module,
which runs the same job side as ``up`` and ``render`` (:mod:`speedslurm.node.roles`). It

1. works out the replica (the array task, or 0), its job id (``123`` or ``123_4``), the node count and the run
   directory (``RUN_DIR``, else ``~/.local/share/speedslurm/runs/<name>-<job id>``);
2. prepares the run directory as the client would: mode 0700, the API key (the first replica's wins),
   ``deployment.json`` (:class:`~speedslurm.rundir.records.DeploymentRecord`), this replica's handshake files of an
   earlier job removed; the llama.cpp binaries are found (``LLAMA_BIN_DIR``, else ``PATH``) and probed once;
3. starts the followers with one ``srun`` (the hetjob's component 1, or the array task's other nodes), each
   running ``serve`` of this same file, and runs the leader in this process.

Standard library only: the nodes need ``python3`` and nothing else.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import secrets
import shlex
import subprocess
import sys
import time
import typing as tp
from pathlib import Path

from ..errors import UsageError
from ..rundir.layout import RunDir, check_parent_not_world_writable, make_private_dir
from ..rundir.records import DeploymentRecord, JobId
from .idle import parse_duration

SHAPES = ("hetjob", "array")


def _duration(text: str) -> str:
    try:
        parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"IDLE_TIMEOUT: {exc}") from None
    return text


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="speedslurm-node.pyz template", description="run one replica of a template")
    p.add_argument("shape", choices=SHAPES)
    p.add_argument("--model", required=True, help="the GGUF file (the first shard of a split model)")
    p.add_argument("--model-name", default="", help="the name clients send (default: the file name)")
    p.add_argument("--bin-dir", default="", help="folder with llama-server and ggml-rpc-server (default: PATH)")
    p.add_argument("--run-dir", default="", help="shared folder for this deployment")
    p.add_argument("--ctx", type=int, default=8192)
    p.add_argument("--parallel", type=int, default=4)
    p.add_argument("--ngl", type=int, default=99)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--server-port", type=int, default=8080)
    p.add_argument("--rpc-port", type=int, default=50052)
    p.add_argument("--rpc-cache", type=int, choices=(0, 1), default=1)
    p.add_argument("--rpc-cache-dir", default="")
    p.add_argument("--extra-server-args", default="")
    p.add_argument("--extra-rpc-args", default="")
    p.add_argument("--follower-timeout", type=float, default=300)
    p.add_argument("--health-timeout", type=float, default=1800)
    p.add_argument("--idle-timeout", type=_duration, default="0",
                   help="end the job after no request for this long (90s, 30m, 2h); 0: never")
    return p


def log(text: str) -> None:
    print(f"[speedslurm] {time.strftime('%H:%M:%S')} {os.environ.get('SLURMD_NODENAME', '?')}: {text}",
          file=sys.stderr, flush=True)


def job_shape(shape: str, env: tp.Mapping[str, str]) -> tuple[int, str, list[str], int]:
    """(replica, this replica's job id, every replica's job id, nodes per replica) from Slurm's environment."""
    job = env.get("SLURM_JOB_ID", "")
    if not job:
        raise SystemExit("not inside a Slurm job (SLURM_JOB_ID is not set): submit the template with sbatch")
    if shape == "hetjob":
        followers = int(env.get("SLURM_JOB_NUM_NODES_HET_GROUP_1") or 0)
        return 0, job, [job], followers + 1
    array, task = env.get("SLURM_ARRAY_JOB_ID"), env.get("SLURM_ARRAY_TASK_ID")
    nodes = int(env.get("SLURM_JOB_NUM_NODES") or 1)
    if not (array and task):
        return 0, job, [job], nodes
    count = int(env.get("SLURM_ARRAY_TASK_COUNT") or 1)
    first = int(env.get("SLURM_ARRAY_TASK_MIN") or 0)
    if first != 0:
        raise SystemExit(f"--array must count from 0 (task id = replica number); this array starts at {first}")
    return int(task), str(JobId(array, task)), [str(JobId(array, str(i))) for i in range(count)], nodes


def default_run_dir(name: str, base_job: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "-", name)[:32] or "model"
    return Path.home() / ".local/share/speedslurm/runs" / f"{safe}-{base_job}"


def find_binaries(bin_dir: str) -> dict[str, tp.Any]:
    """deployment.json's ``binaries`` for the binaries found here (``bin_dir``, else PATH or the package)."""
    from .binaries import find_llama_binaries, job_record

    return job_record(find_llama_binaries(bin_dir or None))


def prepare(args: argparse.Namespace, replica: int, job_ids: list[str], nodes: int,
            binaries: dict[str, tp.Any]) -> RunDir:
    """The run directory as the client makes it, for a template's job (every replica writes the same record)."""
    name = args.model_name or Path(args.model).name.removesuffix(".gguf")
    root = Path(args.run_dir).expanduser() if args.run_dir else default_run_dir(name, JobId.base_of(job_ids[0]))
    check_parent_not_world_writable(root.absolute().parent)  # as the client refuses it: others could swap the folder
    rd = RunDir(make_private_dir(root.absolute()))
    make_private_dir(rd.replica_dir(replica))
    make_private_dir(rd.log_dir(replica))
    key = rd.root / "api_key"
    if not key.exists():
        tmp = rd.root / f".api_key.{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_urlsafe(32) + "\n")
        with contextlib.suppress(FileExistsError):
            os.link(tmp, key)  # the first replica's key wins
        tmp.unlink()
    # Handshake files of an earlier job in the same run directory are not this one's (the job side checks the
    # job id of each anyway; removing them keeps the folder readable).
    for path in (rd.endpoint_path(replica), rd.loading_path(replica), rd.failed_path(replica),
                 *rd.replica_dir(replica).glob("follower-*.json")):
        path.unlink(missing_ok=True)
    llama = {"ngl": args.ngl, "threads": args.threads or None, "server_port": args.server_port,
             "rpc_port": args.rpc_port, "rpc_cache": bool(args.rpc_cache), "rpc_cache_dir": args.rpc_cache_dir or None,
             "extra_server_args": shlex.split(args.extra_server_args),
             "extra_rpc_args": shlex.split(args.extra_rpc_args), "idle_timeout": args.idle_timeout}
    record = DeploymentRecord(
        id=rd.deployment_id, created_at=time.time(), uid=os.getuid(), executor="slurm",
        model={"name": name, "path": str(Path(args.model).expanduser().absolute())}, nodes=nodes,
        replicas=len(job_ids), ctx=args.ctx, parallel=args.parallel, job_ids=job_ids,
        submitted_by=f"sbatch (llama-rpc-{args.shape}.sbatch)", llama=llama, binaries=binaries,
        follower_timeout_s=args.follower_timeout, health_timeout_s=args.health_timeout, poll_interval_s=0.2,
        submitted_at=time.time())
    rd.write_deployment(record)
    return rd


def follower_step(shape: str, me: str, rd: RunDir, replica: int, nodes: int) -> list[str]:
    """The srun that starts one follower on each other node of the replica, running ``serve`` of this file."""
    common = ["--ntasks-per-node=1", "--kill-on-bad-exit=1", sys.executable, me, "serve", str(rd.root),
              str(replica), "--rank-offset", "1"]
    if shape == "hetjob":
        return ["srun", "--het-group=1", *common]
    return ["srun", "--relative=1", f"--nodes={nodes - 1}", f"--ntasks={nodes - 1}", *common]


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    replica, job_id, job_ids, nodes = job_shape(args.shape, os.environ)
    if not Path(args.model).expanduser().is_file():
        log(f"model file {args.model} does not exist here; set MODEL to a GGUF file the leader node can read")
    try:
        rd = prepare(args, replica, job_ids, nodes, find_binaries(args.bin_dir))
    except UsageError as exc:
        raise SystemExit(exc.render()) from None
    # One job id for every component: a hetjob's followers run in component 1, which has an id of its own.
    os.environ["SPEEDSLURM_JOB_ID"] = job_id
    log(f"deployment {rd.deployment_id} replica {replica}: {args.model} on {nodes} node(s), run directory {rd.root}")
    from .roles import serve

    followers = None
    if nodes > 1:
        me = os.path.abspath(sys.argv[0])
        followers = subprocess.Popen(follower_step(args.shape, me, rd, replica, nodes), stdin=subprocess.DEVNULL)
    try:
        code = serve(str(rd.root), replica, rank=0)
    finally:
        if followers is not None and followers.poll() is None:
            followers.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                followers.wait(10)
    if code == 0:
        endpoint = rd.endpoint_path(replica)
        log(f"ended; the endpoint file was {endpoint}")
    return code
