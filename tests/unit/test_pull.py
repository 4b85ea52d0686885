"""`speedslurm models pull` against a local stand-in for the Hugging Face Hub (no network).

The stand-in speaks the parts of the hub API that huggingface_hub uses for a download: the model listing
(``/api/models/REPO``, with file sizes), ``HEAD``/``GET /REPO/resolve/REV/FILE`` with the hub's headers
(X-Repo-Commit, ETag, X-Linked-Size) and HTTP Range requests.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import random
import re
import subprocess
import sys
import threading
import typing as tp
from pathlib import Path

import pytest

pytest.importorskip("huggingface_hub")

from speedslurm.errors import SpeedslurmError, UsageError  # noqa: E402
from speedslurm.model.pull import plan_pull, pull_model  # noqa: E402
from speedslurm.settings.settings import ModelEntry, Settings  # noqa: E402

REPO = "acme/Tiny-GGUF"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    """A threaded HTTP server on 127.0.0.1 holding one repository's files."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = dict(files)
        self.reported_size: dict[str, int] = {}   # overrides the size the listing reports
        self.break_after: int | None = None       # first GET of a file: send this many bytes, then drop
        self.fail_gets = 0                        # then answer this many GETs with 500
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        self.bytes_sent = 0
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: tp.Any) -> None:
                pass

            def do_HEAD(self) -> None:
                hub.handle(self, head=True)

            def do_GET(self) -> None:
                hub.handle(self, head=False)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc: tp.Any) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _send_json(self, h: http.server.BaseHTTPRequestHandler, code: int, data: tp.Any, head: bool) -> None:
        body = json.dumps(data).encode()
        h.send_response(code)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.send_header("X-Repo-Commit", COMMIT)
        h.end_headers()
        if not head:
            h.wfile.write(body)

    def handle(self, h: http.server.BaseHTTPRequestHandler, head: bool) -> None:
        path = h.path.split("?")[0]
        self.requests.append(("HEAD" if head else "GET", path, h.headers.get("Range")))
        if re.fullmatch(rf"/api/models/{REPO}(/revision/[^/]+)?", path):
            siblings = []
            for name, data in self.files.items():
                size = self.reported_size.get(name, len(data))
                siblings.append({"rfilename": name, "size": size, "blobId": hashlib.sha1(data).hexdigest(),
                                 "lfs": {"size": size, "sha256": hashlib.sha256(data).hexdigest(), "pointerSize": 130}})
            self._send_json(h, 200, {"id": REPO, "modelId": REPO, "sha": COMMIT, "private": False,
                                     "siblings": siblings}, head)
            return
        m = re.fullmatch(rf"/{REPO}/resolve/[^/]+/(?P<file>.+)", path)
        if not m or m["file"] not in self.files:
            self._send_json(h, 404, {"error": "Entry not found"}, head)
            return
        data = self.files[m["file"]]
        etag = '"' + hashlib.sha256(data).hexdigest() + '"'
        if not head and self.fail_gets and self.break_after is None:
            self.fail_gets -= 1
            self._send_json(h, 500, {"error": "try later"}, head)
            return
        start = 0
        rng = h.headers.get("Range")
        if rng and not head:
            start = int(re.match(r"bytes=(\d+)-", rng).group(1))  # type: ignore[union-attr]
        chunk = data[start:]
        h.send_response(206 if start else 200)
        h.send_header("Content-Length", str(len(chunk) if not head else len(data)))
        if start:
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        h.send_header("Accept-Ranges", "bytes")
        h.send_header("ETag", etag)
        h.send_header("X-Linked-Etag", etag)
        h.send_header("X-Linked-Size", str(len(data)))
        h.send_header("X-Repo-Commit", COMMIT)
        h.end_headers()
        if head:
            return
        if self.break_after is not None:
            cut, self.break_after = self.break_after, None
            h.wfile.write(chunk[:cut])
            h.wfile.flush()
            self.bytes_sent += cut
            h.close_connection = True
            # Drop the connection mid-body, as a failing network would.
            import socket

            h.connection.shutdown(socket.SHUT_RDWR)
            return
        h.wfile.write(chunk)
        self.bytes_sent += len(chunk)


