"""The Python API without a cluster: cheap to import, batches from a list of dicts, errors with their fix."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import speedslurm
from devtools.stubserver import StubServer
from speedslurm import api
from speedslurm.batch.sources import StaticSource
from speedslurm.errors import UsageError

KEY = "k-api-test"


def test_import_speedslurm_stays_cheap() -> None:
    """The job side imports the package on every node: the API and its dependencies load on first use only."""
    code = ("import sys, speedslurm; heavy = [m for m in ('speedslurm.api', 'openai', 'submitit', 'click', 'yaml') "
            "if m in sys.modules]; print(heavy); speedslurm.start; print('speedslurm.api' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split("\n")[:2] == ["[]", "True"]


def test_the_package_exports_the_api() -> None:
    assert speedslurm.start is api.start and speedslurm.submit is api.submit and speedslurm.connect is api.connect
    with pytest.raises(AttributeError, match="has no attribute 'stop_everything'"):
        speedslurm.stop_everything  # noqa: B018


def test_run_batch_takes_a_list_of_dicts_and_returns_the_summary(tmp_path: Path) -> None:
    out = tmp_path / "results.jsonl"
    prompts = [{"custom_id": "a", "prompt": "one"}, {"custom_id": "b", "messages": [{"role": "user", "content": "2"}]}]
    with StubServer(api_key=KEY, slots=2) as stub:
        summary = api.run_batch(StaticSource.probe(stub.url, KEY), prompts, out, max_tokens=4)
        assert (summary.ok, summary.failed, summary.results_path) == (2, 0, str(out))
        lines = [json.loads(line) for line in out.read_text().splitlines()]
        assert sorted(line["custom_id"] for line in lines) == ["a", "b"]
        # The same prompts into the same results file: a resume with nothing left to send.
        again = api.run_batch(StaticSource.probe(stub.url, KEY), prompts, out, max_tokens=4)
        assert (again.ok, again.skipped) == (0, 2)
        # Other prompts into the same file: refused before anything is sent, naming the list's line.
        with pytest.raises(UsageError, match=r'^prompt list:1: request "a" is not the one answered in '):
            api.run_batch(StaticSource.probe(stub.url, KEY), [{"custom_id": "a", "prompt": "new"}], out)


def test_prompts_given_as_a_list_need_a_results_file() -> None:
    with pytest.raises(UsageError) as err:
        api.run_batch(StaticSource([]), [{"prompt": "x"}])
    assert err.value.message == "prompts given as a list need a results file"
    assert err.value.fix == 'pass out="results.jsonl" (running the same prompts into it again resumes)'


def test_a_prompt_that_is_not_a_dict_is_named(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="prompt 2 is a str, not a dict"):
        api.run_batch(StaticSource([]), [{"prompt": "x"}, "y"], tmp_path / "r.jsonl")


def test_an_unknown_batch_flag_lists_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(UsageError) as err:
        api.run_batch(StaticSource([]), [{"prompt": "x"}], tmp_path / "r.jsonl", max_token=3)
    assert err.value.message == "unknown batch option(s): max_token"
    assert "max_tokens" in (err.value.fix or "") and "concurrency" in (err.value.fix or "")


def test_a_deployment_is_stopped_when_its_block_ends_with_an_error(monkeypatch) -> None:
    stopped: list[str] = []
    monkeypatch.setattr(api.Deployment, "stop", lambda self, wait=30: stopped.append("stop"))
    record = type("Record", (), {"id": "dep-1", "job_ids": ["5"]})()
    with pytest.raises(RuntimeError), api.Deployment(record, settings=None) as dep:  # type: ignore[arg-type]
        assert dep.id == "dep-1"
        raise RuntimeError("the notebook cell failed")
    assert stopped == ["stop"]


def test_wait_ready_refuses_an_unknown_until() -> None:
    record = type("Record", (), {"id": "dep-1", "job_ids": []})()
    with pytest.raises(UsageError, match="until must be 'all' or 'first', got 'some'"):
        api.Deployment(record, settings=None).wait_ready(until="some")  # type: ignore[arg-type]
