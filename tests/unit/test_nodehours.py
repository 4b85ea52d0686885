"""Node-hours: Slurm's figures (sacct's ElapsedRaw x NNodes and AllocTRES gres/gpu for an ended job, squeue's
TimeUsed x NumNodes for a running one) read from the answers the status poll gets anyway, kept with the recorded
end (never asked again), and the client's wall time where Slurm has none; what `status` and a batch summary show."""

from __future__ import annotations

import io
import json
import time
import typing as tp
from pathlib import Path

import pytest
import records
from rich.console import Console

from speedslurm.batch.summary import Summary
from speedslurm.cluster import slurm
from speedslurm.cluster.executor import ACCOUNTING, SQUEUE, Usage
from speedslurm.deployments import nodehours
from speedslurm.deployments.status import replica_statuses
from speedslurm.rundir.layout import Deployment, RunDir, make_private_dir
from speedslurm.rundir.records import Endpoint

# What the bed's sacct printed for a hetjob (1 leader node + 2 follower nodes) cancelled after 45 s, and what a
# GPU cluster's AllocTRES looks like.
SACCT_HETJOB = "307+0|CANCELLED by 0|0:0|n1|45|1|billing=1,cpu=1,node=1\n" \
               "307+1|CANCELLED by 0|0:0|n[2-3]|45|2|billing=2,cpu=2,node=2\n"
SACCT_GPU = "410_0|COMPLETED|0:0|g[1-2]|3600|2|billing=16,cpu=16,gres/gpu=4,gres/gpu:a100=4,mem=128G,node=2\n"


class Slurm:
    def __init__(self, squeue: str = "", sacct: str = "") -> None:
        self.squeue, self.sacct = squeue, sacct
        self.calls: list[list[str]] = []

    def __call__(self, argv: list[str], **kw: tp.Any) -> str:
        self.calls.append(list(argv))
        if argv[0] == "squeue":
            if not self.squeue:
                from speedslurm.errors import CommandError

                raise CommandError(argv, 1, "", "slurm_load_jobs error: Invalid job id specified")
            return self.squeue
        return self.sacct


def _dep(root: Path, job_ids: list[str], nodes: int = 3) -> Deployment:
    rd = RunDir(make_private_dir(root / "d"))
    info = records.deployment(rd.root, replicas=len(job_ids), job_ids=job_ids, nodes=nodes)
    for r in range(len(job_ids)):
        make_private_dir(rd.replica_dir(r))
    return Deployment(rd, info)


@pytest.mark.parametrize(("text", "seconds"), [("0:14", 14), ("12:34", 754), ("1:02:03", 3723),
                                               ("2-01:02:03", 2 * 86400 + 3723), ("INVALID", None)])
def test_squeue_time_used(text: str, seconds: int | None) -> None:
    assert slurm.time_used_s(text) == seconds


def test_gpus_only_from_the_untyped_gres_count() -> None:
    assert slurm.alloc_gpus("billing=16,cpu=16,gres/gpu=4,gres/gpu:a100=4,node=2") == 4
    assert slurm.alloc_gpus("billing=1,cpu=1,node=1") is None


