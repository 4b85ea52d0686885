"""Build llama.cpp once as a Slurm job into a shared prefix, then check every node can run the result.

The job script is ``sbatch_templates/build-llama.sbatch`` with its settings block filled in by
:func:`render_build_script` (pure, every value shell-quoted), so users who submit the template by hand and
``speedslurm build-llama`` run the same build. The client follows the job (its state and its log), then:

* finds ``llama-server`` and the RPC server in ``PREFIX/bin`` and reads the version;
* checks that both come from one build (:func:`binaries.check_same_build`): a mismatch fails the RPC
  handshake;
* runs both on every node of the partition (one ``srun`` task per node), so a node that lacks a library
  (or CUDA driver) shows up now and not when a deployment starts there.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import time
import typing as tp
from pathlib import Path

from ..cluster import slurm
from ..cluster.proc import call
from ..errors import CommandError, DeploymentFailed, UsageError
from ..planning.sbatchopts import has_control
from ..settings.packaged import TEMPLATES, data_dir

TEMPLATE_NAME = "build-llama.sbatch"
SETTINGS_START = "# ---- settings"
SETTINGS_END = "# ---- end of settings"
_PARSABLE_RE = re.compile(r"^(?P<id>\d+)(?:;\S+)?$")
_NODE_LINE_RE = re.compile(r"^NODE\|(?P<node>[^|]*)\|(?P<server_rc>-?\d+)\|(?P<rpc_rc>-?\d+)\|(?P<version>.*)$")


def templates_dir() -> Path:
    """The packaged ``sbatch_templates/`` folder; ``$SPEEDSLURM_TEMPLATES_DIR`` replaces it."""
    env = os.environ.get("SPEEDSLURM_TEMPLATES_DIR")
    folder = Path(env) if env else data_dir(TEMPLATES)
    if folder is None or not (folder / TEMPLATE_NAME).is_file():
        raise UsageError(f"the sbatch templates are not in {folder or 'the installed package'}",
                         fix="reinstall speedslurm (its wheel carries sbatch_templates/), or set "
                             "SPEEDSLURM_TEMPLATES_DIR to a folder holding them")
    return folder


def template_text(name: str = TEMPLATE_NAME) -> str:
    return (templates_dir() / name).read_text()


@dataclasses.dataclass(frozen=True)
class BuildOptions:
    """What to build and where; the keyword names mirror ``speedslurm build-llama``'s flags."""

    prefix: Path
    source: Path | None = None
    git_url: str | None = None
    git_ref: str | None = None
    cuda: bool = True
    cuda_archs: str = "86;89"
    partition: str | None = None
    cpus: int | None = None
    time: str = "02:00:00"
    build_dir: Path | None = None
    native: bool = False
    extra_cmake_args: tuple[str, ...] = ()  # more options for cmake's configure step, one argument each

    def __post_init__(self) -> None:
        if (self.source is None) == (self.git_url is None):
            raise UsageError("say what to build: exactly one of --source DIR or --git URL",
                             fix="e.g. speedslurm build-llama --source ~/src/llama.cpp")
        if self.git_ref and self.git_url is None:
            raise UsageError("--ref goes with --git", fix="check out the ref in your --source tree instead")
        if self.cpus is not None and self.cpus < 1:
            raise UsageError(f"--cpus {self.cpus} must be at least 1", fix="pass --cpus 1 or more")
        if self.cuda and not re.fullmatch(r"[0-9a-z;,_-]+", self.cuda_archs):
            raise UsageError(f"--cuda-archs {self.cuda_archs!r} is not a CUDA architecture list",
                             fix='write it like "86;89"')
        if isinstance(self.extra_cmake_args, str):
            raise UsageError(f"extra_cmake_args {self.extra_cmake_args!r} is a string, not a list of arguments",
                             fix='pass one item per cmake argument, e.g. ("-DGGML_NATIVE=OFF",)')
        object.__setattr__(self, "extra_cmake_args", tuple(self.extra_cmake_args))
        for arg in self.extra_cmake_args:
            check_cmake_arg(arg)

    @property
    def log_dir(self) -> Path:
        return self.prefix / "logs"

    @property
    def log_pattern(self) -> Path:
        return self.log_dir / "build-llama-%j.log"

    def log_path(self, job_id: str) -> Path:
        return Path(str(self.log_pattern).replace("%j", job_id))

    @property
    def bin_dir(self) -> Path:
        return self.prefix / "bin"

    def variables(self) -> dict[str, str]:
        """The template's settings, as the job will see them."""
        return {
            "SOURCE_DIR": str(self.source) if self.source else "",
            "GIT_URL": self.git_url or "",
            "GIT_REF": self.git_ref or "",
            "PREFIX": str(self.prefix),
            "BUILD_DIR": str(self.build_dir) if self.build_dir else "",
            "CUDA": "ON" if self.cuda else "OFF",
            "CUDA_ARCHS": self.cuda_archs,
            "NATIVE": "ON" if self.native else "OFF",
            "JOBS": "",
            # Shell words: the job splits them as the shell would, so an argument may hold spaces.
            "EXTRA_CMAKE_ARGS": shlex.join(self.extra_cmake_args),
        }

    def sbatch_options(self) -> dict[str, str]:
        opts = {"job-name": "build-llama", "nodes": "1", "ntasks": "1", "time": self.time,
                "output": str(self.log_pattern)}
        if self.cpus:
            opts["cpus-per-task"] = str(self.cpus)
        if self.partition:
            opts["partition"] = self.partition
        return opts


