"""`speedslurm build-llama`: following the job with a fake clock, node checks and the config setting.

The real CPU build of llama.cpp as a Slurm job on the test bed: tests/real/test_buildllama_real.py.
"""

from __future__ import annotations

import typing as tp
from pathlib import Path

import pytest
import yaml

from speedslurm.cluster.slurm import JobState
from speedslurm.errors import DeploymentFailed
from speedslurm.ops import buildllama as bl


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.hooks: list[tp.Callable[[float], None]] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds
        for hook in self.hooks:
            hook(self.now)


def test_follow_job_prints_log_and_states(tmp_path: Path) -> None:
    log = tmp_path / "build.log"
    clock = FakeClock()

    def grow(now: float) -> None:
        if now >= 3 and not log.exists():
            log.write_text("[build-llama] configure\n[ 10%] Building")
        elif now >= 6 and "compile" not in log.read_text():
            with open(log, "a") as fh:
                fh.write(" ggml\n[build-llama] compile\n")

    clock.hooks.append(grow)
    timeline = [(0, "PENDING"), (2, "RUNNING"), (8, "COMPLETED")]

    def states(ids: list[str]) -> dict[str, JobState]:
        state = [s for t, s in timeline if clock.now >= t][-1]
        return {"7": JobState("7", state)}

    lines: list[str] = []
    seen: list[tuple[str, float]] = []
    final = bl.follow_job("7", log, on_line=lines.append, on_state=lambda s, e: seen.append((s, e)), states=states,
                          clock=clock, sleep=clock.sleep, interval=0.5, state_every=2)
    assert final.state == "COMPLETED"
    assert [s for s, _ in seen] == ["PENDING", "RUNNING", "COMPLETED"]
    assert lines == ["[build-llama] configure", "[ 10%] Building ggml", "[build-llama] compile"]


def test_follow_job_gone_and_timeout(tmp_path: Path) -> None:
    clock = FakeClock()
    gone = bl.follow_job("8", tmp_path / "none.log", states=lambda ids: {}, clock=clock, sleep=clock.sleep)
    assert gone.state == "FAILED" and "neither squeue nor sacct" in gone.reason
    assert 30 < clock.now < 40
    clock = FakeClock()
    with pytest.raises(DeploymentFailed, match="still PENDING after 100s"):
        bl.follow_job("9", tmp_path / "none.log", states=lambda ids: {"9": JobState("9", "PENDING")},
                      timeout=100, clock=clock, sleep=clock.sleep)


def test_parse_node_checks() -> None:
    out = "\n".join([
        "NODE|n1|0|0|0.6.0-dev (build 0)",
        "NODE|n2|0|0|0.5.0",
        "NODE|n3|127|0|error while loading shared libraries: libcudart.so.12",
        "srun: warning: something",
    ])
    checks = bl.parse_node_checks(out, ["n1", "n2", "n3", "n4"], "0.6.0-dev (build 0)")
    assert [c.ok for c in checks] == [True, False, False, False]
    assert "reports '0.5.0' here" in checks[1].error
    assert "libcudart" in checks[2].error
    assert checks[3].error == "no answer from this node"


def test_node_check_passes_binaries_as_arguments() -> None:
    argv = bl.node_check_argv(Path("/o p/llama-server"), Path("/o p/ggml-rpc-server"), "gorgonas", ["n1", "n2"])
    assert argv[0] == "srun" and "--nodes=2" in argv and "--nodelist=n1,n2" in argv and "--ntasks-per-node=1" in argv
    assert argv[-2:] == ["/o p/llama-server", "/o p/ggml-rpc-server"]
    assert "/o p" not in argv[argv.index("-c") + 1]


def test_submit_parses_the_job_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_call(argv: list[str], **kw: tp.Any) -> str:
        calls.append(argv)
        return "4242;cluster\n"

    monkeypatch.setattr(bl, "call", fake_call)
    job_id, path = bl.submit("#!/bin/bash\n", tmp_path / "logs")
    assert job_id == "4242" and path.read_text() == "#!/bin/bash\n"
    assert calls == [["sbatch", "--parsable", str(path)]]


def test_write_bin_dir_setting_keeps_other_settings(tmp_path: Path) -> None:
    cfg = tmp_path / "cfg" / "config.yaml"
    bl.write_bin_dir_setting(cfg, Path("/shared/opt/llama.cpp/bin"))
    assert yaml.safe_load(cfg.read_text()) == {"llama": {"bin_dir": "/shared/opt/llama.cpp/bin"}}
    cfg.write_text("cluster:\n  partition: gpu\nllama:\n  parallel: 8\n  bin_dir: /old\n")
    bl.write_bin_dir_setting(cfg, Path("/new/bin"))
    assert yaml.safe_load(cfg.read_text()) == {"cluster": {"partition": "gpu"},
                                               "llama": {"parallel": 8, "bin_dir": "/new/bin"}}


def test_build_report_mismatch_says_the_handshake_fails(tmp_path: Path) -> None:
    # Two binaries of different builds: llama-server and an RPC server that are different files, no shared lib.
    folder = tmp_path / "bin"
    folder.mkdir()
    for name, text in (("llama-server", "echo 'version: 1 (a)'"), ("ggml-rpc-server", "echo other")):
        (folder / name).write_text(f"#!/bin/sh\n{text}\n")
        (folder / name).chmod(0o755)
    report = bl.verify_build(folder, None, on_nodes=False)
    assert not report.ok and not report.same_build
    assert "RPC handshake would fail" in report.problems[0]


# ------------------------------------------------------------------------------------------ on the bed