def _payload(n: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(n)


@pytest.fixture
def hf_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    return tmp_path


def _settings(dest: Path, files: list[str]) -> Settings:
    return Settings(models={"tiny": ModelEntry(files=[str(dest / f) for f in files], repo=REPO)})


def test_plan_finds_files_in_subfolders(hf_env: Path) -> None:
    files = {"Tiny-Q4/Tiny-Q4-00001-of-00002.gguf": b"a" * 10, "Tiny-Q4/Tiny-Q4-00002-of-00002.gguf": b"b" * 7}
    with FakeHub(files) as hub:
        plan = plan_pull(_settings(hf_env / "models", ["Tiny-Q4-00001-of-00002.gguf", "Tiny-Q4-00002-of-00002.gguf"]),
                         "tiny", endpoint=hub.url)
    assert [p.remote for p in plan] == sorted(files)
    assert [p.size for p in plan] == [10, 7]
    assert plan[0].dest == (hf_env / "models" / "Tiny-Q4-00001-of-00002.gguf").absolute()


def test_pull_downloads_and_skips_present_files(hf_env: Path) -> None:
    data = _payload(300_000)
    dest = hf_env / "models"
    with FakeHub({"tiny.gguf": data}) as hub:
        done = pull_model(_settings(dest, ["tiny.gguf"]), "tiny", endpoint=hub.url, progress=False)
        assert [s for _, s in done] == ["downloaded"]
        assert (dest / "tiny.gguf").read_bytes() == data
        assert not (dest / ".speedslurm-pull").exists()
        sent = hub.bytes_sent
        again = pull_model(_settings(dest, ["tiny.gguf"]), "tiny", endpoint=hub.url, progress=False)
        assert [s for _, s in again] == ["present"]
        assert hub.bytes_sent == sent  # nothing downloaded the second time


def test_pull_resumes_an_interrupted_download(hf_env: Path) -> None:
    # huggingface_hub writes in chunks of constants.DOWNLOAD_CHUNK_SIZE (10 MiB): break in the second one.
    from huggingface_hub import constants

    chunk = constants.DOWNLOAD_CHUNK_SIZE
    data = _payload(2 * chunk + 12345, seed=2)
    dest = hf_env / "models"
    settings = _settings(dest, ["tiny.gguf"])
    with FakeHub({"tiny.gguf": data}) as hub:
        # First run: the connection drops inside the second chunk and the hub then answers 500: the run fails.
        hub.break_after = chunk + chunk // 2
        hub.fail_gets = 10
        with pytest.raises(SpeedslurmError, match="cannot download tiny.gguf") as info:
            pull_model(settings, "tiny", endpoint=hub.url, progress=False)
        assert "resumes" in (info.value.fix or "")
        assert not (dest / "tiny.gguf").exists()  # a partial file never carries the model's name
        have = (dest / ".speedslurm-pull" / "tiny.gguf.part").stat().st_size
        assert have == chunk
        # Second run: the hub is back; the download continues after the bytes already here.
        hub.fail_gets = 0
        hub.requests.clear()
        hub.bytes_sent = 0
        done = pull_model(settings, "tiny", endpoint=hub.url, progress=False)
    assert [s for _, s in done] == ["downloaded"]
    assert (dest / "tiny.gguf").read_bytes() == data
    ranges = [r for method, path, r in hub.requests if method == "GET" and path.endswith("tiny.gguf")]
    assert ranges == [f"bytes={have}-"]
    assert hub.bytes_sent == len(data) - have
    assert not (dest / ".speedslurm-pull").exists()


def test_pull_refuses_a_size_mismatch(hf_env: Path) -> None:
    data = _payload(50_000, seed=3)
    dest = hf_env / "models"
    with FakeHub({"tiny.gguf": data}) as hub:
        hub.reported_size["tiny.gguf"] = 60_000  # the listing says more than the file holds
        with pytest.raises(SpeedslurmError, match="downloaded 50000 bytes but the hub reports 60000"):
            pull_model(_settings(dest, ["tiny.gguf"]), "tiny", endpoint=hub.url, progress=False)
    assert not (dest / "tiny.gguf").exists()


def test_pull_errors_name_the_fix(hf_env: Path) -> None:
    with FakeHub({"other.gguf": b"x"}) as hub:
        with pytest.raises(UsageError, match="has no file named tiny.gguf") as info:
            plan_pull(_settings(hf_env, ["tiny.gguf"]), "tiny", endpoint=hub.url)
        assert "other.gguf" in (info.value.fix or "")
        with pytest.raises(UsageError, match="unknown model 'nope'"):
            plan_pull(_settings(hf_env, ["tiny.gguf"]), "nope", endpoint=hub.url)
    no_repo = Settings(models={"local": ModelEntry(files=[str(hf_env / "x.gguf")])})
    with pytest.raises(UsageError, match="has no `repo:`"):
        plan_pull(no_repo, "local")


def test_cli_pull_with_hf_endpoint(hf_env: Path) -> None:
    """The command as users run it: HF_ENDPOINT set, the registry from a user config, --dir, --json."""
    data = _payload(120_000, seed=4)
    config = hf_env / "config.yaml"
    config.write_text(f"models:\n  tiny:\n    repo: {REPO}\n    files: [{hf_env / 'nowhere' / 'tiny.gguf'}]\n")
    with FakeHub({"tiny.gguf": data}) as hub:
        env = {**os.environ, "HF_ENDPOINT": hub.url, "SPEEDSLURM_CONFIG": str(config)}
        res = subprocess.run([sys.executable, "-m", "speedslurm", "models", "pull", "tiny", "--dir",
                              str(hf_env / "dl"), "--json"], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["files"][0]["state"] == "downloaded" and out["files"][0]["size"] == len(data)
    assert (hf_env / "dl" / "tiny.gguf").read_bytes() == data
