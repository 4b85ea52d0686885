"""Nobody else on the lab network can use or hijack a deployment: sockets, API key, file modes, hostile paths."""

from __future__ import annotations

import functools
import ipaddress
import json
import os
import stat
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from cliproc import speedslurm_proc

pytestmark = [pytest.mark.llama]
bed = pytest.mark.slurm

CLUSTER_NET = ipaddress.ip_network("10.77.0.0/24")
NAMESPACES = ["ssn1", "ssn2", "ssn3", "ssn4"]
# A folder name that breaks naive shell quoting three ways: spaces, quotes, command substitution.
HOSTILE = "we ird 'q\" $(touch PWNED) `touch PWNED2`; x"

speedslurm = functools.partial(speedslurm_proc, timeout=180)


def listeners(netns: str | None) -> list[tuple[str, int, set[int]]]:
    """(address, port, pids) of every TCP listener in a namespace (None: this one)."""
    argv = ["ss", "-Hltnp"]
    if netns:
        argv = ["nsenter", f"--net=/run/netns/{netns}", *argv]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    rows = []
    for line in out.splitlines():
        parts = line.split()
        addr, _, port = parts[3].rpartition(":")
        pids = {int(p.split("=")[1].rstrip(",)")) for p in parts[-1].split(",") if p.startswith("pid=")}
        rows.append((addr.strip("[]"), int(port), pids))
    return rows


