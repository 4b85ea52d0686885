"""Run directory: private modes, atomic endpoint file."""

from __future__ import annotations

import json
import os
import stat
import threading
from pathlib import Path

import pytest

from speedslurm.errors import UsageError
from speedslurm.rundir.layout import RunDir, check_parent_not_world_writable, make_private_dir
from speedslurm.rundir.records import Endpoint, write_json_atomic


def _endpoint(i: int = 0) -> Endpoint:
    return Endpoint(url="http://10.77.0.11:8080", api_key="secret-key", model="m", deployment_id="d", replica=i,
                    job_id="1", leader_node="n1", follower_nodes=["n2"], rpc_servers=["10.77.0.12:5"],
                    llama_version="v", parallel=4, ctx=2048, started_at=1.0, ready_at=2.0)


def test_endpoint_file_is_0600_and_round_trips(tmp_path: Path) -> None:
    rd = RunDir(make_private_dir(tmp_path / "dep"))
    rd.replica_dir(0).mkdir()
    write_json_atomic(rd.endpoint_path(0), _endpoint().to_json())
    assert stat.S_IMODE(rd.endpoint_path(0).stat().st_mode) == 0o600
    assert stat.S_IMODE(rd.root.stat().st_mode) == 0o700
    assert rd.endpoint(0) == _endpoint()
    assert rd.endpoint(0).openai_base_url == "http://10.77.0.11:8080/v1"


def test_public_view_masks_the_key() -> None:
    assert _endpoint().public()["api_key"] == "***"
    assert _endpoint().public(show_key=True)["api_key"] == "secret-key"


def test_readers_never_see_a_partial_file(tmp_path: Path) -> None:
    path = tmp_path / "endpoint.json"
    big = {"x": "y" * 200_000}
    stop = threading.Event()
    seen: list[str] = []

    def reader() -> None:
        while not stop.is_set():
            try:
                seen.append(json.loads(path.read_text())["x"][:1])
            except FileNotFoundError:
                pass

    t = threading.Thread(target=reader)
    t.start()
    for _ in range(50):
        write_json_atomic(path, big)
    stop.set()
    t.join()
    assert seen and set(seen) == {"y"}  # json.loads never failed on a half-written file
    assert not [p for p in tmp_path.iterdir() if p.name != "endpoint.json"]  # no temp files left


def test_existing_open_dir_is_made_private(tmp_path: Path) -> None:
    d = tmp_path / "runs"
    d.mkdir(mode=0o755)
    os.chmod(d, 0o755)
    make_private_dir(d)
    assert stat.S_IMODE(d.stat().st_mode) == 0o700


def test_world_writable_parent_is_refused(tmp_path: Path) -> None:
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    os.chmod(open_dir, 0o777)
    with pytest.raises(UsageError, match="any user can write"):
        check_parent_not_world_writable(open_dir / "runs")
    os.chmod(open_dir, 0o1777)  # sticky, like /tmp: others cannot replace our folders
    check_parent_not_world_writable(open_dir / "runs")
