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
        assert alias["state"] == "ready" and [d["deployment"] for d in alias["deployments"]] == [dep.id]
        assert len(list_deployments(s)) == 1  # the second request went to the same deployment
    # SIGTERM's path (close): the deployment is stopped (gateway.on_exit: stop).
    assert [d.state for d in list_deployments(s)] == ["ENDED"]
    assert json.loads((s.gateway.root / "deployments.json").read_text()) == {}


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
