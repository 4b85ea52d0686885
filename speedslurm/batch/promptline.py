"""One line of a prompts file: what it may hold, its checks, and the request it becomes.

Accepted line formats (one JSON object per line, blank lines ignored):

* an OpenAI Batch request: ``{"custom_id", "method": "POST", "url": "/v1/chat/completions" | "/v1/completions",
  "body": {...}}``;
* ``{"messages": [...], ...}`` (chat) or ``{"prompt": "...", ...}`` (completion), with an optional ``custom_id``
  and request fields (``max_tokens``, ``temperature``, ``top_p``, ``stop``, ``seed``, ...) that go into the body.

A line without ``custom_id`` gets ``line-N`` (N = its 1-based line number). Flag defaults (``--max-tokens``,
``--temperature``, ``--system``) fill fields a line does not set; the system message is prepended to a chat
that has none.

Everything a line makes the runner send must be encodable as UTF-8: a JSON escape of half a surrogate pair
(``"\\ud800"``), which ``json.loads`` accepts, is a validation error here, not a failure when the request is sent.

A line must also be JSON that every server reads: ``NaN``, ``Infinity`` and ``-Infinity`` (which ``json.loads``
accepts but JSON does not have), a number too large for a double (``1e999``, which Python reads as infinity), an
integer of more digits than Python converts, and nesting deeper than :data:`MAX_DEPTH` levels are errors naming
the problem and the fix, never a traceback.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import re
import sys
import typing as tp

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
URLS = (CHAT, COMPLETIONS)
BATCH_KEYS = frozenset({"custom_id", "method", "url", "body"})
ROLES = frozenset({"system", "user", "assistant", "tool", "developer", "function"})

_INT_FIELDS = ("max_tokens", "max_completion_tokens", "seed", "n", "top_k", "n_probs")
_NUM_FIELDS = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repeat_penalty")
_INT64 = (-(2**63), 2**63 - 1)  # what a server reads an integer field into

MAX_DEPTH = 100  # objects and lists inside each other (a chat with tool schemas needs a few dozen at most)


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
        if _is_int(body.get(key)) and not _INT64[0] <= body[key] <= _INT64[1]:
            raise LineError(f"{where}'{key}' is out of range ({_short(body[key])}): a server reads it as a 64-bit "
                            "integer", f"write {key} between {_INT64[0]} and {_INT64[1]}")
    for key in ("max_tokens", "max_completion_tokens", "n"):
        if _is_int(body.get(key)) and body[key] < 1:
            raise LineError(f"{where}'{key}' must be at least 1, got {body[key]}", f"use a positive {key}")
    for key in _NUM_FIELDS:
        if key in body and body[key] is not None and not _is_num(body[key]):
            raise LineError(f"{where}'{key}' must be a number, got {json.dumps(body[key])}",
                            f"write {key} as a number, e.g. \"{key}\": 0.7")
    for key in _NUM_FIELDS:
        if _is_int(body.get(key)) and abs(body[key]) > sys.float_info.max:
            raise LineError(f"{where}'{key}' is too large for a double ({_short(body[key])})",
                            f"write {key} as a number between -1.7e308 and 1.7e308")
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


def _short(number: int) -> str:
    text = str(number)
    return text if len(text) <= 24 else f"{text[:10]}...{text[-4:]}, {len(text)} digits"


# A JSON string, escapes included: what the depth count skips (brackets inside text do not nest).
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_BRACKET = re.compile(r"[\[\]{}]")
_NESTING = {"[": 1, "{": 1, "]": -1, "}": -1}


def _depth(text: str) -> int:
    """How deeply the objects and lists of a valid JSON text nest (its strings skipped); 0 when it cannot be more
    than :data:`MAX_DEPTH`."""
    if text.count("[") + text.count("{") <= MAX_DEPTH:
        return 0  # cannot be deeper: the common case costs two counts
    outside = _JSON_STRING.sub("", text)
    return max(itertools.accumulate(_NESTING[c] for c in _BRACKET.findall(outside)), default=0)


def _no_constant(name: str) -> tp.NoReturn:
    raise LineError(f"the line holds {name}, which is not JSON (a server cannot read it)",
                    f"write a finite number, or null, or quote it as text (\"{name}\")")


def _finite(literal: str) -> float:
    value = float(literal)
    if math.isinf(value):
        shown = literal if len(literal) <= 24 else f"{literal[:20]}..."
        raise LineError(f"the number {shown} is too large for a double (it would be sent as Infinity)",
                        "write a number between -1.7e308 and 1.7e308")
    return value


def load_json(text: str) -> tp.Any:
    """``json.loads`` for one prompts line: every way the text is not JSON a server reads is a :class:`LineError`."""
    try:
        obj = json.loads(text, parse_constant=_no_constant, parse_float=_finite)
    except json.JSONDecodeError as exc:
        raise LineError(f"malformed JSON ({exc.msg} at column {exc.colno})",
                        "write one complete JSON object per line (check quotes, commas and braces)") from None
    except RecursionError:  # the decoder's own limit (about 1000 levels)
        obj = _TOO_DEEP
    except ValueError:  # an integer of more digits than Python converts
        raise LineError(f"a number in the line has more than {_MAX_DIGITS()} digits",
                        "write numbers of at most 20 digits, or quote a long one as text") from None
    if obj is _TOO_DEEP or _depth(text) > MAX_DEPTH:
        raise LineError(f"nested too deep (max {MAX_DEPTH} levels of objects and lists)",
                        f"flatten the line: at most {MAX_DEPTH} objects or lists inside each other")
    return obj


_TOO_DEEP = object()
_MAX_DIGITS: tp.Callable[[], int] = getattr(sys, "get_int_max_str_digits", lambda: 4300)


def parse_line(text: str, lineno: int, defaults: RequestDefaults,
               known: tp.Mapping[str, str] | None = None) -> Request:
    """Parse one non-blank line into a :class:`Request`; raise :class:`LineError` naming the problem.

    ``known`` maps custom_ids to the fingerprints a first pass over the same bytes computed (and so checked):
    the second pass takes them from there instead of hashing every request again.
    """
    obj = load_json(text)
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
