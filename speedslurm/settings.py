"""Settings: YAML layers merged once into typed, frozen dataclasses, with the origin of every value.

Layers, lowest to highest precedence:

1. packaged defaults (``speedslurm/defaults.yaml``: lists every valid key);
2. the model registry: the packaged ``configs/models.yaml``, then the user's ``~/.config/speedslurm/models.yaml``;
3. the cluster profile: the packaged ``configs/<profile>.yaml``, then the user's
   ``~/.config/speedslurm/profiles/<profile>.yaml`` (a profile must exist in one of them);
4. the user's file: ``$SPEEDSLURM_CONFIG`` or ``~/.config/speedslurm/config.yaml``;
5. ``SPEEDSLURM_<SECTION>__<KEY>`` environment variables (values parsed as YAML scalars);
6. CLI flags (``--set section.key=value`` and each command's own flags).

Unknown keys and wrong types are :class:`ConfigError` naming the file, the key and the valid keys.
Nothing is read at import time: a broken file cannot break ``--help``.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing as tp
from pathlib import Path

import yaml

from .errors import ConfigError
from .packaged import CONFIGS, data_dir

ENV_PREFIX = "SPEEDSLURM_"
# Environment variables with a meaning of their own, not settings paths.
# SPEEDSLURM_API_KEY is `run --api-key`'s variable (a secret, never a setting).
_ENV_RESERVED = {"SPEEDSLURM_CONFIG", "SPEEDSLURM_PROFILE", "SPEEDSLURM_CONFIGS_DIR",
                 "SPEEDSLURM_REQUIRE_TESTBED", "SPEEDSLURM_API_KEY", "SPEEDSLURM_TEMPLATES_DIR"}


@dataclasses.dataclass(frozen=True)
class NodeSettings:
    address: str | None = None
    gpu: str | None = None
    cuda_arch: str | None = None
    mem_gib: float | None = None
    usable_gib: float | None = None


@dataclasses.dataclass(frozen=True)
class ClusterSettings:
    name: str = "default"
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    gres_per_node: str | None = "gpu:1"
    cpus_per_node: int | None = None
    mem_per_node: str | None = None
    usable_gib: float = 22.0
    nodes: dict[str, NodeSettings] = dataclasses.field(default_factory=dict)
    exclude: list[str] = dataclasses.field(default_factory=list)
    time: str = "04:00:00"
    hetjob: bool = True
    # extra sbatch options, name -> value (true: a bare flag; false/null: left out); checked, with the
    # file each came from, by speedslurm.sbatchopts when a plan is made
    sbatch: dict[str, str | bool | None] = dataclasses.field(default_factory=dict)

    def node_address(self, node: str) -> str | None:
        entry = self.nodes.get(node)
        return entry.address if entry else None

    def node_usable_gib(self, node: str | None = None) -> float:
        entry = self.nodes.get(node) if node else None
        if entry and entry.usable_gib:
            return float(entry.usable_gib)
        return float(self.usable_gib)


@dataclasses.dataclass(frozen=True)
class LlamaSettings:
    bin_dir: str | None = None
    ngl: int = 99
    parallel: int = 4
    threads: int | None = None
    batch_size: int | None = None
    ubatch_size: int | None = None
    flash_attn: str | None = None
    server_port: int = 0
    rpc_port: int = 0
    rpc_cache: bool = True
    rpc_cache_dir: str | None = None
    extra_server_args: list[str] = dataclasses.field(default_factory=list)
    extra_rpc_args: list[str] = dataclasses.field(default_factory=list)
    compute_overhead_gib: float = 1.1
    kv_bytes_per_element: float = 2


@dataclasses.dataclass(frozen=True)
class RunSettings:
    dir: str = "~/.local/share/speedslurm/runs"
    executor: str = "auto"
    follower_timeout_s: float = 300
    health_timeout_s: float = 1800
    poll_interval_s: float = 0.1

    @property
    def root(self) -> Path:
        return Path(os.path.expanduser(self.dir))


@dataclasses.dataclass(frozen=True)
class ModelArch:
    n_layer: int
    n_head_kv: int
    head_dim: int


@dataclasses.dataclass(frozen=True)
class ModelEntry:
    files: list[str]
    description: str | None = None
    repo: str | None = None
    ctx: int = 8192
    host: str | None = None
    size_bytes: int | None = None
    arch: ModelArch | None = None
    chat_template: str | None = None   # llama-server --chat-template: a built-in name ("gemma") or Jinja text

    @property
    def paths(self) -> list[Path]:
        return [Path(os.path.expanduser(f)) for f in self.files]


@dataclasses.dataclass(frozen=True)
class Settings:
    profile: str = "gorgonas"
    cluster: ClusterSettings = dataclasses.field(default_factory=ClusterSettings)
    llama: LlamaSettings = dataclasses.field(default_factory=LlamaSettings)
    run: RunSettings = dataclasses.field(default_factory=RunSettings)
    models: dict[str, ModelEntry] = dataclasses.field(default_factory=dict)
    # dotted key -> where its value came from (file path, env var, "--set", "default")
    origins: dict[str, str] = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def to_dict(self) -> dict[str, tp.Any]:
        data = dataclasses.asdict(self)
        data.pop("origins", None)
        return data


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


def _load_yaml(path: Path, required: bool) -> dict[str, tp.Any]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        if required:
            raise ConfigError(f"config file {path} does not exist",
                              fix="create it or point SPEEDSLURM_CONFIG/--config at an existing file") from None
        return {}
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}",
                          fix="check the file's permissions") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"YAML syntax error in {where}: {problem}",
                          fix=f"correct the YAML at {where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, not {type(data).__name__}",
                          fix="start the file with a section such as `llama:` or `cluster:`")
    return data


def _merge(base: dict[str, tp.Any], new: dict[str, tp.Any], origins: dict[str, str], source: str,
           prefix: str = "") -> None:
    for key, value in new.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value, origins, source, dotted + ".")
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


def _set_dotted(target: dict[str, tp.Any], dotted: str, value: tp.Any) -> dict[str, tp.Any]:
    layer: dict[str, tp.Any] = {}
    cur = layer
    parts = dotted.split(".")
    for part in parts[:-1]:
        cur = cur.setdefault(part, {})
    cur[parts[-1]] = value
    return layer


def _parse_scalar(text: str) -> tp.Any:
    try:
        return yaml.safe_load(text) if text != "" else None
    except yaml.YAMLError:
        return text


def env_layer(environ: tp.Mapping[str, str]) -> list[tuple[dict[str, tp.Any], str]]:
    """``SPEEDSLURM_LLAMA__PARALLEL=8`` -> ``{"llama": {"parallel": 8}}`` (one layer per variable)."""
    layers = []
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX) or name in _ENV_RESERVED:
            continue
        dotted = name[len(ENV_PREFIX):].lower().replace("__", ".")
        layers.append((_set_dotted({}, dotted, _parse_scalar(environ[name])), f"env {name}"))
    return layers


def parse_overrides(overrides: tp.Iterable[str]) -> list[tuple[dict[str, tp.Any], str]]:
    layers = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r} is not KEY=VALUE", fix="write e.g. --set llama.parallel=8")
        key, _, value = item.partition("=")
        layers.append((_set_dotted({}, key.strip(), _parse_scalar(value)), f"--set {key.strip()}"))
    return layers


def load_settings(*, profile: str | None = None, config_path: str | os.PathLike[str] | None = None,
                  overrides: tp.Iterable[str] = (), cli: dict[str, tp.Any] | None = None,
                  environ: tp.Mapping[str, str] | None = None) -> Settings:
    """Merge every layer once and return typed settings.

    ``cli`` holds values from a command's own flags as dotted keys (``{"run.executor": "local"}``);
    None values are ignored so that an unset flag never hides a lower layer.
    """
    environ = os.environ if environ is None else environ
    origins: dict[str, str] = {}
    merged: dict[str, tp.Any] = {}
    layers: list[tuple[dict[str, tp.Any], str]] = []
    defaults_path = package_defaults_path()
    layers.append((_load_yaml(defaults_path, required=True), "default"))

    user_path = user_config_path(config_path, environ)
    user = _load_yaml(user_path, required=bool(config_path or environ.get("SPEEDSLURM_CONFIG")))
    env_layers = env_layer(environ)
    set_layers = parse_overrides(overrides)

    # The profile picks which configs/<profile>.yaml applies, so resolve it before loading configs/.
    chosen = profile or environ.get("SPEEDSLURM_PROFILE")
    if not chosen:
        for layer, _src in [*reversed(set_layers), *reversed(env_layers), (user, "")]:
            if "profile" in layer:
                chosen = str(layer["profile"])
                break
    cdir = configs_dir(environ)
    udir = user_config_dir(environ)
    if cdir is not None:
        layers.append((_load_yaml(cdir / "models.yaml", required=False), str(cdir / "models.yaml")))
    layers.append((_load_yaml(udir / "models.yaml", required=False), str(udir / "models.yaml")))
    name = chosen or str(layers[0][0].get("profile", "gorgonas"))
    profile_files = [p for p in profile_paths(name, cdir, udir) if p.is_file()]
    if not profile_files:
        raise ConfigError(f"unknown profile {name!r}",
                          fix=f"use one of: {', '.join(known_profiles(cdir, udir)) or '(none found)'}; "
                              f"or write your own as {udir / 'profiles' / (name + '.yaml')}")
    for path in profile_files:
        layers.append((_load_yaml(path, required=True), str(path)))
    layers.append((user, str(user_path)))
    layers.extend(env_layers)
    layers.extend(set_layers)
    if cli:
        for key, value in cli.items():
            if value is not None:
                layers.append((_set_dotted({}, key, value), f"flag {key}"))

    for layer, source in layers:
        _check_mapping(Settings, layer, "", source)
        _merge(merged, layer, origins, source)
    if chosen:
        merged["profile"] = chosen
        origins["profile"] = "--profile/SPEEDSLURM_PROFILE"
    settings = _build(Settings, merged, "", origins)
    return dataclasses.replace(settings, origins=origins)


# ----------------------------------------------------------------------------------------------------------
# Validation against the dataclass schema


def _check_mapping(cls: type, data: tp.Any, prefix: str, source: str) -> None:
    """Reject unknown keys early, naming the source (file, env var, flag) where they appear."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'top level'} must be a mapping, not {data!r}",
                          fix="write it as `key: value` lines")
    hints = tp.get_type_hints(cls)
    valid = [f.name for f in dataclasses.fields(cls) if f.name != "origins"]
    for key, value in data.items():
        if key not in valid:
            raise ConfigError(f"{source}: unknown key '{prefix}{key}'",
                              fix=f"valid keys{' in ' + prefix.rstrip('.') if prefix else ''}: {', '.join(valid)}")
        hint = hints[key]
        sub = _dataclass_in(hint)
        if sub is not None and isinstance(value, dict):
            _check_mapping(sub, value, f"{prefix}{key}.", source)
        entry = _dict_entry_class(hint)
        if entry is not None:
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: {prefix}{key} must be a mapping of names to entries",
                                  fix=f"write `{key}:` followed by `name: {{...}}` lines")
            for name, item in value.items():
                _check_mapping(entry, item if item is not None else {}, f"{prefix}{key}.{name}.", source)


