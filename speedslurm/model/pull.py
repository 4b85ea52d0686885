"""``speedslurm models pull NAME``: download a registry model's GGUF file(s) from the Hugging Face Hub.

The registry entry names the repository (``repo``) and the local files (``files``); each file is looked
up in the repository's file list by its name (split models often sit in a sub-folder there). The download
goes through ``huggingface_hub`` (the hub's URLs, headers, token, redirects, retries and progress bar) into
``.speedslurm-pull/NAME.part`` beside the destination. The part file survives an interrupted run and the next
run continues it with an HTTP Range request (the library's own ``hf_hub_download`` discards partial files in
current versions). The file is renamed into place only once its size equals the size the hub reports, so a
half-written file never carries the model's name. ``HF_ENDPOINT`` points at a mirror; ``HF_TOKEN`` at a token.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import typing as tp
import urllib.parse
from pathlib import Path

from ..errors import SpeedslurmError, UsageError
from ..settings.settings import Settings

STAGING = ".speedslurm-pull"
_RESUME_FIX = "check the network and free disk space, then run the command again: the download resumes where it stopped"


@dataclasses.dataclass(frozen=True)
class PullFile:
    repo: str
    remote: str        # path inside the repository
    dest: Path         # where the file ends up
    size: int | None   # bytes, as the hub reports

    @property
    def staging_dir(self) -> Path:
        return self.dest.parent / STAGING

    def to_json(self) -> dict[str, tp.Any]:
        return {"repo": self.repo, "remote": self.remote, "dest": str(self.dest), "size": self.size}


def _hub() -> tp.Any:
    try:
        import huggingface_hub
    except ImportError:
        # A declared dependency of speedslurm: missing only from a broken or hand-made environment.
        raise UsageError("downloading models needs the huggingface_hub package, a dependency of speedslurm that "
                         "this Python lacks",
                         fix="reinstall speedslurm in this environment, or pip install 'huggingface_hub>=0.24'") from None
    return huggingface_hub


def _endpoint(endpoint: str | None) -> str | None:
    return endpoint or os.environ.get("HF_ENDPOINT") or None


def plan_pull(settings: Settings, name: str, dest_dir: Path | None = None, *, endpoint: str | None = None,
              revision: str | None = None) -> list[PullFile]:
    """The files of registry model ``name``: where each comes from in the repository, where it goes, its size."""
    entry = settings.models.get(name)
    if entry is None:
        known = ", ".join(sorted(settings.models)) or "(none configured)"
        raise UsageError(f"unknown model {name!r}; known models: {known}",
                         fix="pass a name from `speedslurm models`, or add an entry with `repo:` and `files:`")
    if not entry.repo:
        raise UsageError(f"model {name!r} has no `repo:` in the registry, so there is nothing to download from",
                         fix=f"add `repo: OWNER/NAME-GGUF` to models.{name} in your config")
    hub = _hub()
    api = hub.HfApi(endpoint=_endpoint(endpoint))
    try:
        info = api.model_info(entry.repo, revision=revision, files_metadata=True)
    except Exception as exc:  # the library's typed errors: not found, gated, offline, ...
        raise SpeedslurmError(f"cannot list {entry.repo} on the hub: {type(exc).__name__}: {exc}",
                              fix="check models.NAME.repo, your network (or HF_ENDPOINT) and HF_TOKEN for gated repos") from None
    siblings = {s.rfilename: s for s in (info.siblings or [])}
    files = []
    for local in entry.paths:
        base = local.name
        matches = sorted(r for r in siblings if r == base or r.endswith("/" + base))
        if not matches:
            ggufs = sorted(r for r in siblings if r.endswith(".gguf"))
            raise UsageError(f"{entry.repo} has no file named {base}",
                             fix=f"fix models.{name}.files; the repository's GGUF files: {', '.join(ggufs[:8]) or 'none'}")
        sib = siblings[matches[0]]
        size = getattr(sib, "size", None)
        lfs = getattr(sib, "lfs", None)
        if lfs is not None and getattr(lfs, "size", None):
            size = int(lfs.size)
        dest = (dest_dir / base) if dest_dir else local
        files.append(PullFile(entry.repo, matches[0], dest.expanduser().absolute(), size))
    return files


def _size_error(f: PullFile, actual: int) -> SpeedslurmError:
    return SpeedslurmError(f"{f.remote}: downloaded {actual} bytes but the hub reports {f.size}",
                           fix=f"run the command again to download it anew; if it persists the hub's copy is "
                               f"inconsistent (check {f.repo})")


def pull_file(f: PullFile, *, endpoint: str | None = None, revision: str | None = None,
              progress: bool = True) -> str:
    """Download one file, continuing a partial one; returns 'present' or 'downloaded'.

    The partial file is ``.speedslurm-pull/NAME.part`` beside the destination; it survives an interrupted
    run, and the next run asks the hub only for the bytes after it (HTTP Range).
    """
    if f.dest.is_file() and f.size is not None and f.dest.stat().st_size == f.size:
        return "present"
    hub = _hub()
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers, disable_progress_bars, enable_progress_bars

    (enable_progress_bars if progress else disable_progress_bars)()
    url = hub.hf_hub_url(f.repo, f.remote, revision=revision, endpoint=_endpoint(endpoint))
    headers = build_hf_headers()
    try:
        meta = hub.get_hf_file_metadata(url, headers=headers, endpoint=_endpoint(endpoint))
    except Exception as exc:
        raise SpeedslurmError(f"cannot reach {f.remote} in {f.repo}: {type(exc).__name__}: {exc}",
                              fix="check the network (or HF_ENDPOINT) and HF_TOKEN, then run the command again") from None
    location = meta.location or url
    if urllib.parse.urlsplit(location).netloc != urllib.parse.urlsplit(url).netloc:
        headers.pop("authorization", None)  # a signed CDN address: the token stays with the hub
    expected = f.size if f.size is not None else meta.size
    f.staging_dir.mkdir(parents=True, exist_ok=True)
    part = f.staging_dir / (f.dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    if expected is not None and have > expected:
        part.unlink()  # longer than the file: not a prefix of it
        have = 0
    try:
        with open(part, "ab") as fh:
            http_get(location, fh, resume_size=have, headers=headers,
                     expected_size=meta.size if meta.size is not None else expected,
                     displayed_filename=f.dest.name)
    except OSError as exc:
        if "Consistency check failed" in str(exc):
            part.unlink(missing_ok=True)
            raise SpeedslurmError(f"{f.remote}: the download's size differs from what the hub announced: {exc}",
                                  fix="run the command again (the partial file was discarded)") from None
        raise SpeedslurmError(f"cannot download {f.remote} from {f.repo}: {exc}", fix=_RESUME_FIX) from None
    except Exception as exc:  # the library's HTTP errors
        raise SpeedslurmError(f"cannot download {f.remote} from {f.repo}: {type(exc).__name__}: {exc}",
                              fix=_RESUME_FIX) from None
    actual = part.stat().st_size
    if expected is not None and actual != expected:
        part.unlink(missing_ok=True)
        raise _size_error(f, actual)
    f.dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(part, f.dest)
    with contextlib.suppress(OSError):
        f.staging_dir.rmdir()  # only when no other download is in progress there
    return "downloaded"


def pull_model(settings: Settings, name: str, dest_dir: Path | None = None, *, endpoint: str | None = None,
               revision: str | None = None, progress: bool = True,
               on_file: tp.Callable[[PullFile, str], None] = lambda f, state: None) -> list[tuple[PullFile, str]]:
    """Download every file of registry model ``name``; [(file, 'present' | 'downloaded')]."""
    files = plan_pull(settings, name, dest_dir, endpoint=endpoint, revision=revision)
    need = sum(f.size or 0 for f in files if not (f.dest.is_file() and f.dest.stat().st_size == f.size))
    if files and need:
        target = files[0].dest.parent
        target.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(target).free
        if free < need:
            raise UsageError(f"{name} needs {need / 1e9:.1f} GB more but {target} has {free / 1e9:.1f} GB free",
                             fix="free some space or pass --dir to a larger filesystem")
    done = []
    for f in files:
        on_file(f, "start")
        state = pull_file(f, endpoint=endpoint, revision=revision, progress=progress)
        on_file(f, state)
        done.append((f, state))
    return done
