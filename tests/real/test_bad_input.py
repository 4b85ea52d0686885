"""Bad input on the real test bed: exit code 2, one message naming the problem and the fix, nothing queued,
and an existing results file left exactly as it was (bytes and mtime).

"Nothing queued" is checked with ``squeue``: no job whose command lies under this test's runs folder appears,
and no run directory is created (the bed is shared, so other users' jobs may come and go meanwhile).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import typing as tp
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slurm, pytest.mark.llama]

GOOD = {"custom_id": "a", "messages": [{"role": "user", "content": "hi"}]}
DONE_LINE = ('{"id":"batch_req_1","custom_id":"a","response":{"status_code":200,"request_id":"r",'
             '"body":{"choices":[]}},"error":null}\n')


class Case(tp.NamedTuple):
    name: str
    # (folder) -> (argv after `speedslurm`, extra env); the folder holds p.jsonl and done.results.jsonl
    make: tp.Callable[[Path], tuple[list[str], dict[str, str]]]
    problem: tuple[str, ...]  # words the message must contain
    fix: tuple[str, ...]      # words the Fix: line must contain


def _write(path: Path, data: bytes | str) -> Path:
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def _submit(d: Path, *extra: str, prompts: str | None = None, out: str | None = None, model: str = "",
            nodes: str | None = "1") -> list[str]:
    return ["submit", "--model", model or str(d / "tiny.gguf"), "--executor", "slurm",
            *(["--nodes", nodes] if nodes is not None else []),
            "--prompts", prompts or str(d / "p.jsonl"), "--out", out or str(d / "done.results.jsonl"), *extra]


def _bad_prompts(content: bytes | str) -> tp.Callable[[Path], tuple[list[str], dict[str, str]]]:
    def make(d: Path) -> tuple[list[str], dict[str, str]]:
        _write(d / "bad.jsonl", content)
        return _submit(d, prompts=str(d / "bad.jsonl")), {}
    return make


def _mixed_bin_dir(d: Path) -> Path:
    """llama-server from one build, the RPC server from a copy whose libggml-rpc has another build-id."""
    from builds import patched_rpc_build

    from speedslurm.node.binaries import find_llama_binaries

    real = Path(find_llama_binaries().rpc_server).resolve().parent
    other = patched_rpc_build(real, d / "other")
    mixed = d / "mixed"
    mixed.mkdir()
    os.symlink(real / "llama-server", mixed / "llama-server")
    os.symlink(other / "ggml-rpc-server", mixed / "ggml-rpc-server")
    return mixed


def _c(name: str, make: tp.Callable[[Path], tuple[list[str], dict[str, str]]], problem: tuple[str, ...],
       fix: tuple[str, ...]) -> Case:
    return Case(name, make, problem, fix)


CASES = [
    _c("malformed JSON line", _bad_prompts('{"prompt": "ok"}\n{"prompt": "oops"\n'),
       ("bad.jsonl:2",), ("--skip-invalid",)),
    _c("empty prompts file", _bad_prompts(""), ("has no prompts",), ("one JSON object per line",)),
    _c("line that is neither format", _bad_prompts('{"question": "what?"}\n'), ("bad.jsonl:1",), ("--skip-invalid",)),
    _c("duplicate custom_id", _bad_prompts(json.dumps(GOOD) + "\n" + json.dumps(GOOD) + "\n"),
       ("duplicate custom_id", "bad.jsonl:2", "line 1"), ("its own custom_id",)),
    _c("non-UTF-8 bytes", _bad_prompts(b'{"prompt": "caf\xe9"}\n'), ("bad.jsonl:1", "UTF-8"), ("--skip-invalid",)),
    _c("unknown model", lambda d: (_submit(d, model="NoSuchModel"), {}),
       ("unknown model 'NoSuchModel'", "known models"), ("speedslurm models",)),
    _c("missing GGUF", lambda d: (_submit(d, model=str(d / "absent.gguf")), {}),
       ("absent.gguf", "does not exist"), ("check the path",)),
    _c("GGUF that is not GGUF", lambda d: (_submit(d, model=str(_write(d / "fake.gguf", "not a model\n" * 10))), {}),
       ("fake.gguf", "GGUF"), ()),
    _c("model too big for the allowed nodes", lambda d: (_submit(d, "--ctx", "50000000"), {}),
       ("needs", "nodes", "--nodes 1 is too few"), ("--nodes", "smaller --ctx")),
    _c("model needs more nodes than the partition has", lambda d: (_submit(d, "--ctx", "50000000", nodes=None), {}),
       ("needs 55 node(s)", "partition gorgonas has 4"), ("smaller --ctx", "partition with more nodes")),
    _c("--nodes 0", lambda d: (_submit(d, nodes="0"), {}), ("--nodes 0 must be at least 1",), ("--nodes 1 or more",)),
    _c("--replicas 0", lambda d: (_submit(d, "--replicas", "0"), {}), ("--replicas 0",), ("--replicas 1 or more",)),
    _c("--ctx 0", lambda d: (_submit(d, "--ctx", "0"), {}), ("--ctx 0 must be positive",), ("--ctx 8192",)),
    _c("unknown partition", lambda d: (["--set", "cluster.partition=nosuchpart", *_submit(d)], {}),
       ("'nosuchpart' does not exist",), ("gorgonas",)),
    _c("unknown config key", lambda d: (["--set", "llama.paralel=8", *_submit(d)], {}),
       ("unknown key 'llama.paralel'",), ("parallel",)),
    _c("config value of the wrong type", lambda d: (["--set", "llama.parallel=many", *_submit(d)], {}),
       ("llama.parallel must be int",), ("llama.parallel",)),
    _c("YAML syntax error", lambda d: (_submit(d), {"SPEEDSLURM_CONFIG": str(_write(
        d / "user.yaml", "llama:\n  parallel: 4\n  threads: [1, 2\nrun:\n  dir: x\n"))}),
       ("YAML syntax error", "user.yaml:"), ("correct the YAML",)),
    _c("unknown profile", lambda d: (["--profile", "nosuchprofile", *_submit(d)], {}),
       ("unknown profile 'nosuchprofile'",), ("testbed",)),
    _c("--set without =", lambda d: (["--set", "llama.parallel", *_submit(d)], {}),
       ("is not KEY=VALUE",), ("--set llama.parallel=8",)),
    _c("missing binaries", lambda d: (["--set", f"llama.bin_dir={d / 'nobins'}", *_submit(d)], {}),
       ("llama.bin_dir", "does not exist"), ("llama-server",)),
    _c("binaries of different builds", lambda d: (["--set", f"llama.bin_dir={_mixed_bin_dir(d)}", *_submit(d)], {}),
       ("different llama.cpp builds",), ("one llama.cpp build",)),
    _c("--out in a folder that does not exist", lambda d: (_submit(d, out=str(d / "nofolder" / "r.jsonl")), {}),
       ("nofolder", "does not exist"), ("--out",)),
    _c("--out is a directory", lambda d: (_submit(d, out=str(d)), {}), ("is a directory",), ("--out",)),
    _c("--out equal to the input", lambda d: (_submit(d, out=str(d / "p.jsonl")), {}),
       ("is the prompts file itself",), ("--out",)),
    _c("unknown deployment id", lambda d: (["run", "--deployment", "nosuchdeployment", "--prompts",
                                            str(d / "p.jsonl"), "--out", str(d / "done.results.jsonl")], {}),
       ("unknown deployment 'nosuchdeployment'",), ("speedslurm status",)),
    _c("--replicas above the partition's size", lambda d: (_submit(d, "--replicas", "5"), {}),
       ("need 5 nodes", "has 4"), ("--replicas 4 or fewer",)),
    _c("--time unparsable", lambda d: (_submit(d, "--time", "1h"), {}), ("--time '1h'",), ("01:30:00",)),
    _c("prompts file missing", lambda d: (_submit(d, prompts=str(d / "absent.jsonl")), {}),
       ("absent.jsonl does not exist",), ("--prompts",)),
    _c("prompts from stdin without --out", lambda d: (["submit", "--model", str(d / "tiny.gguf"), "--executor", "slurm",
                                                       "--prompts", "-"], {}),
       ("needs --out",), ("--out results.jsonl",)),
    _c("results file held by another run", lambda d: (_submit(d), {"_LOCK": "1"}),
       ("another speedslurm run is writing",), ("another --out",)),
    _c("run directory other users can write", lambda d: (_submit(d), {"_OPEN_RUNS": "1"}),
       ("which any user can write",), ("only you can write",)),
    _c("--base-url that is not a URL", lambda d: (["run", "--base-url", "localhost:8080", "--prompts",
                                                   str(d / "p.jsonl"), "--out", str(d / "done.results.jsonl")], {}),
       ("is not an http(s) URL",), ("http://",)),
]


def _my_jobs(marker: str) -> list[str]:
    """squeue lines of jobs whose script lies under ``marker`` (this test's folder)."""
    out = subprocess.run(["squeue", "-h", "-o", "%i|%o|%Z"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return [line for line in out.stdout.splitlines() if marker in line]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_exits_2_and_queues_nothing(case: Case, shared_tmp: Path, tiny_gguf: Path) -> None:
    d = shared_tmp
    shutil.copy(tiny_gguf, d / "tiny.gguf")
    _write(d / "p.jsonl", json.dumps(GOOD) + "\n" + json.dumps({"custom_id": "b", "prompt": "x"}) + "\n")
    results = _write(d / "done.results.jsonl", DONE_LINE)
    os.utime(results, ns=(1_000_000_000, 1_000_000_000))
    before = (results.read_bytes(), results.stat().st_mtime_ns)
    prompts_before = (d / "p.jsonl").read_bytes()
    runs = d / "runs"
    argv, extra = case.make(d)
    env = {**os.environ, "SPEEDSLURM_PROFILE": "testbed", "SPEEDSLURM_RUN__DIR": str(runs)}
    env.pop("SPEEDSLURM_CONFIG", None)
    lock = None
    if extra.pop("_LOCK", None):
        import fcntl

        lock = open(results, "rb")  # noqa: SIM115
        fcntl.flock(lock, fcntl.LOCK_EX)
    if extra.pop("_OPEN_RUNS", None):
        shared = d / "shared-open"
        shared.mkdir()
        shared.chmod(0o777)  # writable by everyone, no sticky bit
        env["SPEEDSLURM_RUN__DIR"] = str(shared / "runs")
    env.update(extra)
    assert _my_jobs(str(d)) == []
    try:
        res = subprocess.run([sys.executable, "-m", "speedslurm", *argv], capture_output=True, text=True, env=env,
                             timeout=120, stdin=subprocess.DEVNULL)
    finally:
        if lock is not None:
            lock.close()
    flat = " ".join(res.stderr.split())
    assert res.returncode == 2, f"exit {res.returncode}\n{res.stderr}"
    message, _, fix = flat.partition("Fix:")
    for word in case.problem:
        assert " ".join(word.split()) in message, f"{word!r} not in the message: {res.stderr}"
    assert fix.strip(), f"no fix given: {res.stderr}"
    for word in case.fix:
        assert word in fix, f"{word!r} not in the fix: {res.stderr}"
    assert "Traceback" not in res.stderr
    assert _my_jobs(str(d)) == [], "a job was queued"
    assert not list(Path(env["SPEEDSLURM_RUN__DIR"]).glob("*/deployment.json")), "a deployment was started"
    assert (results.read_bytes(), results.stat().st_mtime_ns) == before, "the results file was modified"
    assert (d / "p.jsonl").read_bytes() == prompts_before