def _dataclass_in(hint: tp.Any) -> type | None:
    """The dataclass behind ``X`` or ``X | None`` (not inside containers)."""
    candidates = tp.get_args(hint) if tp.get_origin(hint) in (tp.Union, types.UnionType) else (hint,)
    for arg in candidates:
        if dataclasses.is_dataclass(arg) and isinstance(arg, type):
            return arg
    return None


def _dict_entry_class(hint: tp.Any) -> type | None:
    if tp.get_origin(hint) is dict:
        args = tp.get_args(hint)
        if len(args) == 2 and dataclasses.is_dataclass(args[1]):
            return tp.cast(type, args[1])
    return None


_T = tp.TypeVar("_T")


def _build(cls: type[_T], data: dict[str, tp.Any], prefix: str, origins: dict[str, str]) -> _T:
    hints = tp.get_type_hints(cls)
    kwargs: dict[str, tp.Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name == "origins" or f.name not in data:
            continue
        kwargs[f.name] = _coerce(hints[f.name], data[f.name], f"{prefix}{f.name}", origins)
    try:
        return cls(**kwargs)
    except TypeError as exc:
        missing = [f.name for f in dataclasses.fields(cls)  # type: ignore[arg-type]
                   if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                   and f.name not in kwargs]
        src = origins.get(prefix.rstrip("."), "settings")
        raise ConfigError(f"{src}: {prefix.rstrip('.')} lacks required key(s) {', '.join(missing)}",
                          fix=f"add {', '.join(missing)} to that entry") from exc


def _type_name(hint: tp.Any) -> str:
    if isinstance(hint, type):
        return hint.__name__
    return str(hint).replace("typing.", "")


def _coerce(hint: tp.Any, value: tp.Any, dotted: str, origins: dict[str, str]) -> tp.Any:
    origin = tp.get_origin(hint)
    args = tp.get_args(hint)
    src = origins.get(dotted) or next((v for k, v in origins.items() if k.startswith(dotted + ".")), "settings")

    def bad() -> ConfigError:
        return ConfigError(f"{src}: {dotted} must be {_type_name(hint)}, not {value!r}",
                           fix=f"set {dotted} to a value of type {_type_name(hint)}")

    if origin in (tp.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        errors: list[ConfigError] = []
        for arg in non_none:
            try:
                return _coerce(arg, value, dotted, origins)
            except ConfigError as exc:
                errors.append(exc)
        raise bad()
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise bad()
        return _build(hint, value, dotted + ".", origins)
    if origin is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise bad()
        return {str(k): _coerce(args[1], v, f"{dotted}.{k}", origins) for k, v in value.items()}
    if origin is list:
        if value is None:
            return []
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise bad()
        return [_coerce(args[0], v, dotted, origins) for v in value]
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise bad()
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad()
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad()
        return float(value)
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad()
    return value


def describe(settings: Settings) -> list[tuple[str, tp.Any, str]]:
    """Flattened (dotted key, value, origin) rows for ``config show``."""
    rows: list[tuple[str, tp.Any, str]] = []

    def walk(data: tp.Any, prefix: str) -> None:
        if isinstance(data, dict) and data:
            for key in data:
                walk(data[key], f"{prefix}{key}.")
        else:
            key = prefix.rstrip(".")
            origin = settings.origins.get(key)
            if origin is None:  # a leaf inside a mapping set as a whole
                parts = key.split(".")
                while parts and origin is None:
                    parts.pop()
                    origin = settings.origins.get(".".join(parts))
            rows.append((key, data, origin or "default"))

    walk(settings.to_dict(), "")
    return rows
