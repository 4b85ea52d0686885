"""Before a batch sends anything: its options, the prompts validated once, the results file opened and locked.

:func:`prepare_batch` is where everything that can be wrong with the user's input fails (before a job is queued
or a request sent); it returns the :class:`PreparedBatch` that :func:`speedslurm.batch.runner.run_batch` runs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import stat
import sys
import typing as tp
from pathlib import Path

from ..errors import UsageError
from .inputs import RequestDefaults, ScanResult, Spool, scan_prompts
from .results import ResultsFile, check_out_path, default_out_path
from .transport import CLIENTS


@dataclasses.dataclass
class BatchOptions:
    """Everything that shapes one batch run (the ``run`` command's flags, plus tuning knobs)."""

    max_tokens: int | None = None
    temperature: float | None = None
    system: str | None = None
    concurrency: int | None = None  # total in-flight requests; default: sum of ready replicas' slots
    timeout: float = 600.0  # seconds per request
    retries: int = 5  # retries per request for transient errors
    skip_invalid: bool = False
    quiet: bool = False
    client: str = "raw"  # "raw" (lean HTTP/1.1; https servers use openai) or "openai" (AsyncOpenAI)
    poll_interval: float = 0.25  # seconds between looks at the endpoint source
    backoff_base: float = 0.5
    backoff_max: float = 15.0
    grace: float = 5.0  # seconds in-flight requests get after Ctrl-C
    down_after: int = 1  # consecutive connection errors after which a replica is unreachable (and probed)
    outage: float = 300.0  # seconds an unreachable replica is probed before it is given up (run.outage_s)
    probe_base: float = 0.5  # first wait between probes of an unreachable replica; doubles up to probe_max
    probe_max: float = 10.0
    retry_suspected: bool = False  # send the requests an earlier run suspected of crashing their server
    settle: float = 3.0  # seconds a locally seen failure waits for the source's own reason before stopping
    lock: bool = True  # lock the results file (--no-lock: the user makes sure of one writer)

    def defaults(self) -> RequestDefaults:
        return RequestDefaults(self.max_tokens, self.temperature, self.system)


@dataclasses.dataclass
class PreparedBatch:
    """A validated prompts file and an open, locked results file, ready to run.

    The prompts were read once, into ``spool``; the run reads that copy, never ``prompts`` again.
    """

    prompts: Path  # as given (``-`` for stdin)
    display: str  # how to name the prompts in messages ("<stdin>" for -)
    scan: ScanResult
    results: ResultsFile
    spooled: bool = False  # the prompts came from stdin: resuming needs the same prompts on stdin again
    spool: Spool | None = None  # the bytes validated; None: read ``prompts`` (callers that built one by hand)
    skip_suspected: bool = True  # requests an earlier run suspected of crashing their server are not sent

    @property
    def out(self) -> Path:
        return self.results.path

    @property
    def remaining(self) -> int:
        """Valid requests without a successful line yet, less those suspected of crashing their server unless
        they are retried (0: nothing to send, no deployment needed)."""
        done = self.results.previous.done
        valid_done = sum(1 for cid in done if cid in self.scan.ids and cid not in self.scan.invalid_ids)
        return self.scan.requests - valid_done - len(self.suspected)

    @property
    def suspected(self) -> list[str]:
        """The requests an earlier run suspected of crashing their server, which this run does not send."""
        if not self.skip_suspected:
            return []
        return [cid for cid in self.results.previous.suspected
                if cid in self.scan.ids and cid not in self.scan.invalid_ids]

    def reader(self) -> tp.BinaryIO:
        """The prompts as validated, from the first line."""
        return self.spool.reader() if self.spool is not None else open(self.prompts, "rb")

    def close(self) -> None:
        self.results.close()
        if self.spool is not None:
            self.spool.close()


def prepare_batch(prompts: str | Path, out: str | Path | None, options: BatchOptions,
                  stdin: tp.BinaryIO | None = None) -> PreparedBatch:
    """Read and validate the prompts (once) and open the results file; raise :class:`UsageError` if bad.

    The prompts are copied as they are read into a private spool next to the results (see
    :class:`~speedslurm.batch.inputs.Spool`), which the run then reads: ``prompts`` may be a file that changes
    later, ``"-"`` for stdin, a FIFO or a pipe such as ``<(command)`` (the last three need ``out``). A request
    that already has a successful line in ``out`` but asks something else now is an error naming it.
    """
    if options.client not in CLIENTS:
        raise UsageError(f"unknown client {options.client!r}", fix=f"use one of: {', '.join(CLIENTS)}")
    if options.concurrency is not None and options.concurrency < 1:
        raise UsageError(f"--concurrency must be at least 1, got {options.concurrency}", fix="e.g. --concurrency 16")
    if not (math.isfinite(options.timeout) and options.timeout > 0):
        raise UsageError(f"--timeout must be a positive number of seconds, got {options.timeout:g}",
                         fix="e.g. --timeout 600")
    if options.max_tokens is not None and (isinstance(options.max_tokens, bool) or
                                           not isinstance(options.max_tokens, int) or options.max_tokens < 1):
        raise UsageError(f"--max-tokens must be a whole number of at least 1, got {options.max_tokens!r}",
                         fix="e.g. --max-tokens 256")
    if options.temperature is not None and not (math.isfinite(options.temperature) and options.temperature >= 0):
        raise UsageError(f"--temperature must be a finite number >= 0, got {options.temperature:g}",
                         fix="e.g. --temperature 0.7")
    if options.retries < 0:
        raise UsageError(f"--retries must be >= 0, got {options.retries}", fix="e.g. --retries 5")
    if not (math.isfinite(options.outage) and options.outage > 0):
        raise UsageError(f"outage must be a positive number of seconds, got {options.outage:g}",
                         fix="e.g. outage=300 (run.outage_s)")
    _check_text_flag("--system", options.system)
    from_stdin = str(prompts) == "-"
    source: str | Path | tp.BinaryIO
    if from_stdin:
        if out is None:
            raise UsageError("reading prompts from stdin (-) needs --out",
                             fix="name the results file, e.g. --out results.jsonl (running the same command "
                                 "again then resumes it)")
        path, display, same_as = Path("-"), "<stdin>", None
        source = stdin if stdin is not None else sys.stdin.buffer
    else:
        path = Path(prompts)
        display = str(prompts)
        try:
            mode = os.stat(path).st_mode
        except FileNotFoundError:
            raise UsageError(f"prompts file {path} does not exist", fix="check the path given to --prompts") from None
        except OSError as exc:
            raise UsageError(f"cannot read prompts file {path}: {exc.strerror}",
                             fix="check the path given to --prompts and its permissions") from None
        if stat.S_ISDIR(mode):
            raise UsageError(f"prompts path {path} is a directory", fix="give --prompts a JSONL file")
        same_as = path if stat.S_ISREG(mode) else None
        if same_as is None and out is None:  # a FIFO, <(command): no file to put the results next to
            raise UsageError(f"reading prompts from a pipe ({path}) needs --out",
                             fix="name the results file, e.g. --out results.jsonl")
        source = path
    out_path = Path(out) if out is not None else default_out_path(path)
    check_out_path(out_path, same_as)
    spool = Spool.create(out_path.parent)
    try:
        with spool.writer() as copy:
            scan = scan_prompts(source, options.defaults(), options.skip_invalid, display, copy_to=copy)
        results = ResultsFile.open(out_path, same_as, lock=options.lock)
        try:
            results.previous.notices.extend(_check_unchanged(scan, results))
        except BaseException:
            results.close()
            raise
    except BaseException:
        spool.close()
        raise
    return PreparedBatch(path, display, scan, results, from_stdin, spool, skip_suspected=not options.retry_suspected)


def _check_text_flag(flag: str, value: str | None) -> None:
    """A flag's text must be UTF-8: a non-UTF-8 byte on the command line arrives as a lone surrogate."""
    if value is None:
        return
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        code = ord(value[exc.start])
        what = f"the byte 0x{code - 0xdc00:02x}" if 0xdc80 <= code <= 0xdcff else f"the code point U+{code:04X}"
        raise UsageError(f"{flag} holds {what}, which is not UTF-8 text (at character {exc.start + 1})",
                         fix=f"pass {flag} as UTF-8 text (check the encoding of the terminal or script, "
                             "e.g. iconv -f latin1 -t utf-8)") from None


_GENERATED_ID = re.compile(r"line-\d+")


def _check_unchanged(scan: ScanResult, results: ResultsFile) -> list[str]:
    """Raise :class:`UsageError` when a request that has a successful line now asks something else.

    Results are never mixed: a successful line answers the request whose fingerprint it carries. Returns
    notices (successful lines of older versions carry no fingerprint and cannot be checked).
    """
    prev = results.previous
    # A request that failed (died with replicas, suspected of crashing them) and was edited since is a new one.
    prev.forget_failures_of([cid for cid, fp in prev.error_fingerprints.items()
                             if cid in scan.fingerprints and scan.fingerprints[cid] != fp])
    changed: list[tuple[int, str, int]] = []
    unchecked = 0
    for cid in prev.done:
        line = scan.lines.get(cid)
        if line is None:
            continue  # no longer in the prompts: nothing is sent for it
        recorded = prev.fingerprints.get(cid)
        if recorded is None:
            unchecked += 1
        elif scan.fingerprints.get(cid) != recorded[0]:
            changed.append((line, cid, recorded[1]))
    notices = []
    if unchecked:
        notices.append(f"{unchecked} successful line{'s' if unchecked > 1 else ''} in {results.path} "
                       f"{'were' if unchecked > 1 else 'was'} written by an older speedslurm, without a request "
                       "fingerprint: those prompts are not checked for changes")
    if not changed:
        return notices
    changed.sort()
    line, cid, at = changed[0]
    what = "the line is now invalid" if cid in scan.invalid_ids else "its text, fields or url differ"
    more = f"; {len(changed) - 1} more changed after it" if len(changed) > 1 else ""
    fix = ("the results are not mixed: to resume this file, give the prompts (and flags) that were answered; to send "
           "the changed prompts, write to a new --out")
    if any(_GENERATED_ID.fullmatch(c) for _, c, _ in changed):
        fix += ("; lines without a custom_id are named by position (line-N), so inserting or removing a line "
                "renames every line after it: give each line its own custom_id")
    raise UsageError(f"{scan.display}:{line}: request {json.dumps(cid)} is not the one answered in "
                     f"{results.path}:{at}: {what} (the prompts changed since, or a flag such as --max-tokens, "
                     f"--temperature or --system differs){more}", fix=fix)
