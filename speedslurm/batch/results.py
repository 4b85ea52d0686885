"""The results file: OpenAI Batch output lines, append-only, one writer at a time, resumable.

Rules a reader can rely on:

* each line is one complete JSON object ending in ``\\n``: ``{"id", "custom_id", "request_fingerprint",
  "response", "error"}`` (OpenAI Batch output lines plus ``request_fingerprint``, the request's
  :func:`~speedslurm.batch.inputs.fingerprint`; lines of older versions lack it);
* a custom_id has at most one successful line (``response.status_code`` 200) and nothing after it;
* before it, a custom_id may have error lines from earlier runs (failed attempts that a later run retried);
  the final state of an id is its last line (see :func:`final_view`).

A run holds the file's locks for its whole duration (:mod:`~speedslurm.batch.writelock`: ``flock`` and a
``<results>.lock`` file), so two runs, on one node or on two, cannot interleave lines. A partial last line
(the writer was killed mid-write) is cut off when the file is next opened, with a notice.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import typing as tp
from pathlib import Path

from ..errors import UsageError
from .writelock import WriteLock

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
INVALID_INPUT = "invalid_input"
# A request that was in flight on replicas that died: one line per death (the run ended before it was answered)...
REPLICA_DIED = "replica_died"
# ...and, once it was in flight on SUSPECT_AFTER of them, the line that marks it suspected of crashing its server:
# it is not sent again unless asked (--retry-suspected).
SUSPECTED_CRASH = "suspected_crash"
SUSPECT_AFTER = 2


def new_id(prefix: str) -> str:
    return prefix + os.urandom(12).hex()


def _head(custom_id: str, fingerprint: str | None) -> dict[str, tp.Any]:
    head: dict[str, tp.Any] = {"id": new_id("batch_req_"), "custom_id": custom_id}
    if fingerprint:
        head["request_fingerprint"] = fingerprint
    return head


def success_line(custom_id: str, request_id: str | None, body: bytes, fingerprint: str | None = None) -> bytes:
    """An output line for a 200 response; ``body`` is the server's JSON, spliced in without re-encoding."""
    if b"\n" in body or b"\r" in body:
        # Only whitespace between JSON tokens can hold a raw newline (strings escape theirs).
        body = body.replace(b"\r", b" ").replace(b"\n", b" ")
    head = _dumps(_head(custom_id, fingerprint))
    rid = _dumps(request_id or new_id("req_"))
    return (head[:-1] + ',"response":{"status_code":200,"request_id":' + rid + ',"body":').encode() + \
        body + b'},"error":null}\n'


def error_line(custom_id: str, code: str, message: str, fingerprint: str | None = None) -> bytes:
    """An output line for a request that failed: ``response`` null, ``error`` ``{code, message}``.

    Text UTF-8 cannot encode (a file name with a non-UTF-8 byte inside the message) becomes U+FFFD: an error
    line must always be writable.
    """
    rec = {**_head(custom_id, fingerprint), "response": None, "error": {"code": code, "message": message}}
    return (_dumps(rec) + "\n").encode("utf-8", "replace")


def check_out_path(path: Path, prompts: Path | None = None) -> None:
    """Raise :class:`UsageError` for a results path that cannot work: the prompts file itself, a folder that does
    not exist, a directory. Checked before the prompts are read (they are copied next to the results)."""
    if prompts is not None and _same_file(path, prompts):
        raise UsageError(f"--out {path} is the prompts file itself",
                         fix="write results to another file, e.g. --out " + str(default_out_path(prompts)))
    if not path.parent.is_dir():
        raise UsageError(f"cannot write results to {path}: folder {path.parent} does not exist",
                         fix="create the folder or choose another --out")
    if path.is_dir():
        raise UsageError(f"cannot write results to {path}: it is a directory",
                         fix="give --out a file name, e.g. --out results.jsonl")


def default_out_path(prompts: Path) -> Path:
    """``<dir>/<stem>.results.jsonl`` next to the prompts file."""
    return prompts.with_name(prompts.stem + ".results.jsonl")


@dataclasses.dataclass
class Previous:
    """What earlier runs left in the results file."""

    done: set[str]  # ids with a successful line: skipped on resume
    failed: dict[str, str]  # id -> error code of its last line (not done): retried on resume
    lines: int
    notices: list[str]
    # done ids -> (request_fingerprint, line number) of their successful line; ids whose line has no fingerprint
    # (written by an older version) are missing
    fingerprints: dict[str, tuple[str, int]] = dataclasses.field(default_factory=dict)
    # ids not done whose last lines are REPLICA_DIED: how many replicas died with them in flight (in a row)
    died: dict[str, int] = dataclasses.field(default_factory=dict)
    # ids not done whose last line is SUSPECTED_CRASH -> its message
    suspected: dict[str, str] = dataclasses.field(default_factory=dict)
    # ids not done -> the request_fingerprint of their last error line (what was asked when it failed)
    error_fingerprints: dict[str, str] = dataclasses.field(default_factory=dict)

    def forget_failures_of(self, cids: tp.Iterable[str]) -> None:
        """These requests were edited since they failed: their deaths and suspicion were another request's."""
        for cid in cids:
            self.died.pop(cid, None)
            self.suspected.pop(cid, None)


