"""Time-limit handover: a batch moves onto a successor deployment before its job's limit, the old one drains and
is cancelled, and every prompt gets exactly one result line."""

from __future__ import annotations

import json
import time
import typing as tp
from pathlib import Path

import pytest
from rich.console import Console

from devtools.stubserver import StubServer
from speedslurm.api.handover import HandoverSource
from speedslurm.batch.runner import BatchOptions, prepare_batch, run_batch
from speedslurm.batch.sources import SourceState
from speedslurm.cluster import slurm
from speedslurm.rundir.records import Endpoint

KEY = "test-key"


class FakeDeployment:
    def __init__(self, n: int, url: str) -> None:
        self.id = f"dep{n}"
        self.job_ids = [str(100 + n)]
        self.url = url
        self.record = type("Record", (), {"replicas": 1, "info": {"submitted_at": time.time()}})()


class FakeSource:
    """A deployment that is ready ``ready_after`` s after it starts, and whose job ends ``limit`` s after."""

    def __init__(self, dep: FakeDeployment, ready_after: float, limit: float) -> None:
        self.dep = dep
        self.t0 = time.time()
        self.ready_after = ready_after
        self.limit = limit

    def poll(self) -> SourceState:
        ep = Endpoint(url=self.dep.url, api_key=KEY, model="stub-model", deployment_id=self.dep.id, replica=0,
                      job_id=self.dep.job_ids[0], leader_node="127.0.0.1", follower_nodes=[], rpc_servers=[],
                      llama_version="stub", parallel=2, ctx=4096, started_at=self.t0,
                      ready_at=self.t0 + self.ready_after)
        ready = [ep] if time.time() >= self.t0 + self.ready_after else []
        return SourceState(ready, {}, bool(ready), ends_at={0: self.t0 + self.limit})


def test_batch_hands_over_twice_and_each_prompt_is_written_once(tmp_path: Path) -> None:
    n = 240
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"custom_id": f"q{i}", "prompt": f"question {i}"}) + "\n"
                               for i in range(n)))
    stubs: list[StubServer] = []
    deps: list[FakeDeployment] = []
    cancelled: list[tuple[str, float]] = []
    messages: list[str] = []

    def start_next() -> FakeDeployment:  # a new server for each deployment
        stubs.append(StubServer(api_key=KEY, slots=2, latency=0.05))
        stubs[-1].start()
        deps.append(FakeDeployment(len(deps), stubs[-1].url))
        return deps[-1]

    first = start_next()
    source = HandoverSource(tp.cast(tp.Any, first), tp.cast(tp.Any, start_next), before_s=1.0,
                            say=messages.append, source_of=lambda d: FakeSource(tp.cast(tp.Any, d), 0.3, 3.0),
                            cancel=lambda d: cancelled.append((d.id, time.time())))
    options = BatchOptions(poll_interval=0.05, quiet=True, timeout=5.0, settle=0.3)
    prepared = prepare_batch(prompts, None, options)
    try:
        summary = run_batch(source, prepared, options, Console(stderr=True, quiet=True))
    finally:
        prepared.close()
        for s in stubs:
            s.stop()

    recs = [json.loads(x) for x in (tmp_path / "p.results.jsonl").read_text().splitlines()]
    ids = [r["custom_id"] for r in recs]
    assert sorted(ids) == sorted(f"q{i}" for i in range(n)), "a prompt has no line, or two"
    assert all(r["response"]["status_code"] == 200 for r in recs)
    # Deployments served one after the other: each one that drained did so once its successor served, and was
    # cancelled then; the rest (the newest, and one still starting at the end) are left to the caller's stop().
    names = [d["id"] for d in summary.deployments]
    assert names == [d.id for d in deps]
    served = [summary.served_by(d) for d in summary.deployments]
    assert sum(served) == n
    drained = [d for d in summary.deployments if d["drained_at"] is not None]
    assert len(drained) >= 2 and all(summary.served_by(d) > 0 for d in drained)
    assert [c[0] for c in cancelled] == [d["id"] for d in drained]
    assert all(d["cancelled_at"] is not None for d in drained)
    for old, new in zip(summary.deployments, summary.deployments[1:], strict=False):
        if old["drained_at"] is not None:
            assert new["ready_at"] is not None and old["drained_at"] >= new["ready_at"] - 0.1
    # Each server answered exactly what the run counted for it: nothing sent to a drained one was lost.
    assert [s.app.stats.completions for s in stubs] == served
    left = [d for d in deps if d.id not in {c[0] for c in cancelled}]
    assert left and source.stop() == left and [c[0] for c in cancelled][-len(left):] == [d.id for d in left]
    as_json = summary.to_json()["deployments"]
    assert [d["served"] for d in as_json] == served
    text = Console(record=True, width=200)
    summary.render(text)
    shown = text.export_text()
    assert "deployment dep0" in shown and f"deployment {names[-1]}" in shown and "drained" in shown
    assert any("started its successor dep1" in m for m in messages)


