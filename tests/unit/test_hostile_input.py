"""Hostile input: every prompts line, setting and flag gets a clear error (exit 2, before anything is queued or
sent) or is valid; none ends in a traceback.

The property tests (hypothesis) throw generated lines and settings at the parsers. They are bounded (a fixed
number of examples, no deadline) and derandomized: the same examples on every run, so CI is stable.
"""

from __future__ import annotations

import json
import math
import typing as tp
from pathlib import Path

import click
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from inprocess import speedslurm

from devtools.stubserver import StubServer
from speedslurm.batch.inputs import scan_prompts
from speedslurm.batch.promptline import MAX_DEPTH, LineError, Request, RequestDefaults, parse_line
from speedslurm.cli import cli
from speedslurm.errors import ConfigError, UsageError
from speedslurm.settings.layers import _ENV_RESERVED
from speedslurm.settings.settings import describe, load_settings

BOUNDED = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

DEEP = "[" * 100_000 + "]" * 100_000
# (name, line, words of the problem, words of the fix)
HOSTILE_LINES = [
    ("deep-100000", '{"prompt": "x", "a": ' + DEEP + "}", (f"nested too deep (max {MAX_DEPTH} levels",),
     ("flatten the line",)),
    ("deep-just-over", '{"prompt": "x", "a": ' + "[" * MAX_DEPTH + "]" * MAX_DEPTH + "}",
     (f"nested too deep (max {MAX_DEPTH} levels",), ("flatten",)),
    ("nan", '{"prompt": "x", "temperature": NaN}', ("NaN, which is not JSON",), ("finite number", "null")),
    ("infinity", '{"prompt": "x", "top_p": Infinity}', ("Infinity, which is not JSON",), ("finite number",)),
    ("minus-infinity", '{"prompt": "x", "logit_bias": {"1": -Infinity}}', ("-Infinity, which is not JSON",),
     ("finite number",)),
    ("1e999", '{"prompt": "x", "temperature": 1e999}', ("1e999 is too large for a double",),
     ("between -1.7e308 and 1.7e308",)),
    ("-1e999-in-messages", '{"messages": [{"role": "user", "content": "hi", "w": -1e999}]}',
     ("-1e999 is too large",), ("1.7e308",)),
    ("5000-digits", '{"prompt": "x", "seed": ' + "9" * 5000 + "}", ("more than", "digits"), ("quote a long one",)),
    ("seed-beyond-int64", '{"prompt": "x", "seed": 18446744073709551616}', ("'seed' is out of range",),
     ("between -9223372036854775808 and 9223372036854775807",)),
]


@pytest.fixture
def stub() -> tp.Iterator[StubServer]:
    with StubServer(slots=2) as s:
        yield s


# -- prompts lines through the real CLI ------------------------------------------------------------------


@pytest.mark.parametrize(("line", "problem", "fix"), [c[1:] for c in HOSTILE_LINES], ids=[c[0] for c in HOSTILE_LINES])
def test_a_hostile_line_exits_2_naming_file_line_and_fix_before_sending(
        tmp_path: Path, stub: StubServer, capsys: pytest.CaptureFixture[str], line: str, problem: tuple[str, ...],
        fix: tuple[str, ...]) -> None:
    p = tmp_path / "p.jsonl"
    p.write_text('{"prompt": "fine"}\n' + line + "\n")
    code, out, err = speedslurm(["run", "--base-url", stub.url, "--prompts", str(p)], capsys)
    assert code == 2, err
    assert err.startswith(f"Error: {p}:2: "), err[:300]
    message, _, fix_line = err.partition("\nFix: ")
    assert all(w in message for w in problem), message[:300]
    assert all(w in fix_line for w in fix), fix_line
    assert "Traceback" not in err and len(err) < 1000  # the line itself is never echoed whole
    assert stub.stats.received == 0 and not (tmp_path / "p.results.jsonl").exists()


