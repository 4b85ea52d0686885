"""Job-side pieces that need no cluster: the followers' heartbeat and the leader's probe of it."""

from __future__ import annotations

import os
import re
import shutil
import socket
import stat
import typing as tp
from pathlib import Path

import pytest

from speedslurm.node.children import RoleFailed
from speedslurm.node.net import HEARTBEAT_MISSES, HeartbeatProbe, start_heartbeat
from speedslurm.rundir.records import Follower


def _follower(**fields: object) -> Follower:
    return Follower(**{"job_id": "1", "rank": 1, "node": "n2", "host": "127.0.0.1", "port": 1, "pid": 1,  # type: ignore[arg-type]
                       "version": "v", "heartbeat_port": 0, "started_at": 0.0, **fields})


def test_a_live_follower_answers_and_a_silent_one_fails_the_leader() -> None:
    live = _follower(node="n2", host="127.0.0.1", heartbeat_port=start_heartbeat("127.0.0.1"))
    with socket.socket() as s:  # a port nobody answers on any more
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    dead = _follower(node="n3", host="127.0.0.1", heartbeat_port=dead_port)
    now = [0.0]
    probe = HeartbeatProbe([live], clock=lambda: now[0])
    for _ in range(5):
        probe.check()
        now[0] += 1.0
    probe = HeartbeatProbe([live, dead], clock=lambda: now[0])
    for i in range(HEARTBEAT_MISSES - 1):
        if i:
            now[0] += 1.0
        probe.check()
    probe.check()  # asked again too soon: no new attempt, no failure yet
    now[0] += 1.0
    with pytest.raises(RoleFailed, match="follower on n3 .* stopped answering its heartbeat 3 times"):
        probe.check()


def test_peers_without_a_heartbeat_are_not_probed() -> None:
    HeartbeatProbe([_follower(node="n2", host="10.77.0.12", port=1, heartbeat_port=0)]).check()


def test_rpc_cache_folder_is_private_and_foreign_ones_are_never_used(tmp_path: Path) -> None:
    """A default cache folder someone else made first (another uid, a link, writable by others) is never used and
    fails nothing: a private folder of ours beside it is, and the note for the role's log says why."""
    from speedslurm.node.children import rpc_cache_dir

    tmp = tmp_path / "tmp"
    env = {"TMPDIR": str(tmp)}
    default = tmp / f"speedslurm-rpc-cache-{os.getuid()}"
    made, note = rpc_cache_dir(None, "n1", env)
    assert (made, note) == (str(default), "")
    assert os.stat(made).st_mode & 0o777 == 0o700
    os.chmod(made, 0o750)  # ours, only readable by the group: used, and made private again
    assert rpc_cache_dir(None, "n1", env) == (str(default), "")
    assert os.stat(made).st_mode & 0o777 == 0o700

    def planted(make: tp.Callable[[Path], None]) -> tuple[str | None, str]:
        for p in tmp.iterdir():
            p.unlink() if p.is_symlink() or p.is_file() else shutil.rmtree(p)
        make(default)
        return rpc_cache_dir(None, "n1", env)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    cases: list[tuple[tp.Callable[[Path], None], str]] = [
        (lambda p: (p.mkdir(), os.chmod(p, 0o777)), r"it is writable by others \(mode 0777\)"),
        (lambda p: (p.mkdir(), os.chmod(p, 0o1773)), r"it is writable by others \(mode 1773\)"),
        (lambda p: p.symlink_to(elsewhere), r"it is not a folder \(a link or a file\)"),
        (lambda p: p.write_text("x"), r"it is not a folder \(a link or a file\)"),
    ]
    if os.getuid() == 0:  # a folder that belongs to another account
        cases.append((lambda p: (p.mkdir(mode=0o700), os.chown(p, 65534, 65534)),
                      rf"it belongs to uid 65534, not to you \(uid {os.getuid()}\)"))
    for make, why in cases:
        chosen, note = planted(make)
        assert chosen is not None and chosen != str(default), why
        assert Path(chosen).parent == tmp and Path(chosen).name.startswith(default.name + "-")
        st = os.lstat(chosen)
        assert stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and st.st_mode & 0o777 == 0o700
        assert re.fullmatch(rf"the rpc-server cache folder {re.escape(str(default))} is not used: {why}; "
                            rf"caching in {re.escape(chosen)} instead \(to use a folder of your choice: remove it, "
                            r"or set llama.rpc_cache_dir to a private folder of yours on local disk\)", note), note
        assert "\n" not in note
        # The next deployment's follower on this node finds the same fallback: its cache stays warm.
        assert rpc_cache_dir(None, "n1", env)[0] == chosen
    assert list(elsewhere.iterdir()) == []  # nothing was written through the link


