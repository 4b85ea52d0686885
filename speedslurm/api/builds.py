"""Building llama.cpp on the cluster from Python: what ``speedslurm build-llama`` does."""

from __future__ import annotations

import dataclasses
import time
import typing as tp
from pathlib import Path

from ..errors import UsageError
from .deployments import OnMessage


@dataclasses.dataclass(frozen=True)
class Built:
    """What :func:`build_llama` did: the build job, its log, and the check of the binaries (on every node)."""

    job_id: str
    state: str
    build_s: float
    log: Path
    report: tp.Any  # speedslurm.ops.buildllama.BuildReport
    config_written: Path | None

    def check(self) -> None:
        """:class:`SpeedslurmError` naming every problem when the build is not usable on every node."""
        from ..errors import SpeedslurmError

        if not self.report.ok:
            raise SpeedslurmError("the build is not usable on every node: " + "; ".join(
                self.report.problems + [f"{n.node}: {n.error}" for n in self.report.nodes if not n.ok]),
                fix="see the lines above; a node that cannot load a library needs the same system packages "
                    "(or CUDA driver) as the build node")


def build_llama(options: tp.Any, *, timeout: float | None = None, node_check: bool = True,
                write_config: bool = False, on_message: OnMessage | None = None,
                on_line: OnMessage | None = None,
                on_state: tp.Callable[[str, str, float], None] | None = None) -> Built:
    """Build llama.cpp as a Slurm job (``options``: a :class:`speedslurm.ops.buildllama.BuildOptions`), follow it,
    then check the binaries (on every node of the partition unless ``node_check`` is False); with
    ``write_config`` a usable build's ``llama.bin_dir`` goes into the user's config file. ``on_line`` hears the
    build log's lines, ``on_state(job_id, state, elapsed_s)`` the job's state changes.

    A build job that does not complete raises :class:`SpeedslurmError` with its last log lines; a build that is
    not usable everywhere is returned (``.report.ok`` False; :meth:`Built.check` raises)."""
    from ..errors import SpeedslurmError
    from ..ops import buildllama as bl
    from ..settings.layers import user_config_path

    say = on_message or (lambda _text: None)
    if options.source is not None and not (options.source / "CMakeLists.txt").is_file():
        raise UsageError(f"{options.source} holds no CMakeLists.txt: not a llama.cpp source tree",
                         fix="pass the top folder of a llama.cpp checkout (the one with CMakeLists.txt)")
    script = bl.render_build_script(bl.template_text(), options)
    options.log_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    job_id, script_path = bl.submit(script, options.log_dir)
    log_path = options.log_path(job_id)
    say(f"build job {job_id} submitted ({script_path}); log {log_path}")
    state_of = on_state or (lambda _job, _state, _elapsed: None)
    final = bl.follow_job(job_id, log_path, on_line=on_line or (lambda _line: None),
                          on_state=lambda state, elapsed: state_of(job_id, state, elapsed), timeout=timeout)
    build_s = time.monotonic() - started
    if final.state != "COMPLETED":
        from ..node.children import log_tail

        raise SpeedslurmError(f"build job {job_id} ended {final.state} after {build_s:.0f}s"
                              + (f" ({final.reason})" if final.reason else "")
                              + f"\n--- last log lines ---\n{log_tail(log_path, 30)}",
                              fix=f"read {log_path}; fix the cause and run the command again "
                                  "(the build tree in PREFIX/build is kept)")
    say(f"build finished in {build_s:.0f}s; checking the binaries" + (" on every node" if node_check else ""))
    report = bl.verify_build(options.bin_dir, options.partition, on_nodes=node_check)
    written = bl.write_bin_dir_setting(user_config_path(), options.bin_dir) if write_config and report.ok else None
    return Built(job_id, final.state, build_s, log_path, report, written)
