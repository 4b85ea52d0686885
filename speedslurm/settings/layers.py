"""Settings layers: where the files are, reading them, and the environment variables and ``--set`` flags.

Each layer is a nested mapping and the source it came from (a file path, ``env NAME``, ``--set KEY``);
:func:`merge` lays them over each other and records the source of every leaf. Values stay as YAML gave them:
:mod:`speedslurm.settings.check` turns the merged mapping into typed settings.
"""

from __future__ import annotations

import os
import re
import sys
import typing as tp
from pathlib import Path

import yaml

from ..errors import ConfigError
from .packaged import CONFIGS, data_dir

ENV_PREFIX = "SPEEDSLURM_"
# Environment variables with a meaning of their own, not settings paths.
# SPEEDSLURM_API_KEY is `run --api-key`'s variable (a secret, never a setting).
_ENV_RESERVED = {"SPEEDSLURM_CONFIG", "SPEEDSLURM_PROFILE", "SPEEDSLURM_CONFIGS_DIR",
                 "SPEEDSLURM_REQUIRE_TESTBED", "SPEEDSLURM_API_KEY", "SPEEDSLURM_TEMPLATES_DIR"}


# ----------------------------------------------------------------------------------------------------------
# Locations


def package_defaults_path() -> Path:
    return Path(__file__).with_name("defaults.yaml")


def configs_dir(environ: tp.Mapping[str, str] | None = None) -> Path | None:
    """The packaged ``configs/`` (registry and profiles); ``$SPEEDSLURM_CONFIGS_DIR`` replaces it."""
    environ = os.environ if environ is None else environ
    env = environ.get("SPEEDSLURM_CONFIGS_DIR")
    if env:
        return Path(env)
    return data_dir(CONFIGS)


def user_config_dir(environ: tp.Mapping[str, str] | None = None) -> Path:
    """``$XDG_CONFIG_HOME/speedslurm`` or ``~/.config/speedslurm``: the user's config.yaml, models.yaml and
    ``profiles/<name>.yaml``, layered over the packaged ones."""
    environ = os.environ if environ is None else environ
    base = environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config")
    return Path(base) / "speedslurm"


def profile_paths(name: str, cdir: Path | None, udir: Path) -> list[Path]:
    """Where profile ``name`` may be defined, lowest precedence first: packaged, then the user's own."""
    if not name or "/" in name or name.startswith(".") or name == "models":
        return []
    return [*([cdir / f"{name}.yaml"] if cdir else []), udir / "profiles" / f"{name}.yaml"]


def known_profiles(cdir: Path | None, udir: Path) -> list[str]:
    names = {p.stem for p in cdir.glob("*.yaml") if p.stem != "models"} if cdir else set()
    names |= {p.stem for p in (udir / "profiles").glob("*.yaml")}
    return sorted(names)


def user_config_path(explicit: str | os.PathLike[str] | None = None,
                     environ: tp.Mapping[str, str] | None = None) -> Path:
    environ = os.environ if environ is None else environ
    if explicit:
        return Path(explicit)
    env = environ.get("SPEEDSLURM_CONFIG")
    if env:
        return Path(env)
    return user_config_dir(environ) / "config.yaml"


# ----------------------------------------------------------------------------------------------------------
# Loading


class _Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """libyaml's parser with PyYAML's safe constructors, read about 10x faster than yaml.safe_load (every command
    reads the defaults, the registry and a profile before anything else); the pure-Python parser where PyYAML was
    built without libyaml. Numbers are YAML 1.2's: ``4:00:00`` (a Slurm time) and ``0123`` stay text, where
    YAML 1.1 reads them as 14400 and 83; a float has a dot (``1.5e3``), so that ``12e3`` stays text too."""


_INT, _FLOAT = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
_Loader.yaml_implicit_resolvers = {first: [(tag, rx) for tag, rx in resolvers if tag not in (_INT, _FLOAT)]
                                   for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(_INT, re.compile(r"^[-+]?(?:0b[01_]+|0x[0-9a-fA-F_]+|0|[1-9][0-9_]*)$"),
                              list("-+0123456789"))
_Loader.add_implicit_resolver(_FLOAT, re.compile(
    r"^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?"
    r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"), list("-+0123456789."))


def _yaml(text: str) -> tp.Any:
    return yaml.load(text, Loader=_Loader)


def load_yaml(path: Path, required: bool) -> dict[str, tp.Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset "
                          f"{exc.start})", fix="save it as UTF-8") from None
    except FileNotFoundError:
        if required:
            raise ConfigError(f"config file {path} does not exist",
                              fix="create it or point SPEEDSLURM_CONFIG/--config at an existing file") from None
        return {}
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}",
                          fix="check the file's permissions") from None
    try:
        data = _yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"YAML syntax error in {where}: {problem}",
                          fix=f"correct the YAML at {where}") from None
    except RecursionError:
        raise ConfigError(f"config file {path} is nested too deep (max {MAX_DEPTH} levels)",
                          fix="no setting is nested more than a few levels: correct the file") from None
    except ValueError:  # an integer of more digits than Python converts
        raise ConfigError(f"config file {path} holds a number of more than {_MAX_DIGITS()} digits",
                          fix="correct the number, or quote it if it is meant as text") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, not {type(data).__name__}",
                          fix="start the file with a section such as `llama:` or `cluster:`")
    check_depth(data, str(path))
    return data


