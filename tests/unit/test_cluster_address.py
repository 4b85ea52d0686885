"""Addresses that cannot work (issue 11): a node's cluster address that is loopback, unspecified or not on the
node is refused, in the settings before anything is queued, or on the node when the role starts, with the node,
the address, where it came from and the setting to fix (``cluster.nodes.<node>.address``).

Before, a DNS fallback's 127.0.1.1 (Debian maps the host name there) was taken as the node's address (its
servers then listened where no other node could reach them), and an address that the node does not have showed
up as "no free port on ...". The local executor's 127.0.0.1 is its own address, not a cluster address: kept.

On the test bed: tests/real/test_cluster_address_real.py.
"""

from __future__ import annotations

import json
import socket
import typing as tp
from pathlib import Path

import pytest

from speedslurm.cluster.registry import get as executor
from speedslurm.errors import ConfigError
from speedslurm.model.registry import ModelSpec
from speedslurm.node import roles as jobside
from speedslurm.node.children import RoleFailed
from speedslurm.node.net import cluster_address
from speedslurm.planning.plan import make_plan
from speedslurm.rundir.records import SCHEMA, DeploymentRecord
from speedslurm.settings.settings import load_settings

NOT_HERE = "192.0.2.1"  # TEST-NET-1 (RFC 5737): assigned to no interface of any machine


def spec() -> ModelSpec:
    path = Path("/models/m.gguf")
    return ModelSpec(name="m", path=path, files=(path,), weights_bytes=1_000_000_000, n_layer=24, n_head_kv=8,
                     head_dim=64, head_dim_v=64, ctx=8192, host=None, local=False)


# ------------------------------------------------------------------------------------------ settings (plan)


@pytest.mark.parametrize("address", ["127.0.0.1", "127.0.1.1", "0.0.0.0", "::1", "::"])
def test_plan_refuses_a_loopback_or_unspecified_node_address(user_config: Path, address: str) -> None:
    user_config.write_text(f"cluster:\n  nodes:\n    n2: {{address: {json.dumps(address)}}}\n")
    with pytest.raises(ConfigError) as err:
        make_plan(load_settings(profile="gorgonas"), spec(), runs_on=executor("slurm"))
    text = err.value.render()
    assert "cluster.nodes.n2.address" in err.value.message and address in text and str(user_config) in text
    assert "node n2" in text and "cluster.nodes.n2.address" in (err.value.fix or "")
    assert err.value.exit_code == 2


def test_plan_names_the_flag_that_set_it(user_config: Path) -> None:
    user_config.write_text("{}\n")
    settings = load_settings(profile="gorgonas", overrides=["cluster.nodes.n3.address=127.0.1.1"])
    with pytest.raises(ConfigError, match=r"--set.*cluster\.nodes\.n3\.address = '127\.0\.1\.1' is a loopback"):
        make_plan(settings, spec(), runs_on=executor("slurm"))


def test_plan_accepts_cluster_addresses_and_host_names(user_config: Path) -> None:
    user_config.write_text("cluster:\n  nodes:\n    n1: {address: 10.77.0.11}\n    n2: {address: n2-ib}\n")
    assert make_plan(load_settings(profile="gorgonas"), spec(), runs_on=executor("slurm")).nodes >= 1


# ------------------------------------------------------------------------------------------ on the node


def _no_slurm(monkeypatch: pytest.MonkeyPatch, node_addr: str | None) -> None:
    from speedslurm.node import net as nodenet

    monkeypatch.setattr(nodenet, "node_address", lambda node: node_addr)


def _dep(fields: dict[str, tp.Any]) -> DeploymentRecord:
    return DeploymentRecord.from_json({"schema": SCHEMA, "id": "d", "created_at": 0.0, "model": {"name": "m"},
                                       "nodes": 2, "replicas": 1, "ctx": 1, "parallel": 1, "job_ids": [],
                                       "submitted_by": "test", **fields})