class ResultsFile:
    """An open, locked results file. Use :meth:`open`; append with :meth:`write`; :meth:`close` at the end."""

    def __init__(self, path: Path, fd: int, previous: Previous, lock: WriteLock | None = None) -> None:
        self.path = path
        self.fd = fd
        self.previous = previous
        self.lock = lock

    @classmethod
    def open(cls, path: Path, prompts: Path | None = None, lock: bool = True) -> ResultsFile:
        """Create (mode 0600) or open ``path`` for appending, lock it, repair a partial last line, read it.

        Raises :class:`UsageError` for an unwritable path, a path equal to the prompts file, or a file that
        another run holds (on this node or another). ``lock=False`` (``--no-lock``) takes no lock at all.
        """
        path = Path(path)
        check_out_path(path, prompts)
        try:
            fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except IsADirectoryError:
            raise UsageError(f"cannot write results to {path}: it is a directory",
                             fix="give --out a file name, e.g. --out results.jsonl") from None
        except OSError as exc:
            raise UsageError(f"cannot write results to {path}: {exc.strerror}",
                             fix="choose a writable --out (check the folder's permissions)") from None
        held: WriteLock | None = None
        try:
            held = WriteLock.acquire(path, fd, enabled=lock)
            notices = held.notices + _repair_partial_tail(fd, path)
            previous = _read_previous(fd, path)
            previous.notices[:0] = notices
        except BaseException:
            if held is not None:
                held.release()
            os.close(fd)
            raise
        return cls(path, fd, previous, held)

    def write(self, line: bytes) -> None:
        """Append one complete line with a single ``write`` (O_APPEND): it reaches the file at once."""
        view = memoryview(line)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]

    def close(self) -> None:
        if self.fd < 0:
            return
        with contextlib.suppress(OSError):
            os.fsync(self.fd)
        if self.lock is not None:
            self.lock.release()  # the lock file first, while the flock still keeps this node's runs out
        os.close(self.fd)  # releases the flock
        self.fd = -1

    def __enter__(self) -> ResultsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def _repair_partial_tail(fd: int, path: Path) -> list[str]:
    size = os.fstat(fd).st_size
    if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
        return []
    pos, chunk = size, 1 << 16
    cut = 0
    while pos > 0:
        start = max(0, pos - chunk)
        data = os.pread(fd, pos - start, start)
        i = data.rfind(b"\n")
        if i >= 0:
            cut = start + i + 1
            break
        pos = start
    os.ftruncate(fd, cut)
    return [f"{path}: removed a partial last line ({size - cut} bytes, cut off when an earlier run was stopped); "
            "its request will be sent again"]


def _read_previous(fd: int, path: Path) -> Previous:
    done: set[str] = set()
    failed: dict[str, str] = {}
    fingerprints: dict[str, tuple[str, int]] = {}
    died: dict[str, int] = {}
    suspected: dict[str, str] = {}
    error_fps: dict[str, str] = {}
    notices: list[str] = []
    lines = 0
    with os.fdopen(os.dup(fd), "rb") as fh:
        fh.seek(0)
        for lineno, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            lines += 1
            try:
                rec = json.loads(raw)
                cid = rec["custom_id"]
                if not isinstance(cid, str):
                    raise TypeError("custom_id is not text")
            except (ValueError, KeyError, TypeError, RecursionError):
                notices.append(f"{path}:{lineno}: not a results line; ignored")
                continue
            if _is_success(rec):
                done.add(cid)
                failed.pop(cid, None)
                died.pop(cid, None)
                suspected.pop(cid, None)
                error_fps.pop(cid, None)
                fp = rec.get("request_fingerprint")
                if isinstance(fp, str) and cid not in fingerprints:
                    fingerprints[cid] = (fp, lineno)
            elif cid not in done:
                err = rec.get("error") or {}
                code = failed[cid] = str(err.get("code", "error")) if isinstance(err, dict) else "error"
                died[cid] = died.get(cid, 0) + 1 if code == REPLICA_DIED else 0
                if code == SUSPECTED_CRASH:
                    suspected[cid] = str(err.get("message", ""))
                else:
                    suspected.pop(cid, None)
                fp = rec.get("request_fingerprint")
                if isinstance(fp, str):
                    error_fps[cid] = fp
    died = {cid: n for cid, n in died.items() if n and cid not in done}
    return Previous(done, failed, lines, notices, fingerprints, died, suspected, error_fps)


def _is_success(rec: dict[str, tp.Any]) -> bool:
    resp = rec.get("response")
    return isinstance(resp, dict) and resp.get("status_code") == 200


def final_view(path: Path) -> dict[str, dict[str, tp.Any]]:
    """The final state of every custom_id in a results file: its successful line, else its last line."""
    view: dict[str, dict[str, tp.Any]] = {}
    with open(path, "rb") as fh:
        for raw in fh:
            if not raw.endswith(b"\n"):
                break  # a partial last line is not a result
            try:
                rec = json.loads(raw)
                cid = rec["custom_id"]
                if not isinstance(cid, str):
                    raise TypeError("custom_id is not text")
            except (ValueError, KeyError, TypeError, RecursionError):  # not a results line (or nested too deep)
                continue
            old = view.get(cid)
            if old is None or not _is_success(old):
                view[cid] = rec
    return view