def test_an_unusable_rpc_cache_dir_setting_falls_back_and_then_runs_without_cache(tmp_path: Path) -> None:
    from speedslurm.node.children import rpc_cache_dir

    env = {"TMPDIR": str(tmp_path / "tmp")}
    loose = tmp_path / "loose"
    loose.mkdir()
    os.chmod(loose, 0o777)
    chosen, note = rpc_cache_dir(str(loose), "n1", env)
    assert chosen == str(tmp_path / "tmp" / f"speedslurm-rpc-cache-{os.getuid()}")
    assert note == (f"the rpc-server cache folder {loose} is not used: it is writable by others (mode 0777); "
                    f"caching in {chosen} instead (to use a folder of your choice: set llama.rpc_cache_dir to a "
                    "private folder of yours on local disk, or unset it)")
    # A setting that names a file's child cannot be made, and a TMPDIR where nothing can be made: no cache at all.
    (tmp_path / "file").write_text("x")
    chosen, note = rpc_cache_dir(str(tmp_path / "file" / "{node}"), "n1", {"TMPDIR": str(tmp_path / "file")})
    assert chosen is None
    assert note.startswith(f"the rpc-server cache folder {tmp_path / 'file' / 'n1'} is not used: it cannot be "
                           f"created ({tmp_path / 'file'} is not a folder); rpc-server runs without its tensor cache")


def test_rpc_cache_folder_setting_names_one_folder_per_node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``{node}`` in llama.rpc_cache_dir: nodes that share a file system each get their own cache folder."""
    from speedslurm.node.children import rpc_cache_dir, rpc_cache_folder

    setting = str(tmp_path / "rpc-cache" / "{node}")
    made = [rpc_cache_dir(setting, node) for node in ("n2", "n3")]
    assert made == [(str(tmp_path / "rpc-cache" / "n2"), ""), (str(tmp_path / "rpc-cache" / "n3"), "")]
    assert sorted(p.name for p in (tmp_path / "rpc-cache").iterdir()) == ["n2", "n3"]

    monkeypatch.setenv("HOME", str(tmp_path))
    assert rpc_cache_folder("~/c-{node}-x", "gpu07") == str(tmp_path / "c-gpu07-x")
    assert rpc_cache_folder("/scratch/same", "gpu07") == "/scratch/same"      # no placeholder: as given
    assert rpc_cache_folder(None, "gpu07", {"TMPDIR": "/local"}) == f"/local/speedslurm-rpc-cache-{os.getuid()}"


def test_a_server_whose_role_is_already_gone_does_not_run_on() -> None:
    """The fork/prctl race: when the role died before the child armed its death signal, the child exits."""
    import subprocess

    from speedslurm.node.children import die_with_parent

    orphan = subprocess.Popen(["sleep", "30"], preexec_fn=die_with_parent(parent=1), start_new_session=True)
    assert orphan.wait(10) == 1          # parent 1 is not the child's parent: it exits before exec
    ours = subprocess.Popen(["sleep", "30"], preexec_fn=die_with_parent(), start_new_session=True)
    try:
        assert ours.poll() is None       # our own child runs
    finally:
        ours.kill()
        ours.wait()


def _tcp_line(remote: str, timer: str, retransmits: int) -> str:
    # sl local_address rem_address st tx_queue:rx_queue tr:tm->when retrnsmt ...
    return f"   0: 0B004D0A:9C40 {remote} 01 00000000:00000000 {timer}:00000040 {retransmits:08X} 0 0 1"


def test_peer_watchdog_reads_the_tcp_table_once_a_second_for_all_peers(monkeypatch: pytest.MonkeyPatch) -> None:
    from speedslurm.node import net as nodenet

    # 10.77.0.12:50000 and 10.77.0.13:50001 as /proc/net/tcp writes them (little-endian address, hex port)
    n2, n3 = "0C004D0A:C350", "0D004D0A:C351"
    table = [_tcp_line(n2, "00", 0), _tcp_line(n3, "01", 2)]
    reads: list[int] = []

    def fake_table(pid: int) -> list[str]:
        reads.append(pid)
        return table

    monkeypatch.setattr(nodenet, "_tcp_table", fake_table)
    peers = [_follower(node="n2", host="10.77.0.12", port=50000), _follower(node="n3", host="10.77.0.13", port=50001)]
    now = [0.0]
    watch = nodenet.PeerWatch(peers, clock=lambda: now[0])
    for _ in range(10):  # the supervision loop's 0.1 s polls within one second
        watch.check(42)
        now[0] += 0.09
    assert reads == [42]
    now[0] += 0.2
    watch.check(42)
    assert reads == [42, 42]
    table[1] = _tcp_line(n3, "01", nodenet.PEER_RETRANSMITS)
    now[0] += 1.5
    with pytest.raises(RoleFailed, match=r"rpc-server on n3 \(10.77.0.13:50001\) stopped answering"):
        watch.check(42)
    assert len(reads) == 3


def test_peer_watchdog_ignores_other_connections_and_retransmits_without_a_timer(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from speedslurm.node import net as nodenet

    table = [_tcp_line("0C004D0A:C351", "01", 9),   # the right host, another port
             _tcp_line("0C004D0A:C350", "00", 9)]   # the peer, but no retransmission timer running
    monkeypatch.setattr(nodenet, "_tcp_table", lambda pid: table)
    nodenet.check_peers(1, [_follower(node="n2", host="10.77.0.12", port=50000)])
