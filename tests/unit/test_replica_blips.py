"""A replica that refuses or drops connections for a while is probed with backoff and serves again; only its
source's word (failed.json, its job ended) or a long outage (run.outage_s) gives it up."""

from __future__ import annotations

import json
import socket
import sys
import threading
import typing as tp
from pathlib import Path

import pytest
from rich.console import Console

from devtools.stubserver import StubServer
from speedslurm.batch.runner import BatchFailed, BatchOptions, prepare_batch, run_batch
from speedslurm.batch.sources import StaticSource
from speedslurm.batch.summary import Summary
from speedslurm.rundir.records import Endpoint, write_json_atomic

FAST: dict[str, tp.Any] = dict(poll_interval=0.02, backoff_base=0.01, backoff_max=0.05, settle=0.2, quiet=True,
                               timeout=20.0, probe_base=0.01, probe_max=0.05)


class DroppingProxy:
    """A TCP front for a server that closes its first ``drop_first`` connections at once, without a byte (a
    restarting proxy, a flaky link), and passes every later one through."""

    def __init__(self, target: str, drop_first: int) -> None:
        host, port = target.rsplit("/", 1)[-1].split(":")
        self.target = (host, int(port))
        self.drop_first = drop_first
        self.accepted = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self._threads: list[threading.Thread] = []
        self._socks: list[socket.socket] = []
        self._accept = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> DroppingProxy:
        self._accept.start()
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() (close alone does not)
        except OSError:
            pass
        self.listener.close()
        for s in self._socks:
            s.close()
        self._accept.join(timeout=5)

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.accepted += 1
            if self.accepted <= self.drop_first:
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")  # a reset
                conn.close()
                continue
            upstream = socket.create_connection(self.target)
            self._socks += [conn, upstream]
            for a, b in ((conn, upstream), (upstream, conn)):
                t = threading.Thread(target=_pump, args=(a, b), daemon=True)
                t.start()

    @property
    def dropped(self) -> int:
        return min(self.accepted, self.drop_first)


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def endpoint(url: str, replica: int = 0, parallel: int = 2) -> Endpoint:
    return Endpoint(url=url, api_key="", model="stub-model", deployment_id="d", replica=replica, job_id="1",
                    leader_node="127.0.0.1", follower_nodes=[], rpc_servers=[], llama_version="stub",
                    parallel=parallel, ctx=4096, started_at=0.0, ready_at=0.0)


def prompts_file(tmp_path: Path, n: int) -> Path:
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"custom_id": f"q{i}", "prompt": f"q {i}"}) + "\n" for i in range(n)))
    return path


def run(source: tp.Any, prompts: Path, **kw: tp.Any) -> Summary:
    options = BatchOptions(**{**FAST, **kw})
    prepared = prepare_batch(prompts, None, options)
    try:
        return run_batch(source, prepared, options, Console(stderr=True, quiet=True))
    finally:
        prepared.close()


def ok_ids(path: Path) -> list[str]:
    return [rec["custom_id"] for rec in map(json.loads, path.read_text().splitlines())
            if rec["response"] and rec["response"]["status_code"] == 200]


@pytest.mark.parametrize("client", ["raw", "openai"])
def test_a_lone_replica_that_drops_its_first_connections_serves_again(tmp_path: Path, client: str) -> None:
    """One replica, no other to go to: its first connections are dropped (and so are the first probes); the
    batch waits for it and completes, nothing failed, no request charged for the outage."""
    prompts = prompts_file(tmp_path, 20)
    with StubServer() as stub, DroppingProxy(stub.url, drop_first=6) as proxy:
        s = run(StaticSource(endpoint(proxy.url)), prompts, client=client, retries=0)
        assert proxy.dropped == 6 and stub.stats.received == 20
    assert (s.ok, s.failed, s.status, s.failed_replicas) == (20, 0, "completed", {})
    assert sorted(ok_ids(tmp_path / "p.results.jsonl")) == sorted(f"q{i}" for i in range(20))


def test_a_replica_down_for_a_while_is_probed_until_it_listens_again(tmp_path: Path) -> None:
    """Nothing listens on its port (a server restarting): refused connections, then probes with backoff; once the
    test has seen three probes refused it starts the server there, and the replica serves the batch."""
    prompts = prompts_file(tmp_path, 10)
    port_holder = socket.create_server(("127.0.0.1", 0))
    port = port_holder.getsockname()[1]
    port_holder.close()  # refused from now on
    url = f"http://127.0.0.1:{port}"
    started = threading.Event()
    servers: list[StubServer] = []
    import speedslurm.batch.transport as transport

    real_probe = transport.RawTransport.probe
    refused = []

    async def counting_probe(self: transport.RawTransport) -> str | None:
        why = await real_probe(self)
        if why is not None:
            refused.append(why)
            if len(refused) == 3 and not started.is_set():
                servers.append(StubServer(port=port).start())  # back on its port
                started.set()
        return why

    transport.RawTransport.probe = counting_probe  # type: ignore[method-assign]
    try:
        s = run(StaticSource(endpoint(url)), prompts)
    finally:
        transport.RawTransport.probe = real_probe  # type: ignore[method-assign]
        for srv in servers:
            srv.stop()
    assert started.is_set() and len(refused) == 3
    assert (s.ok, s.failed, s.failed_replicas) == (10, 0, {})


def test_a_replica_unreachable_longer_than_the_outage_is_given_up(tmp_path: Path) -> None:
    with StubServer() as stub:
        url = stub.url  # nothing listens there any more
    with pytest.raises(BatchFailed) as info:
        run(StaticSource(endpoint(url)), prompts_file(tmp_path, 3), outage=0.2)
    msg = info.value.message
    assert "every replica failed" in msg and f"unreachable at {url} for 0.2 s (run.outage_s)" in msg


def test_run_with_a_base_url_server_that_drops_its_first_3_connections_succeeds(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from speedslurm.cli import main

    prompts = prompts_file(tmp_path, 8)
    with StubServer() as stub, DroppingProxy(stub.url, drop_first=3) as proxy:
        try:
            main(["run", "--base-url", proxy.url, "--prompts", str(prompts), "--json"])
            code = 0
        except SystemExit as exc:
            code = int(exc.code or 0)
        assert proxy.dropped == 3
    out, err = capsys.readouterr()
    assert code == 0, err
    assert json.loads(out)["requests"]["ok"] == 8
    assert len(set(ok_ids(tmp_path / "p.results.jsonl"))) == 8


def test_run_outage_s_setting_reaches_the_batch_and_is_range_checked(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from speedslurm.cli import main

    with StubServer() as stub:
        url = stub.url
    write_json_atomic(tmp_path / "endpoint.json", endpoint(url).to_json())
    prompts = prompts_file(tmp_path, 2)

    def cli(*args: str) -> tuple[int, str]:
        try:
            main(list(args))
            code = 0
        except SystemExit as exc:
            code = int(exc.code or 0)
        return code, " ".join(capsys.readouterr().err.split())

    code, err = cli("--set", "run.outage_s=0.3", "run", "--endpoint-file", str(tmp_path / "endpoint.json"),
                    "--prompts", str(prompts))
    assert code == 1 and f"unreachable at {url} for 0.3 s (run.outage_s)" in err, err
    assert "probing it" in err
    code, err = cli("--set", "run.outage_s=0", "run", "--endpoint-file", str(tmp_path / "endpoint.json"),
                    "--prompts", str(prompts))
    assert code == 2 and "run.outage_s must be a number greater than 0" in err, err


if sys.platform != "linux":  # pragma: no cover
    pytestmark = pytest.mark.skip("SO_LINGER resets as on Linux")
