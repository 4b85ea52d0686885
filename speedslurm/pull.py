"""``speedslurm models pull NAME``: download a registry model's GGUF file(s) from the Hugging Face Hub.

The registry entry names the repository (``repo``) and the local files (``files``); each file is looked
up in the repository's file list by its name (split models often sit in a sub-folder there). The download
is ``huggingface_hub``'s own: resumable (an interrupted run leaves a ``.incomplete`` file that the next run
continues with an HTTP Range request), with a progress bar. Files are staged in ``.speedslurm-pull/`` beside
their destination and renamed into place only once their size equals the size the hub reports, so a
half-written file never carries the model's name. ``HF_ENDPOINT`` points at a mirror; ``HF_TOKEN`` at a token.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import typing as tp
from pathlib import Path

from .errors import SpeedslurmError, UsageError
from .settings import Settings

STAGING = ".speedslurm-pull"


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
        raise UsageError("downloading models needs the huggingface_hub package",
                         fix="pip install 'speedslurm[hub]' (or pip install huggingface_hub)") from None
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
    """Download one file (resuming a partial one); returns 'present' or 'downloaded'."""
    if f.dest.is_file() and f.size is not None and f.dest.stat().st_size == f.size:
        return "present"
    hub = _hub()
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    f.staging_dir.mkdir(parents=True, exist_ok=True)
    (disable_progress_bars if not progress else enable_progress_bars)()
    try:
        got = Path(hub.hf_hub_download(repo_id=f.repo, filename=f.remote, revision=revision,
                                       local_dir=f.staging_dir, endpoint=_endpoint(endpoint)))
    except OSError as exc:
        if "Consistency check failed" in str(exc):
            raise SpeedslurmError(f"{f.remote}: the download's size differs from what the hub announced: {exc}",
                                  fix="run the command again (the partial file is discarded)") from None
        raise SpeedslurmError(f"cannot download {f.remote} from {f.repo}: {exc}",
                              fix="check the network and free disk space, then run the command again: the download resumes where it stopped") from None
    except Exception as exc:
        raise SpeedslurmError(f"cannot download {f.remote} from {f.repo}: {type(exc).__name__}: {exc}",
                              fix="run the command again: the download resumes where it stopped") from None
    actual = got.stat().st_size
    if f.size is not None and actual != f.size:
        got.unlink(missing_ok=True)
        raise _size_error(f, actual)
    f.dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(got, f.dest)
    _tidy(f.staging_dir)
    return "downloaded"


def _tidy(staging: Path) -> None:
    """Remove the staging folder once nothing is left in it but the library's bookkeeping."""
    leftovers = [p for p in staging.rglob("*") if p.is_file() and ".cache" not in p.relative_to(staging).parts]
    incomplete = list(staging.rglob("*.incomplete"))
    if not leftovers and not incomplete:
        shutil.rmtree(staging, ignore_errors=True)


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