# No setting is nested deeper than a few levels (models.NAME.arch.n_layer); a layer nested deeper than this is
# refused before it is merged (the merge and the checks recurse into it).
MAX_DEPTH = 32
_MAX_DIGITS: tp.Callable[[], int] = getattr(sys, "get_int_max_str_digits", lambda: 4300)


def check_depth(layer: tp.Any, source: str) -> None:
    """A :class:`ConfigError` naming ``source`` when mappings and lists in ``layer`` nest deeper than MAX_DEPTH."""
    todo: list[tuple[tp.Any, int]] = [(layer, 0)]
    seen: set[int] = set()  # YAML anchors can make a value hold itself (&a [*a])
    while todo:
        value, depth = todo.pop()
        if not isinstance(value, (dict, list)) or id(value) in seen:
            continue
        if depth >= MAX_DEPTH:
            raise ConfigError(f"{source}: the value is nested too deep (max {MAX_DEPTH} levels)",
                              fix="no setting is nested more than a few levels: write a plain value, list or mapping")
        seen.add(id(value))
        todo.extend((item, depth + 1) for item in (value.values() if isinstance(value, dict) else value))
    _expanded(layer, source, {}, set())


MAX_VALUES = 100_000  # values a layer holds once its YAML aliases are expanded; settings hold a few hundred


def _expanded(value: tp.Any, source: str, memo: dict[int, int], active: set[int]) -> int:
    """How many values ``value`` holds with its aliases expanded (each shared value counted once per use, each
    looked at once); a :class:`ConfigError` past MAX_VALUES (an alias bomb) or for a value that holds itself."""
    if not isinstance(value, (dict, list)):
        return 1
    key = id(value)
    if key in memo:
        return memo[key]
    if key in active:
        raise ConfigError(f"{source}: a value holds itself (a YAML alias inside its own anchor)",
                          fix="write the value out instead of the alias")
    active.add(key)
    n = 1
    for item in value.values() if isinstance(value, dict) else value:
        n += _expanded(item, source, memo, active)
        if n > MAX_VALUES:
            raise ConfigError(f"{source}: the settings expand to more than {MAX_VALUES:,} values (YAML aliases "
                              "that repeat each other)", fix="write the settings out, or use fewer aliases")
    active.discard(key)
    memo[key] = n
    return n


def merge(base: dict[str, tp.Any], new: dict[str, tp.Any], origins: dict[str, str], source: str,
          prefix: str = "") -> None:
    for key, value in new.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merge(base[key], value, origins, source, dotted + ".")
        else:
            base[key] = value
            origins[dotted] = source
            # every leaf below a replaced mapping comes from this source too
            if isinstance(value, dict):
                for sub in _leaves(value, dotted + "."):
                    origins[sub] = source


def _leaves(data: dict[str, tp.Any], prefix: str) -> tp.Iterator[str]:
    for key, value in data.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


def set_dotted(dotted: str, value: tp.Any) -> dict[str, tp.Any]:
    """``"llama.parallel", 8`` -> ``{"llama": {"parallel": 8}}``."""
    layer: dict[str, tp.Any] = {}
    cur = layer
    parts = dotted.split(".")
    for part in parts[:-1]:
        cur = cur.setdefault(part, {})
    cur[parts[-1]] = value
    return layer


def _parse_scalar(text: str) -> tp.Any:
    try:
        return _yaml(text) if text != "" else None
    except (yaml.YAMLError, ValueError, RecursionError):  # not YAML, or a number Python will not convert: text
        return text


def _layer(dotted: str, text: str, source: str) -> tuple[dict[str, tp.Any], str]:
    if dotted.count(".") >= MAX_DEPTH:
        shown = source if len(source) <= 80 else f"{source[:70]}..."
        raise ConfigError(f"{shown}: no setting is nested {dotted.count('.') + 1} levels deep",
                          fix="name a setting such as llama.parallel (`speedslurm config show` lists them)")
    layer = set_dotted(dotted, _parse_scalar(text))
    check_depth(layer, source)
    return layer, source


def env_layer(environ: tp.Mapping[str, str]) -> list[tuple[dict[str, tp.Any], str]]:
    """``SPEEDSLURM_LLAMA__PARALLEL=8`` -> ``{"llama": {"parallel": 8}}`` (one layer per variable)."""
    layers = []
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX) or name in _ENV_RESERVED:
            continue
        dotted = name[len(ENV_PREFIX):].lower().replace("__", ".")
        layers.append(_layer(dotted, environ[name], f"env {name}"))
    return layers


def parse_overrides(overrides: tp.Iterable[str]) -> list[tuple[dict[str, tp.Any], str]]:
    layers = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r} is not KEY=VALUE", fix="write e.g. --set llama.parallel=8")
        key, _, value = item.partition("=")
        layers.append(_layer(key.strip(), value, f"--set {key.strip()}"))
    return layers