def test_an_ended_hetjob_sums_its_components_and_the_end_is_kept(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    fake = Slurm(sacct=SACCT_HETJOB)
    monkeypatch.setattr(slurm, "call", fake)
    dep = _dep(tmp_path, ["307"])
    (st,) = replica_statuses(dep)
    assert st.state == "ENDED" and st.usage is not None
    assert (st.usage.elapsed_s, st.usage.node_s, st.usage.source) == (45, 45 * 3, ACCOUNTING)
    assert st.usage.gpu_s is None  # the bed counts no GPUs
    assert nodehours.deployment_usage(dep, [st]) == {"node_hours": round(135 / 3600, 4), "gpu_hours": None,
                                                    "node_hours_source": "slurm accounting"}
    assert [c[0] for c in fake.calls] == ["squeue", "sacct"]
    assert fake.calls[1][-1] == "JobID,State,ExitCode,NodeList,ElapsedRaw,NNodes,AllocTRES"
    # Seen ended: never asked again, and the figures come from jobs-ended.json.
    (again,) = replica_statuses(dep)
    assert len(fake.calls) == 2 and again.usage == st.usage
    assert json.loads(dep.run_dir.jobs_ended_path.read_text())["jobs"]["307"]["node_s"] == 135


def test_a_jobs_ended_file_that_is_no_record_is_asked_about_again_and_written_anew(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """jobs-ended.json is a record of the run directory's contract: one without its schema (another version's,
    or damaged) is not trusted: Slurm is asked again, and the file is written anew as the record."""
    fake = Slurm(sacct=SACCT_HETJOB)
    monkeypatch.setattr(slurm, "call", fake)
    dep = _dep(tmp_path, ["307"])
    dep.run_dir.jobs_ended_path.write_text(json.dumps({"jobs": {"307": {"state": "RUNNING"}}}))
    (st,) = replica_statuses(dep)
    assert st.state == "ENDED" and [c[0] for c in fake.calls] == ["squeue", "sacct"]
    data = json.loads(dep.run_dir.jobs_ended_path.read_text())
    assert data["schema"] and data["jobs"]["307"]["state"] == "CANCELLED", data  # as sacct says (SACCT_HETJOB)


def test_gpu_hours_where_accounting_counts_gpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(slurm, "call", Slurm(sacct=SACCT_GPU))
    dep = _dep(tmp_path, ["410_0"], nodes=2)
    (st,) = replica_statuses(dep)
    assert nodehours.deployment_usage(dep, [st]) == {"node_hours": 2.0, "gpu_hours": 4.0,
                                                    "node_hours_source": "slurm accounting"}


def test_a_running_job_from_squeue_without_sacct(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = Slurm(squeue="309+0|RUNNING|None|n1|0|1:00|1|\n309+1|RUNNING|None|n[2-3]|0|1:00|2|\n")
    monkeypatch.setattr(slurm, "call", fake)
    dep = _dep(tmp_path, ["309"])
    (st,) = replica_statuses(dep)
    assert st.usage == Usage(60.0, 180.0, None, SQUEUE)
    assert [c[0] for c in fake.calls] == ["squeue"]


def test_without_slurm_figures_the_client_wall_time_is_used_and_said(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(slurm, "call", Slurm(squeue="500|RUNNING|None|n[1-3]|0\n"))  # an older squeue's answer
    dep = _dep(tmp_path, ["500"])
    now = time.time()
    ep = Endpoint(job_id="500", epoch=0, url="http://10.0.0.1:1", api_key="k", model="m", deployment_id=dep.id,
                  replica=0, leader_node="n1", follower_nodes=["n2", "n3"], rpc_servers=[], llama_version="",
                  parallel=1, ctx=512, started_at=now - 1800, ready_at=now - 1790, pid=1)
    dep.run_dir.write(dep.run_dir.endpoint_path(0), ep)
    (st,) = replica_statuses(dep)
    used = nodehours.deployment_usage(dep, [st], now=now)
    assert used["node_hours_source"] == "client wall time"
    assert used["node_hours"] == pytest.approx(1.5, abs=1e-3)  # half an hour on 3 nodes


def test_batch_node_hours_cover_only_the_batch_span(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(slurm, "call", Slurm(squeue="309|RUNNING|None|n[1-3]|0|1:00:00|3\n"))
    dep = _dep(tmp_path, ["309"])
    statuses = replica_statuses(dep)
    now = time.time()
    used = nodehours.batch_usage(dep, statuses, now - 600, now, seen_at=now)  # a 10-minute batch
    assert used["node_hours"] == pytest.approx(0.5, abs=1e-3) and used["node_hours_source"] == "slurm (running)"


def test_the_batch_summary_shows_node_hours() -> None:
    s = Summary("out.jsonl", total=1, ok=1, wall_s=1.0)
    assert s.to_json()["node_hours"] is None
    s.usage = {"node_hours": 0.25, "gpu_hours": None, "node_hours_source": "slurm (running)"}
    assert (s.to_json()["node_hours"], s.to_json()["node_hours_source"]) == (0.25, "slurm (running)")
    con = Console(file=io.StringIO(), width=100)
    s.render(con)
    assert "node-hours  0.250, from slurm (running)" in tp.cast(io.StringIO, con.file).getvalue()


def test_status_shows_the_node_hours_and_their_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from speedslurm.cli import main

    monkeypatch.setattr(slurm, "call", Slurm(sacct=SACCT_HETJOB))
    monkeypatch.setenv("SPEEDSLURM_RUN__DIR", str(tmp_path))
    monkeypatch.setenv("SPEEDSLURM_PROFILE", "testbed")
    dep = _dep(tmp_path, ["307"])

    def run(*args: str) -> str:
        try:
            main(list(args))
        except SystemExit as exc:
            assert exc.code in (0, None), capsys.readouterr().err
        return capsys.readouterr().out

    (row,) = json.loads(run("status", dep.id, "--json"))
    assert (row["node_hours"], row["gpu_hours"], row["node_hours_source"]) == (0.0375, None, "slurm accounting")
    assert row["replicas"][0]["node_hours"] == 0.0375
    text = run("status", dep.id)
    assert "NODE-H" in text.splitlines()[0]
    assert " 0.037 " in next(line for line in text.splitlines() if line.startswith(dep.id))
    assert "node-hours held, from Slurm's figures" in text and "*" not in text