def test_skip_invalid_skips_every_hostile_line_and_sends_the_rest(tmp_path: Path, stub: StubServer,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "p.jsonl"
    hostile = [c[1] for c in HOSTILE_LINES]
    p.write_text("".join(line + "\n" for line in ['{"custom_id": "good", "prompt": "fine"}', *hostile]))
    code, out, err = speedslurm(["run", "--base-url", stub.url, "--prompts", str(p),
                                 "--skip-invalid", "--json"], capsys)
    assert code == 0, err
    counts = json.loads(out)["requests"]
    assert counts["invalid"] == len(hostile) and counts["ok"] == 1
    results = [json.loads(x) for x in (tmp_path / "p.results.jsonl").read_text().splitlines()]
    errors = {r["custom_id"]: r["error"] for r in results if r["error"]}
    assert sorted(errors) == sorted(f"line-{n}" for n in range(2, len(hostile) + 2))
    for n, (_name, _line, problem, _fix) in enumerate(HOSTILE_LINES, 2):
        assert errors[f"line-{n}"]["code"] == "invalid_input"
        assert errors[f"line-{n}"]["message"].startswith(f"{p}:{n}: ")
        assert all(w in errors[f"line-{n}"]["message"] for w in problem)
    assert stub.stats.completions == 1


def test_submit_refuses_a_hostile_line_before_queuing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "p.jsonl"
    p.write_text('{"prompt": "x", "temperature": NaN}\n')
    code, _, err = speedslurm(["--profile", "local", "submit", "--model", str(tmp_path / "none.gguf"), "--prompts",
                               str(p), "--out", str(tmp_path / "r.jsonl")], capsys)
    assert code == 2 and err.startswith(f"Error: {p}:1: the line holds NaN"), err


HOSTILE_RESULTS = [
    '{"custom_id": "deep", "x": ' + DEEP + "}",
    '{"custom_id": ["a", "list"], "response": {"status_code": 200}}',
    '{"custom_id": "text-error", "error": "oops"}',
    '{"custom_id": "text-response", "response": "200"}',
    '{"custom_id": "text-choices", "response": {"status_code": 200, "body": {"choices": "zz"}}}',
    "[1, 2]",
]


def test_show_and_resume_read_a_results_file_of_hostile_lines(tmp_path: Path, stub: StubServer,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "r.jsonl"
    out.write_text("".join(x + "\n" for x in HOSTILE_RESULTS))
    code, shown, err = speedslurm(["show", str(out)], capsys)
    assert code == 0, err
    assert shown.splitlines() == ["text-error: [error] oops", "text-response: ", "text-choices: ",
                                  f"3 of 3 result(s) in {out}"]
    p = tmp_path / "p.jsonl"
    p.write_text('{"custom_id": "text-error", "prompt": "again"}\n')
    code, _, err = speedslurm(["run", "--base-url", stub.url, "--prompts", str(p), "--out", str(out)], capsys)
    assert code == 0, err
    said = " ".join(err.split())  # the notices fold at the terminal's width
    assert f"{out}:1: not a results line; ignored" in said and f"{out}:2: not a results line; ignored" in said
    assert stub.stats.completions == 1


# -- flags -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flag", ["--temperature", "--timeout"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e999"])
def test_a_float_flag_refuses_nan_and_infinity(tmp_path: Path, stub: StubServer, capsys: pytest.CaptureFixture[str],
                                               flag: str, value: str) -> None:
    p = tmp_path / "p.jsonl"
    p.write_text('{"prompt": "fine"}\n')
    code, _, err = speedslurm(["run", "--base-url", stub.url, "--prompts", str(p), flag, value],
                              capsys)
    assert code == 2 and f"Invalid value for '{flag}': '{value}' is not a finite number" in err, err
    assert stub.stats.received == 0


def _commands(group: click.Group, ctx: click.Context) -> tp.Iterator[click.Command]:
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)
        assert cmd is not None
        yield cmd
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, ctx)


def test_every_float_flag_of_every_command_refuses_nan_and_infinity() -> None:
    ctx = click.Context(cli)
    checked = 0
    for cmd in _commands(cli, ctx):
        for param in cmd.params:
            if isinstance(param.type, (click.types.FloatParamType, click.FloatRange)):
                checked += 1
                for bad in ("nan", "inf", "-inf", "1e999"):
                    with pytest.raises(click.BadParameter, match="not a finite number"):
                        param.type.convert(bad, param, ctx)
    assert checked >= 8  # run/submit --temperature and --timeout, up --timeout, top --interval, ...


