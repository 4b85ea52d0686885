"""rpc-server's cache folder on the test bed: one that another user made first never stops a follower."""

from __future__ import annotations

import json
import os
import typing as tp
from pathlib import Path

import pytest

pytestmark = [pytest.mark.llama, pytest.mark.slurm]

NOBODY = 65534


def test_a_default_cache_folder_made_first_by_another_user_is_not_used(
        speedslurm_cli: tp.Callable[..., tp.Any], shared_tmp: Path, tiny_gguf: Path) -> None:
    """Another account (``nobody``) made this user's default cache folder ``$TMPDIR/speedslurm-rpc-cache-<uid>``
    on the nodes before any deployment of this user: the deployment still becomes ready and serves, its follower
    caches in a private folder beside it, its log says so, and nothing is written into the planted folder."""
    ss = speedslurm_cli(timeout=180)
    node_tmp = shared_tmp / "node-tmp"          # the nodes' TMPDIR (the bed's nodes share this machine's disk)
    node_tmp.mkdir(mode=0o755)
    ss.env["TMPDIR"] = str(node_tmp)
    planted = node_tmp / f"speedslurm-rpc-cache-{os.getuid()}"
    planted.mkdir(mode=0o777)
    os.chmod(planted, 0o777)
    os.chown(planted, NOBODY, NOBODY)

    res = ss("--set", "cluster.hetjob=false", "up", "--model", str(tiny_gguf), "--nodes", "2", "--executor", "slurm",
             "--timeout", "150", "--json")
    dep = json.loads(res.stdout)["deployment"]
    log = " ".join(ss("logs", dep, "--role", "follower", "-n", "100000").stdout.split())
    fallbacks = sorted(node_tmp.glob(f"{planted.name}-*"))
    assert len(fallbacks) == 1, (list(node_tmp.iterdir()), log)
    assert (f"the rpc-server cache folder {planted} is not used: it belongs to uid {NOBODY}, not to you "
            f"(uid {os.getuid()}); caching in {fallbacks[0]} instead") in log, log
    st = fallbacks[0].stat()
    assert st.st_uid == os.getuid() and st.st_mode & 0o777 == 0o700
    assert list(planted.iterdir()) == [] and planted.stat().st_uid == NOBODY

    out = ss("run", "--deployment", dep, "--prompts", str(_prompts(shared_tmp)), "--json").stdout
    assert json.loads(out)["requests"]["ok"] == 2
    assert list(planted.iterdir()) == []


def _prompts(folder: Path) -> Path:
    path = folder / "cache-prompts.jsonl"
    path.write_text("".join(json.dumps({"custom_id": f"c{i}", "prompt": f"Story {i}:", "max_tokens": 4}) + "\n"
                            for i in range(2)))
    return path