def post_chat(url: str, key: str | None) -> int:
    req = urllib.request.Request(url + "/v1/chat/completions", method="POST", data=json.dumps(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).encode(),
        headers={"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


@pytest.fixture
def hostile_env(shared_tmp: Path) -> dict[str, str]:
    root = shared_tmp / HOSTILE / "runs"
    return {**os.environ, "SPEEDSLURM_PROFILE": "testbed", "SPEEDSLURM_RUN__DIR": str(root)}


@bed
def test_deployment_is_private(hostile_env: dict[str, str], shared_tmp: Path, tiny_gguf: Path) -> None:
    """One 3-node deployment under a hostile run dir path, then every check on it."""
    env = hostile_env
    up = speedslurm(env, "--set", "llama.rpc_cache=false", "up", "--model", str(tiny_gguf), "--nodes", "3",
                    "--executor", "slurm", "--timeout", "150", "--json")
    assert up.returncode == 0, up.stderr
    dep_id = json.loads(up.stdout)["deployment"]
    try:
        rd = Path(env["SPEEDSLURM_RUN__DIR"]) / dep_id
        assert rd.is_dir(), "the run dir is not at the hostile path, verbatim"
        endpoint = json.loads((rd / "r0" / "endpoint.json").read_text())
        key, url = endpoint["api_key"], endpoint["url"]
        assert key and len(key) >= 32

        # -- sockets: the deployment's servers listen only on cluster addresses, in every namespace
        ours = {endpoint["pid"]} | {json.loads(f.read_text())["pid"] for f in (rd / "r0").glob("follower-*.json")}
        seen = []
        for ns in [None, *NAMESPACES]:
            for addr, port, pids in listeners(ns):
                if pids & ours:
                    seen.append((ns, addr, port))
                    assert addr not in ("0.0.0.0", "::", "*"), f"listening on all addresses in {ns}: {addr}:{port}"
                    assert ipaddress.ip_address(addr) in CLUSTER_NET, f"{addr}:{port} in {ns} is outside the cluster"
        assert len(seen) == 3, seen  # llama-server and two rpc-servers, each in its own node's namespace
        assert {ns for ns, _a, _p in seen} <= set(NAMESPACES)

        # -- the API key: required, and never shown unless asked for
        assert post_chat(url, None) == 401
        assert post_chat(url, "wrong-key") == 401
        assert post_chat(url, key) == 200
        assert key not in up.stdout + up.stderr
        for args in (["status"], ["status", "--json"], ["status", dep_id, "--json"], ["endpoint", dep_id],
                     ["endpoint", dep_id, "--json"], ["logs", dep_id], ["config", "show", "--json"]):
            res = speedslurm(env, *args)
            assert res.returncode == 0, res.stderr
            assert key not in res.stdout + res.stderr, f"`speedslurm {' '.join(args)}` shows the key"
        for args in (["endpoint", dep_id, "--env"], ["endpoint", dep_id, "--show-key"],
                     ["endpoint", dep_id, "--json", "--show-key"]):
            assert key in speedslurm(env, *args).stdout, f"`speedslurm {' '.join(args)}` should show the key"
        for path in rd.rglob("*"):
            if path.is_file() and path.name not in ("api_key", "endpoint.json"):
                assert key.encode() not in path.read_bytes(), f"the key is in {path.relative_to(rd)}"
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit():
                try:
                    cmdline = (proc / "cmdline").read_bytes()
                except OSError:
                    continue
                assert key.encode() not in cmdline, f"the key is on process {proc.name}'s command line"

        # -- modes and owner
        uid = os.getuid()
        for path, mode in [(rd, 0o700), (rd / "r0", 0o700), (rd / "api_key", 0o600), (rd / "r0" / "endpoint.json", 0o600),
                           (rd.parent, 0o700)]:
            st = path.stat()
            assert stat.S_IMODE(st.st_mode) == mode, f"{path}: {oct(stat.S_IMODE(st.st_mode))}"
            assert st.st_uid == uid
        for log in (rd / "r0" / "logs").glob("*.log"):
            assert stat.S_IMODE(log.stat().st_mode) == 0o600, log
    finally:
        down = speedslurm(env, "down", dep_id)
    assert down.returncode == 0, down.stderr
    assert not list(shared_tmp.rglob("PWNED*")) and not list(Path.cwd().glob("PWNED*")), "a path was run as a command"


def test_plan_job_script_survives_hostile_paths_and_names(shared_tmp: Path, tiny_gguf: Path) -> None:
    """Model file named to inject options and commands, run dir named to break quoting: the script is inert."""
    import shutil

    model = shared_tmp / "ev il'; touch PWNED; $(touch PWNED2)\n#SBATCH --nodelist=n9 x.gguf"
    shutil.copy(tiny_gguf, model)
    runs = shared_tmp / HOSTILE / "runs"
    env = {**os.environ, "SPEEDSLURM_PROFILE": "testbed", "SPEEDSLURM_RUN__DIR": str(runs)}
    res = speedslurm(env, "plan", "--model", str(model), "--nodes", "2", "--executor", "slurm", "--json")
    assert res.returncode == 0, res.stderr
    script = json.loads(res.stdout)["job_script"]
    sbatch = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    assert not any("nodelist=n9" in line for line in sbatch), "the model name injected an #SBATCH option"
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    # Run every shell line (not srun) with the paths: nothing is executed from them, the exports hold them verbatim.
    body = "\n".join(line for line in script.splitlines() if line.startswith("export "))
    out = subprocess.run(["bash", "-c", body + '\nprintf %s "$SPEEDSLURM_RUN_DIR"'], capture_output=True, text=True,
                         cwd=shared_tmp)
    assert out.stdout == str(runs / "<deployment-id>")
    assert not list(shared_tmp.rglob("PWNED*"))
    # A line break in the run directory path is refused outright (it would end an #SBATCH line).
    cfg = shared_tmp / "config.yaml"
    cfg.write_text("run:\n  dir: " + json.dumps(str(shared_tmp / "a\n#SBATCH --nodelist=n9")) + "\n")
    env.pop("SPEEDSLURM_RUN__DIR")
    env["SPEEDSLURM_CONFIG"] = str(cfg)
    res = speedslurm(env, "plan", "--model", str(tiny_gguf), "--executor", "slurm")
    assert res.returncode == 2 and "control character" in res.stderr, res.stderr


@pytest.mark.parametrize("how", ["world-writable parent", "world-writable runs folder", "runs folder of another user"])
def test_refuses_a_run_directory_others_can_write(how: str, shared_tmp: Path, tiny_gguf: Path) -> None:
    base = shared_tmp / "open"
    base.mkdir()
    runs = base / "runs"
    if how == "world-writable parent":
        base.chmod(0o777)
    elif how == "world-writable runs folder":
        runs.mkdir()
        runs.chmod(0o777)
    else:
        runs.mkdir(mode=0o700)
        os.chown(runs, 65534, 65534)
    env = {**os.environ, "SPEEDSLURM_PROFILE": "testbed", "SPEEDSLURM_RUN__DIR": str(runs)}
    res = speedslurm(env, "up", "--model", str(tiny_gguf), "--nodes", "2", "--executor", "local")
    assert res.returncode == 2, res.stderr
    assert ("any user can write" in res.stderr or "not you" in res.stderr) and "Fix:" in res.stderr, res.stderr
    assert not list(runs.glob("*/deployment.json")) if runs.is_dir() and os.access(runs, os.R_OK) else True
    # A sticky folder (like /tmp) is fine: others cannot replace what is ours in it.
    sticky = shared_tmp / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)
    env["SPEEDSLURM_RUN__DIR"] = str(sticky / "runs")
    ok = speedslurm(env, "plan", "--model", str(tiny_gguf), "--executor", "local")
    assert ok.returncode == 0, ok.stderr
