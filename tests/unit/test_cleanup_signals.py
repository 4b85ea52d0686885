"""Clean-up that a second signal interrupts: once `down` (or up's and submit's own clean-up) starts, the jobs are
cancelled whatever arrives. A Ctrl-C (SIGTERM, SIGHUP) during the look at the jobs before the cancel (squeue,
sacct: up to 20 s each) ends the look and goes straight on to scancel; one during scancel, or during the wait
for a handover successor being submitted, is held until every cancel is issued; then it skips the report.

Before, SIGINT kept its default there: KeyboardInterrupt in squeue or in the wait left the job queued or running.
The signals come by construction (a fake squeue or scancel, or the cancel itself, sends them), never after a
guessed delay.

On the test bed: tests/real/test_cleanup_signals_real.py.
"""

from __future__ import annotations

import os
import signal
import threading
import typing as tp
from pathlib import Path

import pytest
from inprocess import speedslurm

# ------------------------------------------------------------------------------------------ without Slurm


class SignallingSlurm:
    """squeue, sacct and scancel as speedslurm calls them; squeue and scancel send this process ``signals``
    SIGINTs each time they are asked (a user pressing Ctrl-C while they run)."""

    def __init__(self, signals: int = 2) -> None:
        self.signals = signals
        self.calls: list[str] = []
        self.cancelled: list[str] = []
        self.queue = {"71+0": "RUNNING", "71+1": "RUNNING"}

    def _ctrl_c(self) -> None:
        for _ in range(self.signals):
            os.kill(os.getpid(), signal.SIGINT)

    def __call__(self, argv: list[str], **kw: tp.Any) -> str:
        self.calls.append(argv[0])
        if argv[0] == "squeue":
            self._ctrl_c()
            return "".join(f"{job}|{state}|None|n1|0\n" for job, state in self.queue.items())
        if argv[0] == "scancel":
            self._ctrl_c()
            self.cancelled += argv[1:]
            self.queue = {job: "CANCELLED" for job in self.queue}
            return ""
        if argv[0] == "sacct":
            return ""
        raise AssertionError(argv)


@pytest.fixture
def signalling_slurm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SignallingSlurm:
    import records

    from speedslurm.cluster import slurm
    from speedslurm.rundir.layout import make_private_dir

    fake = SignallingSlurm()
    monkeypatch.setattr(slurm, "call", fake)
    monkeypatch.setattr(slurm, "have_slurm", lambda: True)
    monkeypatch.setenv("SPEEDSLURM_RUN__DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("SPEEDSLURM_PROFILE", "testbed")
    rd = make_private_dir(make_private_dir(tmp_path / "runs") / "dep-live")
    make_private_dir(rd / "r0")
    records.deployment(rd, executor="slurm", job_ids=["71"], model={"name": "tiny", "path": ""}, nodes=2)
    return fake


def test_ctrl_c_during_downs_look_and_its_scancel_still_cancels(
        signalling_slurm: SignallingSlurm, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = speedslurm(["down", "dep-live"], capsys)
    assert signalling_slurm.cancelled == ["71"], (signalling_slurm.calls, err)
    assert code == 130, err
    assert signalling_slurm.calls == ["squeue", "scancel"]  # the look cut short, the report skipped
    flat = " ".join(err.split())
    assert "Interrupted: deployment dep-live: cancelled job(s) 71; did not wait for them to end" in flat, err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handed back


def test_down_without_signals_reports_as_before(signalling_slurm: SignallingSlurm,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    signalling_slurm.signals = 0
    code, out, err = speedslurm(["down", "dep-live"], capsys)
    assert code == 0, err
    assert out.strip() == "deployment dep-live: cancelled job(s) 71; state ENDED (cancelled)"
    assert signalling_slurm.cancelled == ["71"]


class Dep:
    def __init__(self, name: str) -> None:
        self.id = name
        self.job_ids = [name]
        self.record = type("Record", (), {"replicas": 1, "info": {}})()


def test_ctrl_c_while_a_handover_cancels_or_waits_for_its_successor_cancels_every_deployment() -> None:
    """submit's clean-up with a successor being submitted: SIGINT arrives in the first cancel, and again in the
    wait for the successor's submission; both deployments are cancelled, then the interruption goes on."""
    from speedslurm.api.handover import HandoverSource, _Call
    from speedslurm.batch.sources import SourceState

    first, second = Dep("first"), Dep("second")
    cancelled: list[str] = []
    first_cancel = threading.Event()

    def cancel(dep: Dep) -> None:
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C during the cancel
        cancelled.append(dep.id)
        first_cancel.set()

    def start_next() -> Dep:
        # The successor's sbatch returns once the clean-up has begun, with a Ctrl-C meanwhile; a clean-up that
        # waits for it before cancelling anything (or one cut short) would leave it running.
        first_cancel.wait(20)
        os.kill(os.getpid(), signal.SIGINT)
        return second

    source = HandoverSource(tp.cast(tp.Any, first), tp.cast(tp.Any, start_next), before_s=1.0, cancel=cancel,
                            source_of=lambda d: tp.cast(tp.Any, type("S", (), {"poll": lambda s: SourceState(
                                [], {}, False)})()))
    source._starting = _Call(start_next)
    source._starting.start()
    with pytest.raises(KeyboardInterrupt):  # handed on once every cancel was issued
        source.stop()
    assert cancelled == ["first", "second"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_hold_begun_while_handling_an_interrupt_does_not_raise_again() -> None:
    """up's clean-up after Ctrl-C: a further Ctrl-C during it is swallowed (the first one is on its way)."""
    from speedslurm.deployments.cleanup import held_signals, look

    done = []
    try:
        raise KeyboardInterrupt
    except KeyboardInterrupt:
        with held_signals():
            assert look(lambda: os.kill(os.getpid(), signal.SIGINT) or "looked") is None  # cut short
            os.kill(os.getpid(), signal.SIGTERM)
            done.append("cancel")
    assert done == ["cancel"]


# ------------------------------------------------------------------------------------------ on the bed