def test_squeue_time_left_is_read_for_running_jobs_only(monkeypatch: tp.Any) -> None:
    out = "7|RUNNING|None|n1|0|0:30|1|1:30\n8|PENDING|Priority|(null)|0|0:00|1|1:00:00\n"
    monkeypatch.setattr(slurm, "call", lambda argv, **kw: out)
    states = slurm.job_states(["7", "8"])
    assert states["7"].time_left_s == 90
    assert states["8"].time_left_s is None


def _record_dep(time_value: str) -> tp.Any:
    from speedslurm.settings.settings import load_settings

    info = {"plan": {"time": time_value}, "model": {"path": "m.gguf"}, "nodes": 1, "ctx": 512, "replicas": 1}
    record = type("Record", (), {"info": info, "replicas": 1, "executor": "slurm"})()
    return type("Dep", (), {"settings": load_settings(), "record": record, "id": "d", "job_ids": ["1"]})()


def test_handover_begins_before_slurms_warning_and_at_most_half_way(monkeypatch: tp.Any) -> None:
    from speedslurm.api import handover

    monkeypatch.setattr(handover, "_deployment_source", lambda dep: None)
    long = handover.handover_source(_record_dep("04:00:00"))
    assert long is not None and long.before_s == 600 and long.margin_s == 90  # --signal USR2@60, + 30 s
    short = handover.handover_source(_record_dep("2"), before_s=600)
    # 2 minutes: the warning may come 60 s before the end; half of the minute before it
    assert short is not None and short.margin_s == 60 and short.before_s == 30
    assert handover.handover_source(_record_dep("2"), before_s=0) is None


def test_run_handover_needs_a_deployment(tmp_path: Path, capsys: tp.Any) -> None:
    from speedslurm.cli import main

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hi"}\n')
    try:
        main(["run", "--base-url", "http://127.0.0.1:9", "--handover", "--prompts", str(prompts)])
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "--handover needs --deployment" in err


def test_the_summary_names_the_one_deployment_that_served_when_none_handed_over(tmp_path: Path) -> None:
    """A batch that ends long before its job's limit: no successor, and the summary still says which deployment
    served it (its JSON and its table), from a handing-over source and from a deployment's run directory alike;
    a server given by URL names none."""
    import dataclasses

    from test_batch_runner import endpoint, write_endpoint

    from speedslurm.batch.sources import RunDirSource, StaticSource
    from speedslurm.rundir.layout import RunDir

    n = 20
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"custom_id": f"q{i}", "prompt": f"question {i}"}) + "\n"
                               for i in range(n)))
    stub = StubServer(api_key=KEY, slots=2).start()
    first = FakeDeployment(0, stub.url)
    rd = RunDir(tmp_path / "dep")
    write_endpoint(rd, dataclasses.replace(endpoint(stub.url, 0), deployment_id="d-7", job_id="77", ready_at=5.0))
    no_successor = lambda: pytest.fail("no successor is needed")  # noqa: E731
    sources: dict[str, tp.Any] = {
        "handover": HandoverSource(tp.cast(tp.Any, first), no_successor, before_s=1.0, cancel=lambda d: None,
                                   source_of=lambda d: FakeSource(tp.cast(tp.Any, d), 0, 3600)),
        "run dir": RunDirSource(rd, 1),
        "url": StaticSource(dataclasses.replace(endpoint(stub.url, 0), deployment_id=""))}
    summaries = {}
    try:
        for name, source in sources.items():
            options = BatchOptions(poll_interval=0.05, quiet=True, timeout=5.0, settle=0.3)
            prepared = prepare_batch(prompts, tmp_path / f"{name}.results.jsonl", options)
            try:
                summaries[name] = run_batch(source, prepared, options, Console(stderr=True, quiet=True))
            finally:
                prepared.close()
    finally:
        stub.stop()

    for name, dep_id, job in (("handover", "dep0", "100"), ("run dir", "d-7", "77")):
        s = summaries[name]
        (d,) = s.to_json()["deployments"]
        assert (d["id"], d["job_ids"], d["replicas"], d["served"]) == (dep_id, [job], [0], n), name
        assert d["drained_at"] is None and d["cancelled_at"] is None, name
        text = Console(record=True, width=200)
        s.render(text)
        shown = text.export_text()
        assert f"deployment {dep_id}" in shown and f"r0: {n} served" in shown, name
    assert summaries["run dir"].deployments[0]["ready_at"] == 5.0
    assert summaries["url"].to_json()["deployments"] == [] and summaries["url"].ok == n
