"""The gateway over real deployments on this machine (the local executor, real llama-server, a tiny model):
wake on request, a deployment that cannot start, stop on exit, re-attach after a restart."""

from __future__ import annotations

import json
import typing as tp
from pathlib import Path

import openai
import pytest

from speedslurm.api import gateway as gw
from speedslurm.api import list_deployments, load_settings

pytestmark = [pytest.mark.llama]


@pytest.fixture
def local(user_config: Path, tmp_path: Path, llama_bins: tp.Any) -> tp.Callable[..., tp.Any]:
    user_config.write_text("profile: local\n")

    def make(*overrides: str) -> tp.Any:
        return load_settings(overrides=[f"gateway.dir={tmp_path / 'gw'}", "gateway.idle_timeout=0",
                                        "llama.parallel=2", *overrides])

    return make


def ask(url: str, key: str, text: str = "Say hi", **kw: tp.Any) -> tp.Any:
    client = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=300)
    return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": text}],
                                          max_tokens=8, **kw)


def test_a_cold_alias_starts_on_the_first_request_and_stops_with_the_gateway(local: tp.Any, tiny_gguf: Path) -> None:
    s = local()
    key = gw.add_key("alice", s)
    with gw.open_gateway({"tiny": str(tiny_gguf)}, listen="127.0.0.1:0", settings=s) as g:
        client = openai.OpenAI(base_url=g.url + "/v1", api_key=key, max_retries=0, timeout=300)
        [model] = client.models.list().data
        assert model.id == "tiny" and model.model_extra["state"] == "cold"  # type: ignore[index]
        assert list_deployments(s) == []
        answer = ask(g.url, key)
        assert answer.usage is not None and answer.usage.completion_tokens > 0
        [dep] = list_deployments(s)
        assert dep.state == "READY"
        # A streamed answer comes in several chunks.
        chunks = [c for c in ask(g.url, key, stream=True) if c.choices and c.choices[0].delta.content]
        assert len(chunks) >= 2
        status = gw.status(s)
        [alias] = status["aliases"]
        assert alias["state"] == "ready" and [d["deployment"] for d in alias["deployments"]] == [dep.id], alias
        assert len(list_deployments(s)) == 1  # the second request went to the same deployment
    # SIGTERM's path (close): the deployment is stopped (gateway.on_exit: stop).
    assert [d.state for d in list_deployments(s)] == ["ENDED"]
    assert json.loads((s.gateway.root / "deployments.json").read_text()) == {"aliases": {}, "successors": {}}


def test_a_restarted_gateway_reattaches_to_its_deployment(local: tp.Any, tiny_gguf: Path) -> None:
    s = local("gateway.on_exit=leave")
    key = gw.add_key("alice", s)
    with gw.open_gateway({"tiny": str(tiny_gguf)}, listen="127.0.0.1:0", settings=s) as g:
        ask(g.url, key)
    [dep] = list_deployments(s)
    assert dep.state == "READY"  # left running
    try:
        with gw.open_gateway({"tiny": str(tiny_gguf)}, listen="127.0.0.1:0", settings=s) as g:
            [alias] = gw.status(s)["aliases"]
            assert [d["deployment"] for d in alias["deployments"]] == [dep.id]
            assert ask(g.url, key).choices
            assert [d.id for d in list_deployments(s)] == [dep.id]  # no new deployment
    finally:
        dep.stop()


def test_a_deployment_that_cannot_start_fails_its_requests_once_with_its_reason(local: tp.Any,
                                                                                tiny_gguf: Path) -> None:
    s = local('llama.extra_server_args=["--no-such-flag"]', "gateway.retry_after_failure_s=600")
    key = gw.add_key("alice", s)
    with gw.open_gateway({"tiny": str(tiny_gguf)}, listen="127.0.0.1:0", settings=s) as g:
        with pytest.raises(openai.APIStatusError, match="could not start") as first:
            ask(g.url, key)
        assert first.value.status_code == 503
        # The next request gets the same reason at once; nothing is submitted again.
        with pytest.raises(openai.APIStatusError, match="could not start") as second:
            ask(g.url, key)
        assert second.value.response.headers["Retry-After"].isdigit()
        assert len(list_deployments(s)) == 1
        [alias] = gw.status(s)["aliases"]
        assert alias["state"] == "failed" and "could not start" not in alias["why"] and alias["why"]


def _load_until(url: str, key: str, done: tp.Callable[[], bool], threads: int = 4) -> list[int]:
    """Requests from ``threads`` threads, each one after the other, until ``done()``; returns their statuses."""
    import threading

    statuses: list[int] = []
    stop = threading.Event()

    def loop() -> None:
        client = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=300)
        while not stop.is_set():
            try:
                client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "go on"}],
                                               max_tokens=8)
                statuses.append(200)
            except openai.APIStatusError as exc:
                statuses.append(exc.status_code)

    workers = [threading.Thread(target=loop) for _ in range(threads)]
    for w in workers:
        w.start()
    try:
        _until(done, limit=600)
    finally:
        stop.set()
        for w in workers:
            w.join()
    return statuses


def _until(check: tp.Callable[[], bool], limit: float = 300) -> None:
    import time

    end = time.monotonic() + limit
    while not check():
        assert time.monotonic() < end, "condition not reached"
        time.sleep(0.05)


def _live(s: tp.Any) -> list[dict[str, tp.Any]]:
    return [d for d in gw.status(s)["aliases"][0]["deployments"] if d["state"] not in ("ENDED", "FAILED")]


def test_queued_requests_add_a_replica_and_quiet_takes_them_away(local: tp.Any, tiny_gguf: Path) -> None:
    """Requests that keep waiting for the one slot make the gateway start a second replica; once nothing is
    asked, one is scaled down, then the last one stops for idleness, and the next request wakes the alias."""
    s = local("llama.parallel=1", "gateway.max_replicas=2", "gateway.scale_up_queue=1", "gateway.scale_up_wait_s=0",
              "gateway.scale_up_after_s=0.5", "gateway.scale_down_after_s=1", "gateway.idle_timeout=3")
    key = gw.add_key("alice", s)
    with gw.open_gateway({"tiny": str(tiny_gguf)}, listen="127.0.0.1:0", settings=s) as g:
        ask(g.url, key)  # the first replica
        statuses = _load_until(g.url, key, lambda: sum(d["state"] == "READY" for d in _live(s)) == 2)
        assert set(statuses) == {200}
        decisions = [d["decision"] for d in gw.status(s)["decisions"]]
        assert "scale_up" in decisions
        # Quiet: one replica is scaled down, then the other stops for idleness.
        _until(lambda: not _live(s))
        whys = sorted(d.status()[0].why for d in list_deployments(s))
        assert whys == ["idle", "scaled down"], whys
        assert gw.status(s)["aliases"][0]["state"] == "cold"
        assert ask(g.url, key).choices  # wakes it
        assert len(list_deployments(s)) == 3
