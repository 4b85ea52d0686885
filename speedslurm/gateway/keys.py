"""The gateway's users: one key per name, stored hashed in ``keys.json`` (0600) in the gateway's folder.

A key is ``ssg-`` and 43 URL-safe characters (256 random bits); only its SHA-256 is kept, so the file does not
give the keys away. A request's key is checked against every stored hash with :func:`hmac.compare_digest`
(constant time). The running gateway reads the file again when it changes: ``keys add`` and ``keys revoke`` take
effect without a restart.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import time
import typing as tp
from pathlib import Path

from ..errors import UsageError
from ..rundir.layout import make_private_dir
from ..rundir.records import write_json_atomic

FILE = "keys.json"
PREFIX = "ssg-"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
_SHA256 = re.compile(r"[0-9a-f]{64}")
log = logging.getLogger("speedslurm.gateway")


def digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise UsageError(f"{name!r} is not a valid key name",
                         fix="use 1-64 letters, digits, '.', '_', '@' or '-', starting with a letter or digit")
    return name


class KeyStore:
    """The keys of a gateway folder. ``check(key)`` gives the key's name, or None; ``problem`` says what is wrong
    with the file as last read (None: nothing)."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / FILE
        self._seen: tuple[int, ...] | None = None
        self._hashes: list[tuple[bytes, str]] = []
        self.problem: str | None = None

    # --------------------------------------------------------------------------------------- the file

    def _read(self) -> dict[str, dict[str, tp.Any]]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise UsageError(f"cannot read the gateway's keys {self.path}: {exc}",
                             fix="restore the file, or move it away and add the keys again") from None
        keys = data.get("keys") if isinstance(data, dict) else None
        if not isinstance(keys, dict):
            raise UsageError(f"{self.path} is not a keys file", fix="move it away and add the keys again")
        return keys

    def _write(self, keys: dict[str, dict[str, tp.Any]]) -> None:
        write_json_atomic(self.path, {"keys": keys})

    @contextlib.contextmanager
    def _changing(self) -> tp.Iterator[dict[str, dict[str, tp.Any]]]:
        """The keys, read and written back under a lock: two ``keys add`` at once both keep their key."""
        make_private_dir(self.path.parent, "gateway folder", "gateway.dir")
        try:
            fd = os.open(self.path.with_name(FILE + ".lock"), os.O_RDONLY | os.O_CREAT, 0o600)
        except OSError as exc:
            raise UsageError(f"cannot change the gateway's keys in {self.path.parent}: {exc.strerror}",
                             fix="check the folder's permissions (gateway.dir)") from None
        try:
            with contextlib.suppress(OSError):  # a file system without locks (ENOLCK): one admin at a time
                fcntl.flock(fd, fcntl.LOCK_EX)
            keys = self._read()
            yield keys
            self._write(keys)
        finally:
            os.close(fd)

    # --------------------------------------------------------------------------------------- commands

    def add(self, name: str) -> str:
        """A new key for ``name``; :class:`UsageError` if the name has one already (revoke it first)."""
        check_name(name)
        with self._changing() as keys:
            if name in keys:
                raise UsageError(f"{name!r} has a key already",
                                 fix=f"revoke it first (`speedslurm gateway keys revoke {name}`), or pick another name")
            key = PREFIX + secrets.token_urlsafe(32)
            keys[name] = {"sha256": digest(key), "created": time.time()}
        return key

    def revoke(self, name: str) -> None:
        with self._changing() as keys:
            if name not in keys:
                raise UsageError(f"no key is named {name!r}",
                                 fix=f"the names are: {', '.join(sorted(keys)) or '(none yet)'}")
            del keys[name]

    def names(self) -> list[dict[str, tp.Any]]:
        return [{"name": n, "created": _created(v)} for n, v in sorted(self._read().items())]

    # --------------------------------------------------------------------------------------- checking

    def _refresh(self) -> None:
        try:
            st = self.path.stat()
            # ctime cannot be set back by anyone: a file rewritten within the clock's tick, or with its mtime
            # restored, is read again all the same
            seen: tuple[int, ...] | None = (st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size)
        except FileNotFoundError:
            seen = None
        if seen == self._seen and self._seen is not None:
            return
        self._seen = seen  # read once per change of the file: a problem is logged once
        try:
            keys = self._read()
        except UsageError as exc:
            self.problem = f"{exc} (the keys read before it broke are used)"
            log.warning("%s", json.dumps({"event": "keys_file_broken", "why": self.problem}))
            return  # a broken file keeps the keys read before (the gateway goes on serving)
        hashes, bad = [], []
        for name, entry in keys.items():
            sha = entry.get("sha256") if isinstance(entry, dict) else None
            if isinstance(sha, str) and _SHA256.fullmatch(sha):
                hashes.append((bytes.fromhex(sha), name))
            else:
                bad.append(name)
        self._hashes = hashes
        self.problem = (f"{self.path}: the entries of {', '.join(map(repr, sorted(bad)))} are not keys and are "
                        "ignored (revoke them and add them again)") if bad else None
        if self.problem:
            log.warning("%s", json.dumps({"event": "keys_file_entries_ignored", "why": self.problem}))

    def count(self) -> int:
        """How many keys the gateway accepts now."""
        self._refresh()
        return len(self._hashes)

    def check(self, key: str | None) -> str | None:
        """The name whose key ``key`` is, or None. Every stored hash is compared, in constant time each."""
        self._refresh()
        if not key:
            return None
        given = bytes.fromhex(digest(key))
        found = None
        for stored, name in self._hashes:
            if hmac.compare_digest(stored, given):
                found = name
        return found


def _created(entry: tp.Any) -> float:
    value = entry.get("created") if isinstance(entry, dict) else None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0