def test_a_dns_fallback_to_127_0_1_1_is_refused_naming_dns(monkeypatch: pytest.MonkeyPatch) -> None:
    _no_slurm(monkeypatch, None)
    monkeypatch.setattr(socket, "gethostbyname", lambda name: "127.0.1.1")
    with pytest.raises(RoleFailed) as err:
        cluster_address(_dep({"executor": "slurm"}), "n2")
    reason = err.value.reason
    assert "node n2" in reason and "127.0.1.1" in reason and "DNS" in reason and "loopback" in reason
    assert "cluster.nodes.n2.address" in reason


def test_a_loopback_nodeaddr_is_refused_naming_slurm(monkeypatch: pytest.MonkeyPatch) -> None:
    _no_slurm(monkeypatch, "127.0.0.1")
    with pytest.raises(RoleFailed, match=r"node n1's cluster address 127\.0\.0\.1 \(from Slurm's NodeAddr\) is a "
                                         r"loopback address.*cluster\.nodes\.n1\.address"):
        cluster_address(_dep({"executor": "slurm"}), "n1")


def test_a_name_in_the_setting_that_resolves_to_loopback_is_refused() -> None:
    with pytest.raises(RoleFailed, match=r"localhost \(127\.0\.0\.1\) \(from the setting cluster\.nodes\.n4\.address\)"
                                         r" is a loopback address"):
        cluster_address(_dep({"executor": "slurm", "node_addresses": {"n4": "localhost"}}), "n4")


def test_an_unspecified_address_is_refused() -> None:
    with pytest.raises(RoleFailed, match="unspecified"):
        cluster_address(_dep({"executor": "slurm", "node_addresses": {"n1": "0.0.0.0"}}), "n1")


def test_an_address_that_is_not_on_this_node_is_refused_not_reported_as_no_free_port() -> None:
    with pytest.raises(RoleFailed) as err:
        cluster_address(_dep({"executor": "slurm", "node_addresses": {"n2": NOT_HERE}}), "n2")
    reason = err.value.reason
    assert f"{NOT_HERE} (from the setting cluster.nodes.n2.address) is not assigned to any interface of n2" in reason
    assert "cluster.nodes.n2.address" in reason.split(";")[-1] and "free port" not in reason


def test_an_address_of_this_node_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    ours = _own_address()
    if ours is None:
        pytest.skip("this machine has no non-loopback IPv4 address")
    assert cluster_address(_dep({"executor": "slurm", "node_addresses": {"n1": ours}}), "n1") == ours
    _no_slurm(monkeypatch, ours)
    assert cluster_address(_dep({"executor": "slurm"}), "n1") == ours


def test_the_local_executor_keeps_127_0_0_1() -> None:
    assert cluster_address(_dep({"executor": "local", "node_addresses": {"localhost": NOT_HERE}}), "localhost") \
        == "127.0.0.1"


def _own_address() -> str | None:
    """A non-loopback IPv4 address of this machine (the route to a TEST-NET address picks one; nothing is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((NOT_HERE, 9))
        except OSError:
            return None
        addr = str(s.getsockname()[0])
    return None if addr.startswith("127.") or addr == "0.0.0.0" else addr


def test_the_role_fails_with_the_reason_in_failed_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The follower's reason reaches failed.json, which ``up`` and ``status`` read (the bed test shows it end to end)."""
    from speedslurm.rundir.layout import RunDir

    rd = RunDir(tmp_path / "d")
    (rd.root / "r0" / "logs").mkdir(parents=True)
    dep = _dep({"executor": "slurm", "node_addresses": {"n2": NOT_HERE}, "llama": {}, "binaries": {}})
    monkeypatch.setenv("SLURMD_NODENAME", "n2")
    monkeypatch.setenv("SPEEDSLURM_JOB_ID", "77")
    with pytest.raises(RoleFailed) as err:
        jobside.run_follower(dep, rd, 0, 1, jobside._Stop())
    jobside._fail(rd, 0, "follower", 1, err.value)
    failed = json.loads(rd.failed_path(0).read_text())
    assert NOT_HERE in json.dumps(failed) and "cluster.nodes.n2.address" in json.dumps(failed)


# ------------------------------------------------------------------------------------------ on the test bed