# -- settings --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("override", "origin", "message"), [
    ("llama.server_port=70000", "--set llama.server_port",
     "llama.server_port must be an integer from 0 to 65535 (0: pick a free port), not 70000"),
    ("llama.rpc_port=-1", "--set llama.rpc_port", "llama.rpc_port must be an integer from 0 to 65535"),
    ("llama.parallel=0", "--set llama.parallel", "llama.parallel must be an integer of at least 1, not 0"),
    ("llama.threads=-4", "--set llama.threads", "llama.threads must be an integer of at least 1, not -4"),
    ("run.poll_interval_s=.nan", "--set run.poll_interval_s", "run.poll_interval_s must be a finite number, not nan"),
    ("run.health_timeout_s=.inf", "--set run.health_timeout_s", "must be a finite number, not inf"),
    ("run.follower_timeout_s=0", "--set run.follower_timeout_s", "must be a number greater than 0, not 0.0"),
    ("cluster.usable_gib=-1", "--set cluster.usable_gib", "cluster.usable_gib must be a number greater than 0"),
    ("llama.threads=" + "9" * 5000, "--set llama.threads", "llama.threads must be int | None, not '99999"),
    ("llama." + "a." * 5000 + "b=1", "--set llama.a.a", "no setting is nested 5002 levels deep"),
    ("llama.extra_server_args=" + "[" * 900 + "]" * 900, "--set llama.extra_server_args", "nested too deep"),
])
def test_a_setting_out_of_range_names_its_origin_and_the_valid_range(override: str, origin: str,
                                                                     message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(profile="testbed", environ={}, overrides=[override])
    assert err.value.message.startswith(f"{origin}"), err.value.message[:200]
    assert message in err.value.message and err.value.exit_code == 2
    assert err.value.fix and len(err.value.render()) < 6000


def test_a_range_error_names_the_file_or_variable_it_came_from(tmp_path: Path) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text("models:\n  mine:\n    files: [a.gguf]\n    ctx: 0\n")
    with pytest.raises(ConfigError, match=rf"^{cfg}: models.mine.ctx must be an integer of at least 1, not 0$"):
        load_settings(profile="testbed", config_path=cfg, environ={})
    with pytest.raises(ConfigError, match=r"^env SPEEDSLURM_LLAMA__SERVER_PORT: llama.server_port must be an "
                                          r"integer from 0 to 65535"):
        load_settings(profile="testbed", environ={"SPEEDSLURM_LLAMA__SERVER_PORT": "65536"})


@pytest.mark.parametrize("command", ["plan", "up"])
def test_plan_and_up_refuse_an_out_of_range_port(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                 command: str) -> None:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    code, out, err = speedslurm(["--profile", "local", "--set", "llama.server_port=70000", command, "--model",
                                 str(model), "--executor", "local"], capsys)
    assert code == 2, err
    assert err == ("Error: --set llama.server_port: llama.server_port must be an integer from 0 to 65535 (0: pick a "
                   "free port), not 70000\nFix: set llama.server_port to an integer from 0 to 65535 (0: pick a free "
                   "port)\n")


# -- property tests --------------------------------------------------------------------------------------

_FIELDS = ["prompt", "messages", "role", "content", "custom_id", "max_tokens", "max_completion_tokens",
           "temperature", "top_p", "seed", "n", "stop", "stream", "model", "body", "url", "method", "x"]
_ATOMS = st.sampled_from([
    "NaN", "Infinity", "-Infinity", "1e999", "-1e999", "1e308", "-0", "0", "1", "-1", "1.5", "2e-400", "null",
    "true", "false", '"user"', '"assistant"', '"POST"', '"/v1/chat/completions"', '"/v1/completions"', '""',
    '"\\ud800"', '"\\udfff\\ud800"', '"[/INST]"', "9" * 5000, str(2**63), str(-(2**63) - 1), "1" * 400,
])


def _json_text(children: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.one_of(
        st.lists(children, max_size=4).map(lambda xs: "[" + ",".join(xs) + "]"),
        st.lists(st.tuples(st.sampled_from(_FIELDS) | st.text(max_size=5), children), max_size=5).map(
            lambda kvs: "{" + ",".join(f"{json.dumps(k)}:{v}" for k, v in kvs) + "}"),
    )


_VALUES = st.recursive(_ATOMS | st.text(max_size=8).map(json.dumps) | st.integers().map(str)
                       | st.floats(allow_nan=False, allow_infinity=False).map(repr), _json_text, max_leaves=12)


@st.composite
def hostile_lines(draw: st.DrawFn) -> str:
    """A line that is nearly a valid request (prompt or chat, Batch or not), with hostile parts mixed in."""
    kind = draw(st.sampled_from(["prompt", "messages", "batch", "any", "text", "deep"]))
    extra = draw(st.lists(st.tuples(st.sampled_from(_FIELDS), _VALUES), max_size=3))
    fields = "".join(f",{json.dumps(k)}:{v}" for k, v in extra)
    if kind == "prompt":
        line = '{"prompt":' + draw(_VALUES) + fields + "}"
    elif kind == "messages":
        line = '{"messages":[{"role":"user","content":' + draw(_VALUES) + "}]" + fields + "}"
    elif kind == "batch":
        line = ('{"custom_id":"c","method":"POST","url":"/v1/completions","body":{"prompt":' + draw(_VALUES)
                + fields + "}}")
    elif kind == "any":
        line = draw(_VALUES)
    elif kind == "text":
        line = draw(st.text(max_size=60))
    else:
        depth = draw(st.integers(MAX_DEPTH - 3, 3000))
        line = '{"prompt":"x","a":' + "[" * depth + draw(_VALUES) + "]" * depth + "}"
    if draw(st.booleans()) and line:  # cut it somewhere
        line = line[: draw(st.integers(0, len(line)))]
    return line


def _check_request(req: Request) -> None:
    # What is sent is standard JSON a server reads: no NaN or Infinity, UTF-8 encodable.
    json.dumps(req.body, allow_nan=False, ensure_ascii=False).encode("utf-8")
    assert req.url in ("/v1/chat/completions", "/v1/completions") and req.custom_id


@BOUNDED
@given(hostile_lines())
def test_property_a_line_is_a_request_or_a_line_error(line: str) -> None:
    try:
        req = parse_line(line, 7, RequestDefaults(max_tokens=8, temperature=0.5, system="be brief"))
    except LineError as exc:
        assert exc.problem and exc.fix and len(exc.problem) < 500
        return
    _check_request(req)


@BOUNDED
@given(st.lists(hostile_lines() | st.just("") | st.just('{"prompt":"ok"}'), min_size=1, max_size=6),
       st.booleans())
def test_property_a_prompts_file_is_scanned_or_refused_with_file_and_line(lines: list[str], skip: bool) -> None:
    import io

    data = "".join(x.replace("\n", " ") + "\n" for x in lines).encode("utf-8", "surrogatepass")
    try:
        scan = scan_prompts(io.BytesIO(data), RequestDefaults(), skip_invalid=skip, display="p.jsonl")
    except UsageError as exc:
        assert exc.exit_code == 2 and exc.fix
        assert exc.message.startswith("p.jsonl:") or exc.message == (
            "p.jsonl has no prompts (the file is empty or only blank lines)"), exc.message[:200]
        assert skip is False or "duplicate custom_id" in exc.message or "no prompts" in exc.message
        return
    assert scan.requests + scan.invalid == sum(1 for x in lines if x.strip())
    assert skip or scan.invalid == 0


def _setting_keys() -> list[str]:
    return sorted(k for k, _v, _o in describe(load_settings(profile="testbed", environ={})) if k != "profile")


_SETTING_VALUES = st.sampled_from([
    "70000", "65536", "-1", "0", "1", "-0.0", ".nan", ".NaN", ".inf", "-.inf", "1e999", "1e308", "9" * 5000,
    "0x10", "0o7", "1_000", "true", "null", "~", "", "[1", "{a: ", "[[[[", "[" * 200 + "]" * 200, "&a [*a]",
    "!!python/object/apply:os.system [echo]", "!!binary aGk=", "2020-01-01", "[/INST]", ":smile:", "a: b",
    "{x: 1}", "[1, 2]", "'quoted'", "auto", "\udcff", "a\udcffb", "[a, \udcff]", "\x00",
]) | st.text(max_size=20) | st.integers().map(str) | st.floats().map(repr)


@BOUNDED
@given(st.sampled_from(_setting_keys()) | st.text(max_size=30).filter(lambda k: "=" not in k),
       _SETTING_VALUES, st.sampled_from(["set", "env"]))
def test_property_a_setting_is_valid_or_a_config_error_naming_its_origin(key: str, value: str, how: str) -> None:
    if how == "set":
        kw: dict[str, tp.Any] = {"overrides": [f"{key}={value}"], "environ": {}}
        origin = f"--set {key.strip()}"
    else:
        name = "SPEEDSLURM_" + key.upper().replace(".", "__")
        assume(name not in _ENV_RESERVED)  # variables with a meaning of their own (SPEEDSLURM_CONFIG, ...)
        kw = {"environ": {name: value}}
        origin = f"env {name}"
    try:
        s = load_settings(profile="testbed", **kw)
    except ConfigError as exc:
        assert exc.exit_code == 2 and exc.fix
        # the origin is named, except where the key picks no setting at all (a profile name, a reserved variable)
        assert exc.message.startswith(origin) or "profile" in exc.message, exc.message[:200]
        return
    for _key, v, _origin in describe(s):
        if isinstance(v, float):
            assert math.isfinite(v)
    assert 0 <= s.llama.server_port <= 65535 and 0 <= s.llama.rpc_port <= 65535


def test_a_base_url_server_whose_pages_are_nested_too_deep_gets_the_defaults() -> None:
    """``run --base-url``: a /props or /v1/models answer nested 100,000 levels deep is no traceback; the run
    takes the defaults (4 slots, no model name) as for a server that offers no such page."""
    from localhttp import Handler, serving

    from speedslurm.batch.sources import StaticSource

    deep = b"[" * 100_000 + b"]" * 100_000

    class Deep(Handler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            self.reply(200, deep)

    with serving(Deep) as url:
        source = StaticSource.probe(url, None, timeout=5)
    (ep,) = source.endpoints
    assert ep.parallel == 4 and ep.url == url
