"""Batch commands: ``run`` sends a prompts file through a running deployment or any OpenAI-compatible server."""

from __future__ import annotations

import json
import os
import stat
import typing as tp
from pathlib import Path

import click

if tp.TYPE_CHECKING:
    from rich.console import Console

from .. import api
from ..errors import RequestsFailed, UsageError
from . import cli
from .common import console, resume_command, settings_from, styled

if tp.TYPE_CHECKING:
    from ..api import BatchOptions, EndpointSource, Summary


# The exit statuses of `run` and `submit` (the contract itself is in errors.py), shown under their --help.
BATCH_EXIT_STATUSES = """\b
Exit status:
  0    every request has a successful line
  3    the batch finished, but some requests failed (error lines in the results
       file; the same command again retries them)
  1    a failure: the deployment failed, or the batch could not go on
  2    bad input or settings; nothing was sent
  130  interrupted (Ctrl-C)"""


def batch_options(fn: tp.Callable[..., tp.Any]) -> tp.Callable[..., tp.Any]:
    """The flags shared by ``run`` and ``submit``."""
    opts = [
        click.option("--prompts", "prompts", required=True, metavar="P.jsonl",
                     help="Prompts, one JSON object per line (OpenAI Batch requests, {\"messages\"} or {\"prompt\"}); "
                          "- reads stdin."),
        click.option("--out", "out", default=None, metavar="R.jsonl",
                     help="Results file (OpenAI Batch output lines); default <prompts>.results.jsonl next to it."),
        click.option("--max-tokens", type=click.IntRange(min=1), default=None,
                     help="max_tokens for lines that do not set it."),
        click.option("--temperature", type=click.FloatRange(min=0), default=None,
                     help="temperature for lines that do not set it."),
        click.option("--system", default=None, help="System message prepended to chats that have none."),
        click.option("--concurrency", type=click.IntRange(min=1), default=None,
                     help="Requests in flight in total [default: the ready replicas' slots, summed]."),
        click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=600.0, show_default=True,
                     help="Seconds per request."),
        click.option("--retries", type=click.IntRange(min=0), default=5, show_default=True,
                     help="Retries per request for transient errors (connection, timeout, 429, 5xx)."),
        click.option("--skip-invalid", is_flag=True, help="Write an error line for each invalid prompt line and go on."),
        click.option("--retry-suspected", is_flag=True,
                     help="Send again the requests an earlier run suspected of crashing their server (in flight on "
                          "2 replicas that died); without it they are skipped."),
        click.option("--client", type=click.Choice(["raw", "openai"]), default="raw", show_default=True,
                     help="HTTP client: lean keep-alive HTTP/1.1, or the openai package's AsyncOpenAI."),
        click.option("--no-lock", is_flag=True,
                     help="Take no lock on the results file (file systems where it cannot be locked); you make sure "
                          "that only one run at a time writes it."),
        click.option("--quiet", "-q", is_flag=True, help="No progress bar or replica messages."),
        click.option("--json", "json_mode", is_flag=True, help="Print the summary as JSON on stdout (nothing else)."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def options_from(kw: dict[str, tp.Any], outage: float | None = None) -> BatchOptions:
    """The batch's options from the shared flags; ``outage``: run.outage_s (else BatchOptions' default)."""
    extra: dict[str, tp.Any] = {} if outage is None else {"outage": outage}
    return api.batch_options(max_tokens=kw["max_tokens"], temperature=kw["temperature"], system=kw["system"],
                        concurrency=kw["concurrency"], timeout=kw["timeout"], retries=kw["retries"],
                        skip_invalid=kw["skip_invalid"], quiet=kw["quiet"] or kw["json_mode"], client=kw["client"],
                        lock=not kw.get("no_lock", False), retry_suspected=kw.get("retry_suspected", False),
                        **extra)


@cli.command("run", epilog=BATCH_EXIT_STATUSES)
@click.option("--deployment", "deployment_id", default=None, metavar="ID",
              help="A running deployment: its id (see status) or its Slurm job id.")
@click.option("--endpoint-file", "endpoint_files", type=click.Path(dir_okay=False, path_type=Path), multiple=True,
              help="An endpoint.json written by a deployment's leader (repeat for several replicas).")
@click.option("--base-url", default=None, metavar="URL", help="Any OpenAI-compatible server, e.g. http://host:8080.")
@click.option("--api-key", envvar="SPEEDSLURM_API_KEY", default=None,
              help="API key for --base-url (a deployment's key comes from its endpoint file). On a command line "
                   "every user of the machine can read it: prefer SPEEDSLURM_API_KEY or --api-key-file.")
@click.option("--api-key-file", type=click.Path(path_type=Path), default=None, metavar="PATH",
              help="Read the API key for --base-url from this file (mode 0600; the key alone, a final newline is "
                   "ignored).")
@click.option("--handover", is_flag=True,
              help="With --deployment: run.handover_before_s before its time limit, start a successor deployment "
                   "and move the batch onto it (the old one drains and is cancelled; the successor keeps running).")
@batch_options
@click.pass_context
def run_cmd(ctx: click.Context, deployment_id: str | None, endpoint_files: tuple[Path, ...], base_url: str | None,
            api_key: str | None, api_key_file: Path | None, handover: bool, **kw: tp.Any) -> None:
    """Send a prompts file through a deployment or server; append one result line per prompt.

    \b
    Running the same command again resumes: prompts with a successful line are skipped, failed ones retried.
    Ctrl-C stops sending, lets in-flight requests finish briefly, and exits 130.
    """
    given = [name for name, v in (("--deployment", deployment_id), ("--endpoint-file", endpoint_files),
                                  ("--base-url", base_url)) if v]
    if len(given) != 1:
        raise UsageError("say where to send the prompts: exactly one of --deployment, --endpoint-file, --base-url"
                         + (f" (got {', '.join(given)})" if given else ""),
                         fix="e.g. speedslurm run --deployment ID --prompts P.jsonl")
    if handover and not deployment_id:
        raise UsageError("--handover needs --deployment: only a deployment can be handed over to a successor",
                         fix="e.g. speedslurm run --deployment ID --handover --prompts P.jsonl")
    api_key = _api_key(ctx, api_key, api_key_file, base_url)
    options = options_from(kw, settings_from(ctx).run.outage_s)
    prepared = api.prepare_prompts(kw["prompts"], kw["out"], options)
    try:
        if base_url:
            source: EndpointSource = api.base_url_source(base_url, api_key, timeout=min(30.0, options.timeout))
        elif endpoint_files:
            source = api.endpoint_file_source(endpoint_files)
        elif handover:
            chain = _handover_source(ctx, tp.cast(str, deployment_id))
            try:
                execute(chain or deployment_source(ctx, tp.cast(str, deployment_id)), prepared, options,
                        kw["json_mode"])
            finally:
                if chain is not None and len(chain.generations) > 1:
                    _console().print(f"Deployment {chain.deployment.id} (the successor) keeps running; stop it with: "
                                  f"speedslurm down {chain.deployment.id}", markup=False)
            return
        else:
            source = deployment_source(ctx, tp.cast(str, deployment_id))
        execute(source, prepared, options, kw["json_mode"])
    finally:
        prepared.close()


def _api_key(ctx: click.Context, api_key: str | None, api_key_file: Path | None, base_url: str | None) -> str | None:
    """The key for --base-url: from --api-key-file, else --api-key or SPEEDSLURM_API_KEY. A key typed on the command
    line is used, with a warning: any user of a shared login node sees it in the process list."""
    on_command_line = ctx.get_parameter_source("api_key") == click.core.ParameterSource.COMMANDLINE
    if api_key_file is None:
        if on_command_line and api_key:
            _console().print("Warning: --api-key puts the key on the command line, where every user of this machine "
                             "can read it (ps, /proc/PID/cmdline); put it in SPEEDSLURM_API_KEY, or in a file of mode "
                             "0600 given with --api-key-file, instead", style="yellow", highlight=False,
                             soft_wrap=True, markup=False)
        return api_key
    if on_command_line:
        raise UsageError("--api-key and --api-key-file both give the key", fix="give only --api-key-file")
    if not base_url:
        raise UsageError("--api-key-file is the key of a --base-url server (a deployment's key comes from its "
                         "endpoint file)", fix="drop --api-key-file, or use it with --base-url URL")
    try:
        fd = os.open(api_key_file, os.O_RDONLY)
        try:
            mode = os.fstat(fd).st_mode
            raw = os.read(fd, 64 * 1024 + 1) if stat.S_ISREG(mode) or stat.S_ISFIFO(mode) else None
        finally:
            os.close(fd)
    except OSError as exc:
        raise UsageError(f"--api-key-file {api_key_file}: cannot read it ({exc.strerror})",
                         fix="check the path, and that the file is readable by you") from None
    if raw is None:  # a pipe is fine: --api-key-file <(pass show my-key)
        raise UsageError(f"--api-key-file {api_key_file} is not a file", fix="give the path of a file that holds the key")
    try:
        key = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        key = None
    if key is None or len(raw) > 64 * 1024 or "\n" in key or not key.isprintable():
        raise UsageError(f"--api-key-file {api_key_file} does not hold one key (one line of text)",
                         fix="put the key alone in the file, e.g. printf %s \"$KEY\" > FILE")
    if not key:
        raise UsageError(f"--api-key-file {api_key_file} is empty", fix="put the key in the file")
    if stat.S_ISREG(mode) and mode & 0o077:
        _console().print(f"Warning: --api-key-file {api_key_file} is not private (mode {stat.S_IMODE(mode):04o}): "
                         f"other users may read the key; make it yours alone: chmod 600 {api_key_file}",
                         style="yellow", highlight=False, soft_wrap=True, markup=False)
    return key


def execute(source: EndpointSource, prepared: tp.Any, options: BatchOptions, json_mode: bool) -> Summary:
    """Run a prepared batch, print the summary (table on stderr, or JSON on stdout), map failures to exit codes.

    Ctrl-C ends in ``SystemExit(130)`` after the summary and the resume command are printed (a caller's
    ``finally`` still runs); :class:`BatchFailed` propagates (exit 1) after the summary is printed, and so
    does :class:`RequestsFailed` (exit 3) when the batch ended with error lines.
    """
    err = console(stderr=True)
    for notice in prepared.results.previous.notices:
        err.print(styled(("Notice:", "yellow"), f" {notice}"))
    try:
        summary = api.run_prepared(source, prepared, options, err)
    except api.BatchInterrupted as exc:
        _print_summary(exc.summary, err, json_mode)
        again = resume_command()
        err.print(styled(("Interrupted:", "yellow"), f" {exc.message}\nTo resume, run the same command again: "
                         f"{again}" + (" (with the same prompts on stdin)" if prepared.spooled else "")),
                  soft_wrap=True)
        raise SystemExit(130) from None
    except api.BatchFailed as exc:
        _print_summary(exc.summary, err, json_mode)
        raise
    _print_summary(summary, err, json_mode)
    if summary.failed:
        # Exit 3, not 0: a script must be able to tell a batch with error lines from a complete one.
        raise RequestsFailed(f"the batch finished, but {summary.failed} of {summary.ok + summary.failed} "
                             f"request(s) failed (error lines in {summary.results_path})",
                             fix="run the same command again to retry them"
                             + (" (add --retry-suspected to send those suspected of crashing their server too)"
                                if summary.suspected else ""))
    if summary.suspected_skipped:
        n = summary.suspected_skipped
        raise RequestsFailed(f"the batch finished, but {n} request(s) suspected of crashing their server in an "
                             f"earlier run were not sent: {summary.suspected_line()}",
                             fix="once the server is fixed (or to try them anyway), run the same command again with "
                                 "--retry-suspected")
    return summary


def _print_summary(summary: tp.Any, err: Console, json_mode: bool) -> None:
    if json_mode:
        click.echo(json.dumps(summary.to_json(), indent=1))
    else:
        summary.render(err)


def _console() -> tp.Any:
    return console(stderr=True)


def _handover_source(ctx: click.Context, deployment_id: str) -> tp.Any:
    """The deployment's replicas, and its successors' before its time limit (None: run.handover_before_s is 0)."""
    err = _console()
    return api.handover_source(api.connect(deployment_id, settings_from(ctx)),
                           say=lambda text: err.print(text, markup=False))


def deployment_source(ctx: click.Context, deployment_id: str) -> EndpointSource:
    """The replicas of a running deployment: its run directory, plus Slurm's view of its jobs."""
    return api.deployment_source(api.connect(deployment_id, settings_from(ctx)))


