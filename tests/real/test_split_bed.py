"""On the test bed: llama-server gets the planner's --tensor-split, and its devices hold the planned weights."""

from __future__ import annotations

import json
import re
import typing as tp
from pathlib import Path

import pytest

pytestmark = [pytest.mark.llama, pytest.mark.slurm]


@pytest.fixture
def ss(speedslurm_cli: tp.Callable[..., tp.Any]) -> tp.Any:
    return speedslurm_cli(timeout=180)


def test_llama_server_gets_the_planned_split_and_its_devices_follow_it(ss, tiny_gguf: Path) -> None:
    # -lv 4: llama-server logs each device's model buffer; --no-repack is the bed profile's own extra argument
    extra = 'llama.extra_server_args=["--no-repack", "-lv", "4"]'
    res = ss("--set", extra, "up", "--model", str(tiny_gguf), "--nodes", "3", "--executor", "slurm",
             "--timeout", "120", "--json")
    dep_id = json.loads(res.stdout)["deployment"]
    root = ss.runs / dep_id
    plan = json.loads((root / "deployment.json").read_text())["plan"]
    # the bed's leader is CPU-only: the two rpc-servers are the devices; 8 equal blocks and a smaller output
    # layer are balanced as 4 | 4 + output (llama.cpp's default even split would give 5 | 3 + output)
    assert plan["tensor_split"] == [4, 5]
    assert [d["node"] for d in plan["devices"]] == ["follower-1", "follower-2"]
    log = (root / "r0" / "logs" / "leader.log").read_text(errors="replace")
    argv = log.splitlines()[0]
    assert " --tensor-split 4,5" in argv, argv
    # the plan fixes context, layers and split: llama.cpp's own fitting pass (about a second) is turned off
    assert " --fit off" in argv and "fitting params" not in log, argv
    endpoint = json.loads((root / "r0" / "endpoint.json").read_text())
    for server, device in zip(endpoint["rpc_servers"], plan["devices"], strict=True):
        sizes = re.findall(rf"RPC\d*\[{re.escape(server)}\][^\n]*?model buffer size\s*=\s*([\d.]+) MiB", log)
        assert sizes, f"no model buffer on {server}\n{log[-3000:]}"
        planned = device["weights_bytes"] / 2**20
        print(f"{device['node']} {server}: model buffer {sizes[0]} MiB, planned {planned:.3f} MiB")
        assert abs(float(sizes[0]) - planned) <= 0.02 * planned, (server, sizes[0], planned)
