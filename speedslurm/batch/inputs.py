"""Prompt files: read once, validated line by line (:mod:`.promptline`), streamed, never loaded whole.

The input is read exactly once: :func:`scan_prompts` validates every line, collects the ids (duplicates are an
error) and each request's :func:`fingerprint`, and copies the bytes it read into a :class:`Spool` (a private,
anonymous file). :func:`iter_prompts` is the second pass that the runner consumes, over the spool, never over
the path again: a file edited in between, a generator still writing, stdin, a FIFO or ``<(command)`` all give
the run exactly the lines that were validated.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
import typing as tp
from pathlib import Path

from ..errors import UsageError
from .promptline import (
    CHAT,
    COMPLETIONS,
    URLS,
    LineError,
    Request,
    RequestDefaults,
    fingerprint,
    parse_line,
)

__all__ = ["CHAT", "COMPLETIONS", "URLS", "InvalidLine", "LineError", "Request", "RequestDefaults", "ScanResult",
           "Spool", "fingerprint", "iter_prompts", "parse_line", "scan_prompts"]


@dataclasses.dataclass
class InvalidLine:
    """A line that failed validation (kept only with ``--skip-invalid``)."""

    custom_id: str
    line: int
    message: str


@dataclasses.dataclass
class ScanResult:
    """What the first pass learned: how many requests, which ids, which lines are invalid, what each asks."""

    path: Path
    display: str
    requests: int
    invalid: int
    lines: dict[str, int]  # every custom_id (valid lines and invalid ones) -> its line number
    invalid_ids: set[str]
    fingerprints: dict[str, str] = dataclasses.field(default_factory=dict)  # valid requests: id -> fingerprint

    @property
    def ids(self) -> tp.KeysView[str]:
        return self.lines.keys()


Source = str | Path | tp.BinaryIO  # a path, or a binary stream read as it is


@contextlib.contextmanager
def _opened(source: Source) -> tp.Iterator[tp.BinaryIO]:
    """A binary stream over ``source``: an open stream is used as it is (and left open), a path is opened."""
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as fh:
            yield fh
    else:
        yield source


def _lines(fh: tp.Iterable[bytes], copy_to: tp.BinaryIO | None = None
           ) -> tp.Iterator[tuple[int, str | None, LineError | None]]:
    """Yield (line number, text or None for blank, decode error) for each line of a binary stream.

    ``copy_to`` gets every line's bytes as read, blank ones included, so its line numbers are the input's.
    """
    for lineno, raw in enumerate(fh, 1):
        if copy_to is not None:
            copy_to.write(raw)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield lineno, None, LineError(
                f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})",
                "save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)")
            continue
        if lineno == 1 and text.startswith("\ufeff"):
            text = text[1:]
        if not text.strip():
            yield lineno, None, None
            continue
        yield lineno, text, None


def scan_prompts(source: Source, defaults: RequestDefaults, skip_invalid: bool = False,
                 display: str | None = None, copy_to: tp.BinaryIO | None = None) -> ScanResult:
    """First pass: validate every line, collect the custom_ids and fingerprints, before anything is sent.

    ``source`` is a path or a binary stream (read to its end, not closed). ``copy_to`` receives the bytes read:
    the second pass (:func:`iter_prompts`) reads that copy, so that it sees exactly what was validated.

    Raises :class:`UsageError` naming ``file:line``, the problem and the fix for the first bad line (unless
    ``skip_invalid``), for a duplicate custom_id (always) and for a file with no prompts.
    """
    name = display or str(source if isinstance(source, (str, os.PathLike)) else "<stream>")
    first_line: dict[str, int] = {}  # id -> first line; to name both lines of a duplicate
    fingerprints: dict[str, str] = {}
    requests = invalid = 0
    invalid_ids: set[str] = set()
    first_error: tuple[int, LineError] | None = None
    with _opened(source) as fh:
        for lineno, text, err in _lines(fh, copy_to):
            if text is None and err is None:
                continue
            cid: str | None = None
            if err is None:
                try:
                    req = parse_line(tp.cast(str, text), lineno, defaults)
                    cid = req.custom_id
                except LineError as exc:
                    err = exc
            if err is not None:
                invalid += 1
                if first_error is None:
                    first_error = (lineno, err)
                cid = err.custom_id or f"line-{lineno}"
                invalid_ids.add(cid)
            assert cid is not None
            prev = first_line.get(cid)
            if prev is not None:
                raise UsageError(f"{name}:{lineno}: duplicate custom_id {json.dumps(cid)} (first used on line {prev})",
                                 fix="give every line its own custom_id; results are matched to prompts by it")
            first_line[cid] = lineno
            if err is None:
                requests += 1
                fingerprints[cid] = req.fingerprint
    if first_error is not None and not skip_invalid:
        lineno, err = first_error
        more = f" ({invalid - 1} more invalid line{'s' if invalid > 2 else ''} after it)" if invalid > 1 else ""
        raise UsageError(f"{name}:{lineno}: {err.problem}{more}",
                         fix=f"{err.fix}; or pass --skip-invalid to write an error line for each bad line and go on")
    if requests == 0 and invalid == 0:
        raise UsageError(f"{name} has no prompts (the file is empty or only blank lines)",
                         fix="write one JSON object per line, e.g. {\"prompt\": \"Hello\"}")
    path = Path(source) if isinstance(source, (str, os.PathLike)) else Path(name)
    return ScanResult(path, name, requests, invalid, first_line, invalid_ids, fingerprints)


def iter_prompts(source: Source, defaults: RequestDefaults,
                 known: tp.Mapping[str, str] | None = None) -> tp.Iterator[Request | InvalidLine]:
    """Second pass: yield each request (or invalid line) in file order, one at a time.

    ``known``: the first pass's fingerprints (:attr:`ScanResult.fingerprints`) of these same bytes.
    """
    with _opened(source) as fh:
        for lineno, text, err in _lines(fh):
            if text is None and err is None:
                continue
            if err is None:
                try:
                    yield parse_line(tp.cast(str, text), lineno, defaults, known)
                    continue
                except LineError as exc:
                    err = exc
            yield InvalidLine(err.custom_id or f"line-{lineno}", lineno, err.problem)


class Spool:
    """A private copy of the prompts as they were read (mode 0600, never visible by name when the file system
    allows: ``O_TMPFILE``, else created and unlinked at once). Closing it frees its space.

    It lives in ``folder`` (the results file's, so a large prompts file is copied where the results go, not into a
    small /tmp) and falls back to the temporary folder when that one refuses new files.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd

    @classmethod
    def create(cls, folder: Path | None = None) -> Spool:
        folders = [folder] if folder is not None else []
        folders.append(Path(tempfile.gettempdir()))
        last: OSError | None = None
        for where in folders:
            try:
                return cls(os.open(where, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600))
            except (OSError, AttributeError):
                pass  # a file system (or a platform) without O_TMPFILE
            try:
                fd, name = tempfile.mkstemp(prefix=".speedslurm-prompts-", suffix=".spool", dir=where)
            except OSError as exc:
                last = exc
                continue
            os.unlink(name)
            return cls(fd)
        assert last is not None
        raise last

    def writer(self) -> tp.BinaryIO:
        """A buffered stream that appends to the spool (close it to flush; the spool stays open)."""
        return os.fdopen(os.dup(self.fd), "wb", buffering=1 << 20)

    def reader(self) -> tp.BinaryIO:
        """A stream over the whole spool from its first byte (each reader has its own position)."""
        fh = os.fdopen(os.dup(self.fd), "rb", buffering=1 << 16)
        fh.seek(0)
        return fh

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

