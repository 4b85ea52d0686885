"""The run directory's records: strict round trips, clear refusals, one job-id type, and a light job side."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import records

from speedslurm.rundir.layout import RunDir
from speedslurm.rundir.records import (
    SCHEMA,
    ContractError,
    DeploymentRecord,
    Endpoint,
    Failed,
    Follower,
    JobId,
    Loading,
    read_record,
    write_record,
)

FOLLOWER = Follower(job_id="12_1", epoch=1, rank=1, node="n2", host="10.77.0.12", port=50052, pid=4,
                    version="ggml-rpc build-id 0123", heartbeat_port=40000, started_at=1.5)
LOADING = Loading(job_id="12", url="http://10.77.0.11:8080", node="n1", pid=3, time=2.0)
FAILED = Failed(job_id="12", role="follower", rank=2, node="n3", exit_code=1, reason="rpc-server exited",
                log_tail="last line", time=3.0)
ENDPOINT = Endpoint(job_id="12", url="http://10.77.0.11:8080", api_key="k", model="m", deployment_id="d", replica=0,
                    leader_node="n1", follower_nodes=["n2"], rpc_servers=["10.77.0.12:50052"], llama_version="v",
                    parallel=4, ctx=2048, started_at=1.0, ready_at=2.0, pid=3)


@pytest.mark.parametrize("record", [FOLLOWER, LOADING, FAILED, ENDPOINT], ids=lambda r: type(r).__name__)
def test_every_handshake_record_round_trips_through_its_file(tmp_path: Path, record: object) -> None:
    path = tmp_path / "f.json"
    write_record(path, record)  # type: ignore[arg-type]
    data = json.loads(path.read_text())
    assert data["schema"] == SCHEMA and data["job_id"] and "epoch" in data
    assert read_record(path, type(record)) == record  # type: ignore[arg-type]
    assert oct(path.stat().st_mode & 0o777) == "0o600"


def test_a_file_of_another_schema_is_refused_naming_file_and_fix(tmp_path: Path) -> None:
    path = tmp_path / "endpoint.json"
    path.write_text(json.dumps({**ENDPOINT.to_json(), "schema": 0}))
    with pytest.raises(ContractError) as err:
        read_record(path, Endpoint)
    assert str(path) in err.value.message and "schema 0" in err.value.message and "schema 1" in err.value.message
    assert "another version of speedslurm" in (err.value.fix or "")
    no_schema = {k: v for k, v in ENDPOINT.to_json().items() if k != "schema"}
    with pytest.raises(ContractError, match="schema None"):
        Endpoint.from_json(no_schema)


def test_a_missing_or_mistyped_field_is_refused_by_name() -> None:
    data = FAILED.to_json()
    del data["epoch"]  # has a default in Python, but every file must say which start wrote it
    with pytest.raises(ContractError, match=r"failed.json lacks the field\(s\) epoch"):
        Failed.from_json(data)
    with pytest.raises(ContractError, match="field 'port' is '50052', not int"):
        Follower.from_json({**FOLLOWER.to_json(), "port": "50052"})
    with pytest.raises(ContractError, match="not hold a JSON object"):
        Loading.from_json([1, 2])


def test_not_json_is_a_contract_error(tmp_path: Path) -> None:
    (tmp_path / "loading.json").write_text("{half")
    with pytest.raises(ContractError, match="is not JSON"):
        read_record(tmp_path / "loading.json", Loading)


def test_the_deployment_record_is_checked_on_write_and_read(tmp_path: Path) -> None:
    rd = RunDir(tmp_path / "dep")
    rd.root.mkdir()
    info = records.deployment(rd.root, replicas=2, job_ids=["5_0", "5_1"])
    assert rd.deployment() == info and rd.deployment_record() == DeploymentRecord.from_json(info)
    with pytest.raises(ContractError, match="lacks the field"):
        rd.write_deployment({k: v for k, v in info.items() if k != "replicas"})


def test_failed_describes_itself_in_one_line() -> None:
    assert FAILED.describe() == "follower 2 on n3: rpc-server exited (exit code 1)"
    leader = Failed(job_id="1", role="leader", rank=0, node="n1", exit_code=None, reason="no health", log_tail="",
                    time=0)
    assert leader.describe() == "leader on n1: no health"


@pytest.mark.parametrize("text, base, task, comp, step", [
    ("123", "123", "", "", ""), ("123_4", "123", "4", "", ""), ("123+1", "123", "", "1", ""),
    ("123_[0-3]", "123", "[0-3]", "", ""), ("123.0", "123", "", "", "0"), ("123+1.batch", "123", "", "1", "batch"),
    ("4242", "4242", "", "", ""),  # the local executor's controller pid
])
def test_job_ids_of_every_form_parse_and_format_back(text: str, base: str, task: str, comp: str, step: str) -> None:
    job = JobId.parse(text)
    assert (job.base, job.task, job.component, job.step) == (base, task, comp, step)
    assert str(job) == text and JobId.base_of(text) == base


@pytest.mark.parametrize("text", ["", "abc", "12_", "12+", "12_x", "_4", "12+1+2"])
def test_what_is_not_a_job_id_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="is not a Slurm job id"):
        JobId.parse(text)


def test_the_job_id_a_task_records_comes_from_its_environment() -> None:
    assert JobId.from_env({"SLURM_ARRAY_JOB_ID": "9", "SLURM_ARRAY_TASK_ID": "2", "SLURM_JOB_ID": "11"}) == "9_2"
    assert JobId.from_env({"SPEEDSLURM_JOB_ID": "7", "SLURM_JOB_ID": "8"}) == "7"  # a hetjob's leader id
    assert JobId.from_env({"SUBMITIT_LOCAL_JOB_ID": "4242"}) == "4242"
    assert JobId.from_env({}) == ""


def test_the_job_side_imports_no_front_end_library() -> None:
    """A task starts fast on a node: the job side imports neither submitit nor the front end's libraries."""
    code = ("import sys; import speedslurm.node.entry, speedslurm.node.roles, speedslurm.rundir.records, speedslurm.rundir.layout; "
            "print(sorted(m for m in ('submitit', 'click', 'yaml', 'openai', 'rich', 'pydantic', 'cloudpickle') "
            "if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"
