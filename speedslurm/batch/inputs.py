"""Prompt files: parse and validate JSONL lines, streamed, never loaded whole.

Accepted line formats (one JSON object per line, blank lines ignored):

* an OpenAI Batch request: ``{"custom_id", "method": "POST", "url": "/v1/chat/completions" | "/v1/completions",
  "body": {...}}``;
* ``{"messages": [...], ...}`` (chat) or ``{"prompt": "...", ...}`` (completion), with an optional ``custom_id``
  and request fields (``max_tokens``, ``temperature``, ``top_p``, ``stop``, ``seed``, ...) that go into the body.

A line without ``custom_id`` gets ``line-N`` (N = its 1-based line number). Flag defaults (``--max-tokens``,
``--temperature``, ``--system``) fill fields a line does not set; the system message is prepended to a chat
that has none.

The input is read exactly once: :func:`scan_prompts` validates every line, collects the ids (duplicates are an
error) and each request's :func:`fingerprint`, and copies the bytes it read into a :class:`Spool` (a private,
anonymous file). :func:`iter_prompts` is the second pass that the runner consumes, over the spool, never over
the path again: a file edited in between, a generator still writing, stdin, a FIFO or ``<(command)`` all give
the run exactly the lines that were validated.

Everything a line makes the runner send must be encodable as UTF-8: a JSON escape of half a surrogate pair
(``"\\ud800"``), which ``json.loads`` accepts, is a validation error here, not a failure when the request is sent.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import tempfile
import typing as tp
from pathlib import Path

from ..errors import UsageError

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
URLS = (CHAT, COMPLETIONS)
BATCH_KEYS = frozenset({"custom_id", "method", "url", "body"})
ROLES = frozenset({"system", "user", "assistant", "tool", "developer", "function"})

_INT_FIELDS = ("max_tokens", "max_completion_tokens", "seed", "n", "top_k", "n_probs")
_NUM_FIELDS = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repeat_penalty")


@dataclasses.dataclass(frozen=True)
class RequestDefaults:
    """Values from flags that fill fields a line does not set."""

    max_tokens: int | None = None
    temperature: float | None = None
    system: str | None = None


@dataclasses.dataclass
class Request:
    """One validated request: where it goes and the JSON body to send."""

    custom_id: str
    url: str  # CHAT or COMPLETIONS
    body: dict[str, tp.Any]
    line: int
    attempts: int = 0  # failed tries so far (the runner's retry count)
    fingerprint: str = ""  # what was asked (url and body); written into its result line


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


class LineError(Exception):
    """A problem with one line; ``custom_id`` is set when the line named one."""

    def __init__(self, problem: str, fix: str, custom_id: str | None = None) -> None:
        super().__init__(problem)
        self.problem = problem
        self.fix = fix
        self.custom_id = custom_id


def _is_int(v: tp.Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: tp.Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_fields(body: dict[str, tp.Any], where: str) -> None:
    """Type-check the request fields we know; unknown fields pass through to the server."""
    for key in _INT_FIELDS:
        if key in body and body[key] is not None and not _is_int(body[key]):
            raise LineError(f"{where}'{key}' must be an integer, got {json.dumps(body[key])}",
                            f"write {key} as a whole number, e.g. \"{key}\": 64")
    for key in ("max_tokens", "max_completion_tokens", "n"):
        if _is_int(body.get(key)) and body[key] < 1:
            raise LineError(f"{where}'{key}' must be at least 1, got {body[key]}", f"use a positive {key}")
    for key in _NUM_FIELDS:
        if key in body and body[key] is not None and not _is_num(body[key]):
            raise LineError(f"{where}'{key}' must be a number, got {json.dumps(body[key])}",
                            f"write {key} as a number, e.g. \"{key}\": 0.7")
    if _is_num(body.get("temperature")) and body["temperature"] < 0:
        raise LineError(f"{where}'temperature' must be >= 0, got {body['temperature']}", "use a temperature >= 0")
    stop = body.get("stop")
    if stop is not None and not isinstance(stop, str) and not (
            isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise LineError(f"{where}'stop' must be a string or a list of strings", "e.g. \"stop\": [\"\\n\\n\"]")
    if body.get("stream"):
        raise LineError(f"{where}'stream': true is not supported in a batch", "remove \"stream\" from the line")
    if "model" in body and not isinstance(body["model"], str):
        raise LineError(f"{where}'model' must be a string", "remove it or write the model name as a string")


def _check_messages(messages: tp.Any, where: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise LineError(f"{where}'messages' must be a non-empty list of {{\"role\", \"content\"}} objects",
                        "e.g. \"messages\": [{\"role\": \"user\", \"content\": \"Hello\"}]")
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise LineError(f"{where}messages[{i}] must be an object, got {type(msg).__name__}",
                            "write each message as {\"role\": \"user\", \"content\": \"...\"}")
        role = msg.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise LineError(f"{where}messages[{i}] has role {json.dumps(role)}",
                            f"use one of: {', '.join(sorted(ROLES))}")
        content = msg.get("content")
        if content is None and role != "assistant":
            raise LineError(f"{where}messages[{i}] has no 'content'", "add \"content\": \"...\" to the message")
        if content is not None and not isinstance(content, (str, list)):
            raise LineError(f"{where}messages[{i}].content must be a string or a list of parts, "
                            f"got {type(content).__name__}", "write the content as a string")


def _check_prompt(prompt: tp.Any, where: str) -> None:
    if isinstance(prompt, str):
        return
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, int)) and not isinstance(p, bool)
                                                   for p in prompt):
        return
    raise LineError(f"{where}'prompt' must be a string, got {type(prompt).__name__}",
                    "write the prompt as a string, e.g. \"prompt\": \"Once upon a time\"")


def _apply_defaults(url: str, body: dict[str, tp.Any], defaults: RequestDefaults) -> dict[str, tp.Any]:
    if defaults.max_tokens is not None and "max_tokens" not in body and "max_completion_tokens" not in body:
        body["max_tokens"] = defaults.max_tokens
    if defaults.temperature is not None and "temperature" not in body:
        body["temperature"] = defaults.temperature
    if defaults.system is not None and url == CHAT:
        msgs = body["messages"]
        if not (msgs and isinstance(msgs[0], dict) and msgs[0].get("role") in ("system", "developer")):
            body["messages"] = [{"role": "system", "content": defaults.system}, *msgs]
    return body


def parse_line(text: str, lineno: int, defaults: RequestDefaults,
               known: tp.Mapping[str, str] | None = None) -> Request:
    """Parse one non-blank line into a :class:`Request`; raise :class:`LineError` naming the problem.

    ``known`` maps custom_ids to the fingerprints a first pass over the same bytes computed (and so checked):
    the second pass takes them from there instead of hashing every request again.
    """
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise LineError(f"malformed JSON ({exc.msg} at column {exc.colno})",
                        "write one complete JSON object per line (check quotes, commas and braces)") from None
    if not isinstance(obj, dict):
        raise LineError(f"expected a JSON object, got {type(obj).__name__}",
                        "write each line as {\"prompt\": \"...\"}, {\"messages\": [...]} or an OpenAI Batch request")
    cid = obj.get("custom_id")
    if cid is not None and not isinstance(cid, str):
        raise LineError(f"custom_id must be a string, got {json.dumps(cid)}",
                        f"quote it: \"custom_id\": \"{cid}\"")
    if cid is not None and not cid:
        raise LineError("custom_id is empty", "give the line a non-empty custom_id or leave the key out")
    if cid is not None and _SURROGATE.search(cid):
        # No custom_id on the error: it could not be written into the results file either.
        raise LineError(f"custom_id {_surrogate_problem(cid)}", _SURROGATE_FIX)
    custom_id = cid if cid is not None else f"line-{lineno}"

    if "body" in obj or "url" in obj or "method" in obj:
        unknown = sorted(set(obj) - BATCH_KEYS)
        if unknown:
            raise LineError(f"unknown key(s) {', '.join(map(repr, unknown))} in an OpenAI Batch request",
                            "a Batch line holds only custom_id, method, url and body; put request fields in body",
                            cid)
        method = obj.get("method", "POST")
        if method != "POST":
            raise LineError(f"method must be \"POST\", got {json.dumps(method)}", "set \"method\": \"POST\"", cid)
        url = obj.get("url")
        if url not in URLS:
            raise LineError(f"url must be \"{CHAT}\" or \"{COMPLETIONS}\", got {json.dumps(url)}",
                            f"set \"url\": \"{CHAT}\" for messages or \"{COMPLETIONS}\" for a prompt", cid)
        body = obj.get("body")
        if not isinstance(body, dict):
            raise LineError(f"'body' must be a JSON object, got {json.dumps(body)[:40]}",
                            "put the request in \"body\": {\"messages\": [...]} or {\"prompt\": \"...\"}", cid)
        where = "body."
        try:
            if url == CHAT:
                if "messages" not in body:
                    raise LineError(f"body has no 'messages' for {CHAT}",
                                    "add \"messages\": [...] to body, or use url /v1/completions with a prompt")
                _check_messages(body["messages"], where)
            else:
                if "prompt" not in body:
                    raise LineError(f"body has no 'prompt' for {COMPLETIONS}",
                                    "add \"prompt\": \"...\" to body, or use url /v1/chat/completions with messages")
                _check_prompt(body["prompt"], where)
            _check_fields(body, where)
        except LineError as exc:
            exc.custom_id = cid
            raise
        body = dict(body)
    else:
        has_m, has_p = "messages" in obj, "prompt" in obj
        if has_m and has_p:
            raise LineError("the line has both 'messages' and 'prompt'",
                            "keep 'messages' for a chat or 'prompt' for a completion, not both", cid)
        if not has_m and not has_p:
            raise LineError("the line is neither format: no 'messages', 'prompt' or OpenAI Batch 'body'",
                            "write {\"prompt\": \"...\"}, {\"messages\": [...]} or an OpenAI Batch request", cid)
        body = {k: v for k, v in obj.items() if k != "custom_id"}
        try:
            if has_m:
                url = CHAT
                _check_messages(body["messages"], "")
            else:
                url = COMPLETIONS
                _check_prompt(body["prompt"], "")
            _check_fields(body, "")
        except LineError as exc:
            exc.custom_id = cid
            raise
    body = _apply_defaults(url, body, defaults)
    fp = known.get(custom_id) if known is not None else None
    if fp is not None:
        return Request(custom_id, url, body, lineno, fingerprint=fp)
    try:
        fp = fingerprint(url, body)
    except UnicodeEncodeError:
        where, text = _find_surrogate(body, "body" if "body" in obj else "") or ("the request", "")
        raise LineError(f"{where} {_surrogate_problem(text)}", _SURROGATE_FIX, cid) from None
    return Request(custom_id, url, body, lineno, fingerprint=fp)


def fingerprint(url: str, body: dict[str, tp.Any]) -> str:
    """A short hash of what a request asks (its url and its body as sent, before a replica adds ``model``).

    The first 16 hex digits of the sha256 of the canonical JSON (sorted keys, no spaces, UTF-8). Raises
    :class:`UnicodeEncodeError` for text that UTF-8 cannot encode (lone surrogates).
    """
    canon = json.dumps({"url": url, "body": body}, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()[:16]


# After json.loads every surrogate code point is a lone one (a valid pair of escapes becomes one character).
_SURROGATE = re.compile("[\ud800-\udfff]")
_SURROGATE_FIX = ("write the character itself, or both halves of its pair (e.g. \"\\ud83d\\ude00\"); "
                  "drop the escape if the text was cut in the middle of a character")


def _surrogate_problem(text: str) -> str:
    m = _SURROGATE.search(text)
    code = f"\\u{ord(m.group()):04x}" if m else "a surrogate"
    return (f"holds the JSON escape \"{code}\", half of a UTF-16 surrogate pair without its other half: "
            "not valid Unicode, and it cannot be sent")


def _find_surrogate(value: tp.Any, where: str) -> tuple[str, str] | None:
    """The JSON path and the text of the first string (key or value) holding a lone surrogate."""
    if isinstance(value, str):
        return (where or "the line", value) if _SURROGATE.search(value) else None
    if isinstance(value, dict):
        for k, v in value.items():
            if _SURROGATE.search(k):
                return f"a key in {where or 'the line'}", k
            found = _find_surrogate(v, f"{where}.{k}" if where else k)
            if found:
                return found
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found = _find_surrogate(v, f"{where}[{i}]")
            if found:
                return found
    return None


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

