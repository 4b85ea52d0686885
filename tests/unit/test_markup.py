"""Nothing the user or a model wrote is read as console markup, emoji codes or highlighting: an answer holding
``[/INST]`` or ``d[key]``, a ``--system`` text, a setting's value, a replica's reason are printed as they are."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import typing as tp
from pathlib import Path

import pytest
from rich.console import Console

from devtools.stubserver import StubServer
from speedslurm.batch.summary import Summary
from speedslurm.cli import main
from speedslurm.cli.common import console, err_console, out_console

HOSTILE = "[INST] hi [/INST] d[key] = 1 :smile: [bold]b[/bold] [red]r[/] [link=x]l[/link] \\[esc]"


def _result(custom_id: str, content: str) -> str:
    return json.dumps({"id": "batch_req_1", "custom_id": custom_id, "error": None, "response": {
        "status_code": 200, "request_id": "r", "body": {"choices": [{"message": {"role": "assistant",
                                                                                 "content": content}}]}}}) + "\n"


def test_show_prints_an_answer_with_markup_as_it_is(tmp_path: Path) -> None:
    out = tmp_path / "r[1].jsonl"
    out.write_text(_result("id[/b]", HOSTILE) + _result("plain", "[/INST]"))
    res = subprocess.run([sys.executable, "-m", "speedslurm", "show", str(out)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == [f"id[/b]: {HOSTILE}", "plain: [/INST]", f"2 of 2 result(s) in {out}"]


def test_a_batch_with_markup_in_system_prompt_and_answers_prints_them_as_they_are(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "p.jsonl"
    p.write_text(json.dumps({"custom_id": "c[/x]", "messages": [{"role": "user", "content": "[/INST] :smile:"}]})
                 + "\n")
    with StubServer(slots=1) as stub:
        try:
            main(["run", "--base-url", stub.url, "--prompts", str(p), "--system", "[bold]sys[/bold]"])
        except SystemExit as exc:
            assert not exc.code
    capsys.readouterr()
    try:
        main(["show", str(tmp_path / "p.results.jsonl")])
    except SystemExit as exc:
        assert not exc.code
    out = capsys.readouterr().out
    # the stub echoes the messages: the system text, then the user's
    assert out.splitlines()[0] == "c[/x]: echo: [bold]sys[/bold] [/INST] :smile:"


def test_config_show_prints_a_value_with_markup_as_it_is(capsys: pytest.CaptureFixture[str]) -> None:
    try:
        main(["--profile", "testbed", "--set", "cluster.partition=[/INST] :smile:", "config", "show"])
    except SystemExit as exc:
        assert not exc.code
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("cluster.partition "))
    assert "'[/INST] :smile:'" in line and "--set cluster.partition" in line


@pytest.mark.parametrize("make", [lambda: console(width=300), out_console, err_console],
                         ids=["console", "out_console", "err_console"])
def test_the_cli_consoles_interpret_nothing(make: tp.Callable[[], Console]) -> None:
    con = make()
    con.file = buf = io.StringIO()
    con.print(HOSTILE)
    assert buf.getvalue() == HOSTILE + "\n"


def test_the_summary_prints_a_reason_as_it_is_on_any_console() -> None:
    s = Summary("r[/x].jsonl", total=1, failed=1, failed_replicas={0: "node said [/INST] d[key] :smile:"},
                errors={"[bold]500": 1})
    con = Console(file=io.StringIO(), width=200)  # markup on: a console an API caller made
    s.render(con)
    text = tp.cast(io.StringIO, con.file).getvalue()
    assert "failed: node said [/INST] d[key] :smile:" in text
    assert "[bold]500: 1" in text and "r[/x].jsonl" in text