def check_cmake_arg(arg: str) -> str:
    """``arg`` when it can be one more argument of cmake's configure step; :class:`UsageError` otherwise."""
    if has_control(arg):
        raise UsageError(f"--cmake-arg {arg!r} contains a control character, which a job script cannot carry",
                         fix="write the option on one line without control characters")
    if not arg.startswith("-"):
        raise UsageError(f"--cmake-arg {arg!r} is not a cmake option (cmake would take it for a source folder)",
                         fix="pass options such as --cmake-arg=-DGGML_NATIVE=OFF, one per --cmake-arg")
    return arg


def _no_newline(name: str, value: str) -> str:
    # A newline would end an #SBATCH comment and start a shell line: refuse it rather than quote it.
    if "\n" in value or "\r" in value or "\0" in value:
        raise UsageError(f"{name} {value!r} contains a line break or NUL, which a job script cannot carry",
                         fix=f"choose a {name} without control characters")
    return value


def render_build_script(template: str, opts: BuildOptions) -> str:
    """The template with its settings block and ``#SBATCH`` options filled in from ``opts``. Pure."""
    lines = template.split("\n")
    try:
        start = next(i for i, line in enumerate(lines) if line.startswith(SETTINGS_START))
        end = next(i for i, line in enumerate(lines) if line.startswith(SETTINGS_END))
    except StopIteration:
        raise UsageError(f"{TEMPLATE_NAME} lacks its settings markers", fix="restore the template from speedslurm") from None
    settings = [lines[start].replace("edit here or pass them with sbatch --export=ALL,NAME=value", "filled in by speedslurm")]
    for name, value in opts.variables().items():
        settings.append(f"{name}={shlex.quote(_no_newline(name, value))}")
    wanted = opts.sbatch_options()
    header: list[str] = []
    seen: set[str] = set()
    for line in lines[:start]:
        m = re.match(r"^#SBATCH --(?P<key>[a-z-]+)=", line)
        if m and m["key"] in wanted:
            key = m["key"]
            header.append(f"#SBATCH --{key}={shlex.quote(_no_newline(key, wanted[key]))}")
            seen.add(key)
        elif m and m["key"] == "cpus-per-task" and opts.cpus is None:
            continue  # Slurm's default: the job asks for what the partition gives
        else:
            header.append(line)
    last = max(i for i, line in enumerate(header) if line.startswith("#SBATCH"))
    extra = [f"#SBATCH --{k}={shlex.quote(_no_newline(k, v))}" for k, v in sorted(wanted.items()) if k not in seen]
    header[last + 1:last + 1] = extra
    return "\n".join(header + settings + lines[end:])


def submit(script: str, folder: Path) -> tuple[str, Path]:
    """Write the script under ``folder`` and submit it with ``sbatch --parsable``: (job id, script path)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"build-llama-{time.strftime('%Y%m%d-%H%M%S')}.sbatch"
    path.write_text(script)
    out = call(["sbatch", "--parsable", str(path)], timeout=60).strip()
    m = _PARSABLE_RE.match(out.splitlines()[-1] if out else "")
    if not m:
        raise CommandError(["sbatch", "--parsable", str(path)], 0, out, "no job id in sbatch's output")
    return m["id"], path


class LogFollower:
    """Hands out the lines appended to a file since the last call (the file may not exist yet)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.partial = b""

    def new_lines(self) -> list[str]:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                data = fh.read()
        except FileNotFoundError:
            return []
        self.offset += len(data)
        data = self.partial + data
        *complete, self.partial = data.split(b"\n")
        return [line.decode("utf-8", "replace") for line in complete]

    def flush(self) -> list[str]:
        lines = self.new_lines()
        if self.partial:
            lines.append(self.partial.decode("utf-8", "replace"))
            self.partial = b""
        return lines


