"""One writer per results file on shared file systems (issue 11, class 3): mountinfo, flock failures, lock file.

flock is node-local on NFS ``local_lock=flock|all`` and Lustre ``localflock`` and missing on Lustre ``noflock``
(ENOSYS); the lock file ``<results>.lock`` (O_EXCL, host and pid) keeps a second login node out. The failures
are injected: ``fcntl.flock`` raising, mountinfo text given, another host's lock file written by hand; one CLI
test runs a second "login node" in its own UTS namespace (another hostname) against a run in progress.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
import typing as tp
from pathlib import Path

import pytest
from noflock import NOFLOCK
from repo import REPO

from devtools.stubserver import StubServer
from speedslurm.batch import writelock
from speedslurm.batch.results import ResultsFile, error_line
from speedslurm.batch.writelock import WriteLock, mount_of, parse_mountinfo, single_writer_problem
from speedslurm.cli import main
from speedslurm.errors import UsageError

# Real lines (hosts and addresses changed) from: a local root, an NFSv4 home with and without local locks,
# Lustre mounted flock / localflock / noflock, an s3fs bucket, an NFSv2 export, a path with a space.
MOUNTINFO = textwrap.dedent("""\
    22 1 259:2 / / rw,relatime shared:1 - ext4 /dev/nvme0n1p2 rw,errors=remount-ro
    45 22 0:42 / /home rw,relatime shared:30 - nfs4 fs1:/export/home rw,vers=4.2,rsize=1048576,wsize=1048576,namlen=255,hard,proto=tcp,timeo=600,retrans=2,sec=sys,clientaddr=10.0.0.5,local_lock=none,addr=10.0.0.2
    46 22 0:43 / /scratch/nfs rw,relatime shared:31 - nfs fs2:/scratch rw,vers=3,rsize=65536,wsize=65536,namlen=255,hard,nolock,proto=tcp,timeo=600,retrans=2,sec=sys,mountaddr=10.0.0.3,mountvers=3,mountport=20048,mountproto=udp,local_lock=all,addr=10.0.0.3
    47 22 0:44 / /lustre/work rw,relatime shared:32 - lustre 10.0.0.9@o2ib:/work rw,flock,lazystatfs,encrypt
    48 22 0:45 / /lustre/proj rw,relatime shared:33 - lustre 10.0.0.9@o2ib:/proj rw,localflock,lazystatfs
    49 22 0:46 / /lustre/old rw,relatime shared:34 - lustre 10.0.0.9@o2ib:/old rw,noflock,lazystatfs
    50 22 0:47 / /mnt/bucket rw,nosuid,nodev,relatime shared:35 - fuse.s3fs s3fs rw,user_id=0,group_id=0
    51 22 0:48 / /mnt/ancient rw,relatime shared:36 - nfs oldbox:/x rw,vers=2,rsize=8192,wsize=8192,hard,proto=udp,local_lock=none,addr=10.0.0.4
    52 45 0:42 /alice /home/alice\\040smith rw,relatime shared:30 - nfs4 fs1:/export/home rw,vers=4.2,local_lock=none,addr=10.0.0.2
    """)


# ------------------------------------------------------------------------------------------ mountinfo


def test_parse_mountinfo_reads_type_options_and_escaped_paths() -> None:
    mounts = {m.mount_point: m for m in parse_mountinfo(MOUNTINFO + "garbage line\n")}
    assert len(mounts) == 9
    home = mounts["/home"]
    assert (home.fstype, home.source, home.dev) == ("nfs4", "fs1:/export/home", (0, 42))
    assert home.option("local_lock") == "none" and home.option("vers") == "4.2"
    assert mounts["/scratch/nfs"].option("local_lock") == "all" and mounts["/scratch/nfs"].option("nolock") == ""
    assert mounts["/lustre/proj"].option("localflock") == "" and mounts["/lustre/proj"].option("flock") is None
    assert mounts["/lustre/old"].option("noflock") == ""
    assert mounts["/home/alice smith"].fstype == "nfs4"  # \040 is a space
    assert mounts["/"].option("rw") == ""  # per-mount options count too


@pytest.mark.parametrize(("path", "expected"), [
    ("/home/bob/results.jsonl", "/home"), ("/home/alice smith/r.jsonl", "/home/alice smith"),
    ("/lustre/work/x/r.jsonl", "/lustre/work"), ("/lustre/workshop/r.jsonl", "/"), ("/tmp/r.jsonl", "/"),
])
def test_mount_of_is_the_longest_mount_point_containing_the_path(path: str, expected: str) -> None:
    # These paths do not exist here: no device number to match, so the longest containing mount point wins.
    mount = mount_of(Path(path), MOUNTINFO)
    assert mount is not None and mount.mount_point == expected


def test_mount_of_an_existing_path_matches_its_device(tmp_path: Path) -> None:
    st = os.stat(tmp_path)
    dev = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    # An entry for the real device at "/" and a decoy with a longer prefix but another device.
    text = (f"1 0 {dev} / / rw - ext4 /dev/root rw\n"
            f"2 1 250:250 / {tmp_path.parent} rw - fuse.s3fs s3fs rw\n")
    mount = mount_of(tmp_path, text)
    assert mount is not None and mount.fstype == "ext4"
    assert mount_of(tmp_path) is not None  # the real /proc/self/mountinfo


def test_single_writer_problem_only_where_an_exclusive_create_is_not_atomic() -> None:
    mounts = {m.mount_point: m for m in parse_mountinfo(MOUNTINFO)}
    problems = {mp: single_writer_problem(m) for mp, m in mounts.items()}
    assert "fuse.s3fs" in (problems.pop("/mnt/bucket") or "")
    assert "NFS version 2" in (problems.pop("/mnt/ancient") or "")
    # Node-local or missing flock (NFS local_lock=all, Lustre localflock/noflock) is what the lock file is for.
    assert set(problems.values()) == {None}
    assert single_writer_problem(None) is None


# ------------------------------------------------------------------------------------------ flock fails


def _flock_fails(monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    real = fcntl.flock

    def flock(fd: tp.Any, op: int) -> None:
        if op & fcntl.LOCK_NB:
            raise OSError(code, os.strerror(code))
        real(fd, op)

    monkeypatch.setattr(fcntl, "flock", flock)


@pytest.mark.parametrize("code", [errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK], ids=["ENOSYS", "EOPNOTSUPP",
                                                                                      "ENOLCK"])
def test_flock_unsupported_uses_the_lock_file_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    code: int) -> None:
    """Lustre noflock: flock raises ENOSYS. That was a traceback; now the lock file keeps the second run out."""
    _flock_fails(monkeypatch, code)
    out = tmp_path / "r.jsonl"
    lock = tmp_path / "r.jsonl.lock"
    with ResultsFile.open(out) as rf:
        assert any("does not support flock" in n and str(lock) in n for n in rf.previous.notices)
        owner = json.loads(lock.read_text())
        assert owner["pid"] == os.getpid() and owner["host"] == os.uname().nodename
        assert lock.stat().st_mode & 0o777 == 0o600
        with pytest.raises(UsageError, match=r"another speedslurm run is writing .*r\.jsonl \(pid \d+ on this host"):
            ResultsFile.open(out)
        rf.write(error_line("a", "x", "y"))
    assert not lock.exists()  # removed at the end of the run
    with ResultsFile.open(out) as rf:
        assert rf.previous.failed == {"a": "x"}


def test_other_flock_errors_are_a_message_not_a_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _flock_fails(monkeypatch, errno.EIO)
    with pytest.raises(UsageError, match="cannot lock .*Input/output error") as exc:
        ResultsFile.open(tmp_path / "r.jsonl")
    assert "--no-lock" in (exc.value.fix or "")
    assert not (tmp_path / "r.jsonl.lock").exists()


# ------------------------------------------------------------------------------------------ the lock file


def _plant(lock: Path, host: str, pid: int, start: str = "1") -> None:
    lock.write_text(json.dumps({"host": host, "pid": pid, "start": start, "since": time.time() - 60}))


def test_lock_file_of_another_host_is_never_taken(tmp_path: Path) -> None:
    out = tmp_path / "r.jsonl"
    out.write_bytes(b"")
    lock = tmp_path / "r.jsonl.lock"
    _plant(lock, "login2", 4242)
    with pytest.raises(UsageError) as exc:
        ResultsFile.open(out)
    msg = exc.value.render()
    assert f"another speedslurm run is writing {out} (pid 4242 on host login2" in msg
    assert f"delete {lock}" in msg and "login2 went down" in msg
    assert json.loads(lock.read_text())["host"] == "login2"  # left alone
    assert out.read_bytes() == b""


def test_stale_lock_file_of_this_host_is_replaced_when_flock_proves_it(tmp_path: Path) -> None:
    out = tmp_path / "r.jsonl"
    lock = tmp_path / "r.jsonl.lock"
    _plant(lock, os.uname().nodename, os.getpid())  # even a live pid: it does not hold the flock, so it is not writing
    with ResultsFile.open(out) as rf:
        assert any("removed the lock file" in n for n in rf.previous.notices)
        assert json.loads(lock.read_text())["since"] > time.time() - 30  # ours now
    assert not lock.exists()


def test_without_flock_a_dead_owner_on_this_host_is_reported_not_taken(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    _flock_fails(monkeypatch, errno.ENOSYS)
    lock = tmp_path / "r.jsonl.lock"
    dead = subprocess.Popen(["true"])
    dead.wait()
    _plant(lock, os.uname().nodename, dead.pid, start="999")
    with pytest.raises(UsageError, match="left by a run that is no longer running") as exc:
        ResultsFile.open(tmp_path / "r.jsonl")
    assert f"delete {lock}" in (exc.value.fix or "")


def test_lock_file_without_owner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(writelock.time, "sleep", lambda s: None)
    (tmp_path / "r.jsonl.lock").write_text("")
    with pytest.raises(UsageError, match="names no owner"):
        ResultsFile.open(tmp_path / "r.jsonl")


def test_a_mount_without_atomic_create_is_refused_unless_no_lock(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    st = os.stat(tmp_path)
    text = f"1 0 {os.major(st.st_dev)}:{os.minor(st.st_dev)} / / rw - fuse.gcsfuse bucket rw\n"
    monkeypatch.setattr(writelock, "MOUNTINFO", tmp_path / "mountinfo")
    (tmp_path / "mountinfo").write_text(text)
    out = tmp_path / "r.jsonl"
    with pytest.raises(UsageError, match="cannot make sure that only one run writes .*fuse.gcsfuse") as exc:
        ResultsFile.open(out)
    assert "--no-lock" in (exc.value.fix or "")
    with ResultsFile.open(out, lock=False) as rf:
        assert rf.lock is not None and rf.lock.lock_file is None
        with ResultsFile.open(out, lock=False):
            pass  # nothing is locked: the user makes sure of one writer
    assert not (tmp_path / "r.jsonl.lock").exists()


def test_lock_path() -> None:
    assert WriteLock.lock_path(Path("/a/b/results.jsonl")) == Path("/a/b/results.jsonl.lock")


# ------------------------------------------------------------------------------------------ the CLI


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    return code, capsys.readouterr().err


def test_cli_message_for_a_lock_held_on_another_login_node(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a"}\n')
    out = tmp_path / "p.results.jsonl"
    lock = tmp_path / "p.results.jsonl.lock"
    _plant(lock, "login2", 4242)
    with StubServer(api_key="k", slots=2) as stub:
        code, err = run_cli(["run", "--base-url", stub.url, "--api-key", "k", "--prompts", str(prompts)], capsys)
        assert code == 2, err
        flat = " ".join(err.split())
        assert f"Error: another speedslurm run is writing {out} (pid 4242 on host login2" in flat
        assert f"Fix: wait for it to finish; if no run on login2 writes {out} any more" in flat
        assert f"delete {lock}" in flat
        assert stub.stats.received == 0
        print(err)
        lock.unlink()
        code, err = run_cli(["run", "--base-url", stub.url, "--api-key", "k", "--prompts", str(prompts)], capsys)
        assert code == 0, err


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare (UTS)")
def test_cli_second_login_node_without_flock_is_kept_out(tmp_path: Path) -> None:
    """Two login nodes, a file system without flock (Lustre noflock): the second run exits 2 naming the first.

    The stand-in answers in 0.05 s on 2 slots while the second run starts and ends (the first still has 50 s of
    work then, however fast the machine), then at once, so that the first finishes."""
    n = 2000
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"custom_id": f"c{i}", "prompt": f"p{i}"}) + "\n" for i in range(n)))
    out = tmp_path / "r.jsonl"
    script = tmp_path / "noflock.py"
    script.write_text(NOFLOCK)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with StubServer(api_key="k", slots=2, latency=0.05) as stub:
        args = ["run", "--base-url", stub.url, "--api-key", "k", "--prompts", str(prompts), "--out", str(out),
                "--concurrency", "2"]
        first = subprocess.Popen([sys.executable, str(script), *args], env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 30
            while not (out.exists() and out.stat().st_size > 0) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert (tmp_path / "r.jsonl.lock").exists()
            second = subprocess.run(["unshare", "-u", sys.executable, str(script), "--hostname", "login2", *args],
                                    env=env, capture_output=True, text=True, timeout=60)
            assert first.poll() is None, "the first run ended before the second did"
            stub.config.latency = 0.0  # the rest at once
            _, first_err = first.communicate(timeout=120)
        finally:
            first.kill()
    flat = " ".join(second.stderr.split())
    print(flat)
    assert second.returncode == 2, second.stderr
    assert f"Error: another speedslurm run is writing {out} (pid {first.pid} on host {os.uname().nodename}" in flat
    assert "Traceback" not in second.stderr
    assert first.returncode == 0, first_err
    assert "does not support flock" in " ".join(first_err.split())
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["custom_id"] for r in recs) == sorted(f"c{i}" for i in range(n))  # each once, one writer
    assert not (tmp_path / "r.jsonl.lock").exists()


def test_cli_refuses_an_object_store_mount_and_no_lock_overrides(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    st = os.stat(tmp_path)
    (tmp_path / "mountinfo").write_text(f"1 0 {os.major(st.st_dev)}:{os.minor(st.st_dev)} / {tmp_path} rw - "
                                        "fuse.s3fs s3fs rw,user_id=0\n")
    monkeypatch.setattr(writelock, "MOUNTINFO", tmp_path / "mountinfo")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a"}\n')
    with StubServer(api_key="k", slots=2) as stub:
        args = ["run", "--base-url", stub.url, "--api-key", "k", "--prompts", str(prompts)]
        code, err = run_cli(args, capsys)
        flat = " ".join(err.split())
        assert code == 2 and stub.stats.received == 0
        assert f"Error: cannot make sure that only one run writes {tmp_path / 'p.results.jsonl'}: {tmp_path} is a " \
               "fuse.s3fs mount (an object store)" in flat
        assert "--no-lock if you make sure yourself that only one run at a time writes it" in flat
        code, err = run_cli([*args, "--no-lock"], capsys)
        assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mountinfo", "p.jsonl", "p.results.jsonl"]
