"""Prompt files: every input format, defaults, and every validation error with its file:line."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest

from speedslurm.batch.inputs import (
    CHAT,
    COMPLETIONS,
    InvalidLine,
    Request,
    RequestDefaults,
    Spool,
    fingerprint,
    iter_prompts,
    scan_prompts,
)
from speedslurm.errors import UsageError

NO_DEFAULTS = RequestDefaults()


def write(tmp_path: Path, lines: list[str | dict], name: str = "p.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines))
    return path


def requests(path: Path, defaults: RequestDefaults = NO_DEFAULTS) -> list[Request]:
    out = list(iter_prompts(path, defaults))
    assert all(isinstance(r, Request) for r in out)
    return [r for r in out if isinstance(r, Request)]


def test_every_format(tmp_path: Path) -> None:
    path = write(tmp_path, [
        {"custom_id": "a", "method": "POST", "url": CHAT, "body": {"messages": [{"role": "user", "content": "hi"}]}},
        {"custom_id": "b", "method": "POST", "url": COMPLETIONS, "body": {"prompt": "once", "max_tokens": 3}},
        {"messages": [{"role": "user", "content": "x"}], "temperature": 0.1, "seed": 3, "stop": ["\n"]},
        "",  # blank lines are skipped but still counted for line numbers
        {"prompt": "p", "custom_id": "named", "top_p": 0.5},
        {"custom_id": "no-method", "url": CHAT, "body": {"messages": [{"role": "user", "content": "y"}]}},
    ])
    scan = scan_prompts(path, NO_DEFAULTS)
    assert scan.requests == 5 and scan.invalid == 0
    assert scan.ids == {"a", "b", "line-3", "named", "no-method"}
    reqs = requests(path)
    assert [(r.custom_id, r.url, r.line) for r in reqs] == [
        ("a", CHAT, 1), ("b", COMPLETIONS, 2), ("line-3", CHAT, 3), ("named", COMPLETIONS, 5),
        ("no-method", CHAT, 6)]
    assert reqs[2].body == {"messages": [{"role": "user", "content": "x"}], "temperature": 0.1, "seed": 3,
                            "stop": ["\n"]}
    assert "custom_id" not in reqs[3].body and reqs[3].body["top_p"] == 0.5


def test_flag_defaults_fill_only_missing_fields(tmp_path: Path) -> None:
    path = write(tmp_path, [
        {"messages": [{"role": "user", "content": "u"}]},
        {"messages": [{"role": "system", "content": "mine"}, {"role": "user", "content": "u"}], "max_tokens": 5},
        {"prompt": "p", "temperature": 1.0},
    ])
    reqs = requests(path, RequestDefaults(max_tokens=32, temperature=0.0, system="Be brief."))
    assert reqs[0].body == {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "u"}],
                            "max_tokens": 32, "temperature": 0.0}
    assert reqs[1].body["messages"][0] == {"role": "system", "content": "mine"}  # its own system message is kept
    assert reqs[1].body["max_tokens"] == 5
    assert reqs[2].body == {"prompt": "p", "temperature": 1.0, "max_tokens": 32}  # no system for completions


BAD_LINES = [
    ('{"prompt": "a"', "malformed JSON"),
    ('["a list"]', "expected a JSON object, got list"),
    ('{"text": "hello"}', "neither format"),
    ('{"prompt": "a", "messages": [{"role": "user", "content": "b"}]}', "both 'messages' and 'prompt'"),
    ('{"prompt": 42}', "'prompt' must be a string"),
    ('{"messages": []}', "'messages' must be a non-empty list"),
    ('{"messages": "hi"}', "'messages' must be a non-empty list"),
    ('{"messages": [{"role": "robot", "content": "x"}]}', "messages[0] has role \"robot\""),
    ('{"messages": [{"role": "user"}]}', "messages[0] has no 'content'"),
    ('{"messages": [{"role": "user", "content": 5}]}', "messages[0].content must be a string"),
    ('{"prompt": "a", "max_tokens": "10"}', "'max_tokens' must be an integer"),
    ('{"prompt": "a", "max_tokens": 0}', "'max_tokens' must be at least 1"),
    ('{"prompt": "a", "temperature": "hot"}', "'temperature' must be a number"),
    ('{"prompt": "a", "temperature": -1}', "'temperature' must be >= 0"),
    ('{"prompt": "a", "stop": 5}', "'stop' must be a string or a list of strings"),
    ('{"prompt": "a", "stream": true}', "'stream': true is not supported"),
    ('{"prompt": "a", "custom_id": 7}', "custom_id must be a string"),
    ('{"prompt": "a", "custom_id": ""}', "custom_id is empty"),
    ('{"custom_id": "x", "method": "GET", "url": "/v1/completions", "body": {"prompt": "a"}}', "method must be \"POST\""),
    ('{"custom_id": "x", "method": "POST", "url": "/v1/embeddings", "body": {"input": "a"}}', "url must be"),
    ('{"custom_id": "x", "method": "POST", "url": "/v1/chat/completions", "body": "hi"}', "'body' must be a JSON object"),
    ('{"custom_id": "x", "method": "POST", "url": "/v1/chat/completions", "body": {"prompt": "a"}}', "body has no 'messages'"),
    ('{"custom_id": "x", "method": "POST", "url": "/v1/completions", "body": {"messages": []}}', "body has no 'prompt'"),
    ('{"custom_id": "x", "url": "/v1/completions", "body": {"prompt": "a"}, "extra": 1}', "unknown key(s) 'extra'"),
    ('{"custom_id": "x", "url": "/v1/completions", "body": {"prompt": "a", "seed": 1.5}}', "body.'seed' must be an integer"),
]


@pytest.mark.parametrize(("line", "problem"), BAD_LINES, ids=[p for _, p in BAD_LINES])
def test_each_bad_line_names_file_line_problem_and_fix(tmp_path: Path, line: str, problem: str) -> None:
    path = write(tmp_path, [{"prompt": "ok"}, line])
    with pytest.raises(UsageError) as info:
        scan_prompts(path, NO_DEFAULTS)
    assert info.value.exit_code == 2
    assert str(info.value).startswith(f"{path}:2: ")
    assert problem in str(info.value)
    assert info.value.fix and "--skip-invalid" in info.value.fix


def test_non_utf8_bytes(tmp_path: Path) -> None:
    path = tmp_path / "latin.jsonl"
    path.write_bytes(b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(UsageError, match=r"latin\.jsonl:2: not valid UTF-8 \(byte 0xe9 at column 16\)"):
        scan_prompts(path, NO_DEFAULTS)


def test_utf8_bom_and_unicode_are_fine(tmp_path: Path) -> None:
    path = tmp_path / "bom.jsonl"
    path.write_bytes('\ufeff{"prompt": "ありがとう"}\n'.encode())
    assert requests(path)[0].body == {"prompt": "ありがとう"}


def test_count_of_further_invalid_lines(tmp_path: Path) -> None:
    path = write(tmp_path, ["nope", "{}", {"prompt": "ok"}, "[]"])
    with pytest.raises(UsageError, match=r":1: malformed JSON .*\(2 more invalid lines after it\)"):
        scan_prompts(path, NO_DEFAULTS)


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file(tmp_path: Path, content: str) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(UsageError, match="empty.jsonl has no prompts"):
        scan_prompts(path, NO_DEFAULTS)


def test_duplicate_custom_id_names_both_lines(tmp_path: Path) -> None:
    path = write(tmp_path, [{"prompt": "a", "custom_id": "x"}, {"prompt": "b"}, {"prompt": "c", "custom_id": "x"}])
    with pytest.raises(UsageError, match=r"p\.jsonl:3: duplicate custom_id \"x\" \(first used on line 1\)"):
        scan_prompts(path, NO_DEFAULTS)


def test_explicit_id_colliding_with_a_line_id_is_a_duplicate(tmp_path: Path) -> None:
    path = write(tmp_path, [{"prompt": "a"}, {"prompt": "b", "custom_id": "line-1"}])
    with pytest.raises(UsageError, match="duplicate custom_id \"line-1\""):
        scan_prompts(path, NO_DEFAULTS)


def test_duplicates_are_an_error_even_with_skip_invalid(tmp_path: Path) -> None:
    path = write(tmp_path, [{"prompt": "a", "custom_id": "x"}, {"prompt": 1, "custom_id": "x"}])
    with pytest.raises(UsageError, match="duplicate"):
        scan_prompts(path, NO_DEFAULTS, skip_invalid=True)


def test_skip_invalid_keeps_going(tmp_path: Path) -> None:
    path = write(tmp_path, [{"prompt": "a"}, "garbage", {"prompt": 3, "custom_id": "bad"}, {"prompt": "b"}])
    scan = scan_prompts(path, NO_DEFAULTS, skip_invalid=True)
    assert (scan.requests, scan.invalid) == (2, 2)
    assert scan.invalid_ids == {"line-2", "bad"}
    items = list(iter_prompts(path, NO_DEFAULTS))
    assert [type(i).__name__ for i in items] == ["Request", "InvalidLine", "InvalidLine", "Request"]
    bad = items[2]
    assert isinstance(bad, InvalidLine) and bad.custom_id == "bad" and "'prompt' must be a string" in bad.message


def test_only_invalid_lines_with_skip_invalid_is_not_empty(tmp_path: Path) -> None:
    path = write(tmp_path, ["garbage"])
    scan = scan_prompts(path, NO_DEFAULTS, skip_invalid=True)
    assert (scan.requests, scan.invalid) == (0, 1)


def test_scan_copies_what_it_read_into_a_private_spool(tmp_path: Path) -> None:
    data = b'{"prompt": "from stdin"}\n\n{"prompt": "second"}'
    spool = Spool.create(tmp_path)
    try:
        assert os.fstat(spool.fd).st_mode & 0o777 == 0o600
        assert list(tmp_path.iterdir()) == []  # anonymous: nothing to clean up after a crash
        with spool.writer() as copy:
            scan = scan_prompts(io.BytesIO(data), NO_DEFAULTS, display="<stdin>", copy_to=copy)
        assert scan.requests == 2 and scan.lines == {"line-1": 1, "line-3": 3}
        with spool.reader() as fh:
            assert fh.read() == data  # byte for byte, blank line included: line numbers stay the same
        with spool.reader() as fh:
            assert [r.custom_id for r in iter_prompts(fh, NO_DEFAULTS)] == ["line-1", "line-3"]
    finally:
        spool.close()


def test_large_file_is_streamed(tmp_path: Path) -> None:
    path = tmp_path / "big.jsonl"
    with open(path, "w") as fh:
        for i in range(20_000):
            fh.write(json.dumps({"prompt": f"p{i}"}) + "\n")
    scan = scan_prompts(path, NO_DEFAULTS)
    assert scan.requests == 20_000
    it = iter_prompts(path, NO_DEFAULTS)
    assert next(it).custom_id == "line-1"  # a generator: nothing beyond the first line is parsed yet


def test_fingerprint_is_what_is_asked(tmp_path: Path) -> None:
    path = write(tmp_path, [{"custom_id": "a", "prompt": "p", "max_tokens": 3, "temperature": 0.5},
                            {"custom_id": "b", "temperature": 0.5, "max_tokens": 3, "prompt": "p"},
                            {"custom_id": "c", "url": COMPLETIONS, "body": {"prompt": "p", "max_tokens": 3,
                                                                          "temperature": 0.5}},
                            {"custom_id": "d", "prompt": "p", "max_tokens": 4, "temperature": 0.5}])
    fp = {r.custom_id: r.fingerprint for r in requests(path)}
    assert fp["a"] == fp["b"] == fp["c"]  # key order and line format do not matter, the request does
    assert fp["d"] != fp["a"] and len(fp["a"]) == 16
    assert fp["a"] == fingerprint(COMPLETIONS, {"prompt": "p", "max_tokens": 3, "temperature": 0.5})
    assert scan_prompts(path, NO_DEFAULTS).fingerprints == fp
    # flag defaults are part of the request
    with_default = {r.custom_id: r.fingerprint for r in requests(write(tmp_path, [{"prompt": "p"}], "q.jsonl"),
                                                                 RequestDefaults(max_tokens=9))}
    assert with_default["line-1"] == fingerprint(COMPLETIONS, {"prompt": "p", "max_tokens": 9})


@pytest.mark.parametrize(("line", "problem"), [
    ('{"prompt": "a \\ud800"}', 'prompt holds the JSON escape "\\ud800"'),
    ('{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udfff"}]}]}',
     'messages[0].content[0].text holds the JSON escape "\\udfff"'),
    ('{"custom_id": "q", "url": "/v1/completions", "body": {"prompt": "x", "stop": ["\\udc80"]}}',
     'body.stop[0] holds the JSON escape "\\udc80"'),
    ('{"custom_id": "\\ud83dz", "prompt": "x"}', 'custom_id holds the JSON escape "\\ud83d"'),
])
def test_lone_surrogates_fail_validation(tmp_path: Path, line: str, problem: str) -> None:
    path = write(tmp_path, ['{"prompt": "fine \\ud83d\\ude00"}', line])
    with pytest.raises(UsageError) as exc:
        scan_prompts(path, NO_DEFAULTS)
    assert exc.value.message == (f"{path}:2: {problem}, half of a UTF-16 surrogate pair without its other half: "
                                 "not valid Unicode, and it cannot be sent")
    assert "write the character itself" in (exc.value.fix or "") and "--skip-invalid" in (exc.value.fix or "")
    scan = scan_prompts(path, NO_DEFAULTS, skip_invalid=True)
    assert (scan.requests, scan.invalid) == (1, 1)
    bad = list(iter_prompts(path, NO_DEFAULTS))[1]
    assert isinstance(bad, InvalidLine) and bad.custom_id == ("q" if '"q"' in line else "line-2")