def follow_job(job_id: str, log_path: Path, *, on_line: tp.Callable[[str], None] = lambda line: None,
               on_state: tp.Callable[[str, float], None] = lambda state, elapsed: None,
               states: tp.Callable[[list[str]], dict[str, slurm.JobState]] = slurm.job_states,
               timeout: float | None = None, state_every: float = 2.0,
               clock: tp.Callable[[], float] = time.monotonic, sleep: tp.Callable[[float], None] = time.sleep,
               interval: float = 0.5) -> slurm.JobState:
    """Print the job's log as it grows and its state as it changes, until the job ends; its final state.

    A job missing from both squeue and sacct for 30 s counts as gone (FAILED).
    """
    follower = LogFollower(log_path)
    start = clock()
    last_state = ""
    next_query = start
    missing_since: float | None = None
    while True:
        for line in follower.new_lines():
            on_line(line)
        now = clock()
        if now >= next_query:
            next_query = now + state_every
            js = states([job_id]).get(job_id)
            if js is None:
                missing_since = missing_since if missing_since is not None else now
                if now - missing_since > 30:
                    return slurm.JobState(job_id, "FAILED", "the job is in neither squeue nor sacct")
            else:
                missing_since = None
                if js.state != last_state:
                    last_state = js.state
                    on_state(js.state, now - start)
                if js.final:
                    sleep(interval)  # the last lines may still be on their way through the filesystem
                    for line in follower.flush():
                        on_line(line)
                    return js
        if timeout is not None and now - start > timeout:
            raise DeploymentFailed(f"build job {job_id} still {last_state or 'unknown'} after {timeout:.0f}s",
                                   fix=f"follow it with `tail -f {log_path}`; cancel it with `scancel {job_id}`")
        sleep(interval)


# ----------------------------------------------------------------------------------------------------------
# Checks after the build

# Runs on each node: one line NODE|name|llama-server rc|rpc-server rc|version. The binaries come in as
# arguments, never pasted into the script text.
_NODE_CHECK = r"""
out=$("$1" --version 2>&1); src=$?
rpc=$("$2" --help 2>&1 >/dev/null); rrc=$?
ver=$(printf '%s\n' "$out" | sed -n 's/^version: *//p' | head -n1)
[ "$src" = 0 ] || ver=$(printf '%s' "$out" | tail -n2 | tr '\n|' '  ')
[ "$rrc" = 0 ] || ver="$ver; rpc: $(printf '%s' "$rpc" | tail -n2 | tr '\n|' '  ')"
printf 'NODE|%s|%s|%s|%s\n' "${SLURMD_NODENAME:-?}" "$src" "$rrc" "$ver"
"""


@dataclasses.dataclass(frozen=True)
class NodeCheck:
    node: str
    ok: bool
    version: str
    error: str = ""

    def to_json(self) -> dict[str, tp.Any]:
        return dataclasses.asdict(self)


def node_check_argv(server: Path, rpc: Path, partition: str | None, nodes: tp.Sequence[str],
                    timeout_min: int = 5) -> list[str]:
    argv = ["srun", f"--nodes={len(nodes)}", f"--nodelist={','.join(nodes)}", "--ntasks-per-node=1",
            "--cpus-per-task=1", "--mem=200M", f"--time={timeout_min}", "--job-name=speedslurm-check"]
    if partition:
        argv.append(f"--partition={partition}")
    return [*argv, "bash", "-c", _NODE_CHECK, "node-check", str(server), str(rpc)]


def parse_node_checks(output: str, nodes: tp.Sequence[str], expected_version: str) -> list[NodeCheck]:
    found: dict[str, NodeCheck] = {}
    for line in output.splitlines():
        m = _NODE_LINE_RE.match(line.strip())
        if not m:
            continue
        node, version = m["node"], m["version"].strip()
        if m["server_rc"] != "0" or m["rpc_rc"] != "0":
            found[node] = NodeCheck(node, False, "", version or "the binaries do not start")
        elif version != expected_version:
            found[node] = NodeCheck(node, False, version,
                                    f"llama-server reports {version!r} here but {expected_version!r} on this machine")
        else:
            found[node] = NodeCheck(node, True, version)
    for node in nodes:
        found.setdefault(node, NodeCheck(node, False, "", "no answer from this node"))
    return [found[n] for n in nodes]


