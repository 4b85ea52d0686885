"""`speedslurm doctor`: each check with a replaced command runner (the whole command on the test bed:
tests/real/test_doctor_real.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import typing as tp
from pathlib import Path

import pytest

from speedslurm.errors import CommandError
from speedslurm.ops import doctor
from speedslurm.settings.settings import ClusterSettings, LlamaSettings, ModelEntry, RunSettings, Settings


def _settings(tmp: Path, **kw: tp.Any) -> Settings:
    return Settings(cluster=ClusterSettings(partition="p"), llama=LlamaSettings(**kw.pop("llama", {})),
                    run=RunSettings(dir=str(tmp / "runs")), **kw)


def test_models_present_missing_and_remote(tmp_path: Path) -> None:
    here = tmp_path / "a.gguf"
    here.write_bytes(b"GGUF")
    models = {"a": ModelEntry(files=[str(here)]), "far": ModelEntry(files=["/nope/x.gguf"], host="gorgona1")}
    ok = doctor.check_models(_settings(tmp_path, models=models))
    assert ok.ok and "a" in ok.detail and "far (on gorgona1)" in ok.detail
    models["b"] = ModelEntry(files=[str(tmp_path / "b.gguf")], repo="x/y")
    bad = doctor.check_models(_settings(tmp_path, models=models))
    assert not bad.ok and "b.gguf" in bad.detail and "speedslurm models pull b" in bad.fix


def test_munge(tmp_path: Path) -> None:
    def good(argv: list[str], **kw: tp.Any) -> str:
        return "CRED:xyz" if argv[0] == "munge" else "STATUS:          Success (0)\n"

    def bad(argv: list[str], **kw: tp.Any) -> str:
        if argv[0] == "munge":
            raise CommandError(argv, 1, "", "munge: Error: Failed to access \"/run/munge/munge.socket.2\"")
        return ""

    assert doctor.check_munge(good).ok
    check = doctor.check_munge(bad)
    assert not check.ok and "munge.socket" in check.detail and "munged" in check.fix


def test_slurm_commands_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(doctor.shutil, "which", lambda name: None if name == "sacct" else f"/usr/bin/{name}")
    check = doctor.check_slurm_commands(lambda argv, **kw: "")
    assert not check.ok and check.detail == "not on PATH: sacct"


def test_slurm_commands_not_answering(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(doctor.shutil, "which", lambda name: f"/usr/bin/{name}")

    def call(argv: list[str], **kw: tp.Any) -> str:
        if argv[0] == "sacct":
            raise CommandError(argv, 1, "", "sacct: error: Problem talking to the database: Connection refused")
        return ""

    check = doctor.check_slurm_commands(call)
    assert not check.ok and "database" in check.detail and "slurmdbd" in check.fix


def test_run_dir_under_world_writable_folder(tmp_path: Path) -> None:
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    os.chmod(open_dir, 0o777)  # world-writable, no sticky bit
    s = Settings(run=RunSettings(dir=str(open_dir / "runs")))
    check = doctor.check_run_dir_private(s)
    assert not check.ok and "any user can write" in check.detail
    good = doctor.check_run_dir_private(Settings(run=RunSettings(dir=str(tmp_path / "mine" / "runs"))))
    assert good.ok and "0700" in good.detail


def _fake_nodes(answers: dict[str, tp.Any]) -> tp.Callable[..., str]:
    """A runner that answers each node's srun like the probe would (None: the node is busy)."""

    def call(argv: list[str], **kw: tp.Any) -> str:
        node = next(a.split("=", 1)[1] for a in argv if a.startswith("--nodelist="))
        probe = Path(argv[-3])
        answer = answers[node]
        if answer is None:
            raise CommandError(argv, 1, "", "srun: error: Unable to allocate resources: Requested nodes are busy")
        data = {"node": node, "address": f"10.0.0.{node[-1]}", "ports": answer.get("ports", {"0": "free"})}
        if answer.get("sees", True):
            data["probe"] = probe.read_text().strip()
        else:
            data["probe_error"] = f"[Errno 2] No such file or directory: '{probe}'"
        return "DOCTOR " + json.dumps(data) + "\n"

    return call


def test_on_nodes_shared_and_ports(tmp_path: Path) -> None:
    s = _settings(tmp_path)
    shared, ports = doctor.check_on_nodes(s, ["n1", "n2"], _fake_nodes({"n1": {}, "n2": {}}))
    assert shared.ok and ports.ok and "n1=10.0.0.1" in ports.detail
    assert not list((tmp_path / "runs").glob(".doctor-probe-*"))  # the probe is removed


def test_on_nodes_not_shared_busy_and_taken(tmp_path: Path) -> None:
    s = _settings(tmp_path, llama={"server_port": 8080})
    shared, ports = doctor.check_on_nodes(
        s, ["n1", "n2", "n3"],
        _fake_nodes({"n1": {"sees": False}, "n2": None, "n3": {"ports": {"8080": "Address already in use"}}}))
    assert not shared.ok and "not visible on: n1" in shared.detail and "shared filesystem" not in shared.detail
    assert "every node mounts" in shared.fix
    assert not ports.ok and "n3 10.0.0.3:8080 (Address already in use)" in ports.detail
    shared, _ = doctor.check_on_nodes(s, ["n2"], _fake_nodes({"n2": None}))
    assert not shared.ok and "no node could run the probe" in shared.detail and "busy" in shared.detail


def test_probe_argv_passes_values_as_arguments(tmp_path: Path) -> None:
    argv = doctor.node_probe_argv("/py", tmp_path / "p $(x)", [8080], {"n1": "10.0.0.1"}, "n1", "gorgonas")
    assert argv[:1] == ["srun"] and "--nodelist=n1" in argv and "--partition=gorgonas" in argv
    assert argv[-3:] == [str(tmp_path / "p $(x)"), "[8080]", '{"n1": "10.0.0.1"}']


def test_the_node_probe_runs_the_job_sides_address_check(tmp_path: Path) -> None:
    """doctor looks at a node through the job side's own lookup: an address a role would refuse is refused here."""
    (tmp_path / "probe").write_text("token\n")
    argv = doctor.node_probe_argv(sys.executable, tmp_path / "probe", [8080], {"n7": "127.0.0.1"}, "n7", None)
    argv = argv[argv.index(sys.executable):]
    env = {**os.environ, "SLURMD_NODENAME": "n7"}
    res = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)
    answer = doctor.parse_node_probe(res.stdout)
    assert answer is not None, res.stderr
    assert answer["probe"] == "token" and answer["address"] is None
    assert "loopback" in answer["address_error"] and "cluster.nodes.n7.address" in answer["address_error"]


# ------------------------------------------------------------------------------------------ on the bed