def check_nodes(server: Path, rpc: Path, partition: str | None, nodes: tp.Sequence[str], expected_version: str,
                timeout: float = 600) -> list[NodeCheck]:
    """Run both binaries on every node (one srun task per node)."""
    try:
        out = call(node_check_argv(server, rpc, partition, nodes), timeout=timeout, check=False)
    except CommandError as exc:
        return [NodeCheck(n, False, "", exc.message) for n in nodes]
    return parse_node_checks(out, nodes, expected_version)


def usable_nodes(partition: str | None) -> list[str]:
    """Nodes of the partition that can take a job now or later (not down, drained or failed)."""
    info = slurm.partition_info(partition)
    bad = ("down", "drain", "drng", "fail", "maint", "unk", "npc", "futr")
    return [n for n in info["nodes"] if not info["detail"][n]["state"].rstrip("*~#!%$@^-").startswith(bad)]


def write_bin_dir_setting(config_path: Path, bin_dir: Path) -> Path:
    """Set ``llama.bin_dir`` in the user config file, keeping its other settings; returns the file."""
    import yaml

    data: dict[str, tp.Any] = {}
    if config_path.exists():
        loaded = yaml.safe_load(config_path.read_text())
        if loaded is not None and not isinstance(loaded, dict):
            raise UsageError(f"{config_path} does not hold a mapping of settings",
                             fix=f"add `llama: {{bin_dir: {bin_dir}}}` to it by hand")
        data = loaded or {}
    llama = data.setdefault("llama", {})
    if not isinstance(llama, dict):
        raise UsageError(f"{config_path}: `llama` is not a mapping", fix=f"set llama.bin_dir to {bin_dir} by hand")
    llama["bin_dir"] = str(bin_dir)
    config_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = config_path.with_name(f".{config_path.name}.tmp")
    tmp.write_text(yaml.safe_dump(data, sort_keys=False))
    os.replace(tmp, config_path)
    return config_path


@dataclasses.dataclass
class BuildReport:
    """What ``build-llama`` found: the binaries, their version and build, and each node's check."""

    bin_dir: Path
    llama_server: Path | None = None
    rpc_server: Path | None = None
    version: str = ""
    server_build: str = ""
    rpc_build: str = ""
    problems: list[str] = dataclasses.field(default_factory=list)
    nodes: list[NodeCheck] = dataclasses.field(default_factory=list)

    @property
    def same_build(self) -> bool:
        return bool(self.server_build) and self.server_build == self.rpc_build

    @property
    def ok(self) -> bool:
        return not self.problems and all(n.ok for n in self.nodes)

    def to_json(self) -> dict[str, tp.Any]:
        return {"bin_dir": str(self.bin_dir), "llama_server": str(self.llama_server or ""),
                "rpc_server": str(self.rpc_server or ""), "version": self.version,
                "server_build": self.server_build, "rpc_build": self.rpc_build, "same_build": self.same_build,
                "problems": self.problems, "nodes": [n.to_json() for n in self.nodes], "ok": self.ok,
                "setting": f"llama.bin_dir: {self.bin_dir}"}


def verify_build(bin_dir: Path, partition: str | None, *, nodes: tp.Sequence[str] | None = None,
                 on_nodes: bool = True) -> BuildReport:
    """Find the binaries in ``bin_dir``, compare their builds, and run them on every usable node."""
    from ..node.binaries import build_id, check_same_build, find_llama_binaries

    report = BuildReport(bin_dir)
    try:
        bins = find_llama_binaries(bin_dir)
        report.llama_server, report.rpc_server = bins.llama_server, bins.rpc_server
        report.version = bins.version
        report.server_build, report.rpc_build = build_id(bins.llama_server), build_id(bins.rpc_server)
        check_same_build(report.server_build, report.rpc_build, where=str(bin_dir))
    except UsageError as exc:
        report.problems.append(exc.message)
        return report
    if on_nodes:
        targets = list(nodes) if nodes is not None else usable_nodes(partition)
        report.nodes = check_nodes(bins.llama_server, bins.rpc_server, partition, targets, report.version)
    return report
