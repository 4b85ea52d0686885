"""Settings: YAML layers merged once into typed, frozen dataclasses, with the origin of every value.

Layers, lowest to highest precedence:

1. packaged defaults (``speedslurm/settings/defaults.yaml``: lists every valid key);
2. the model registry: the packaged ``configs/models.yaml``, then the user's ``~/.config/speedslurm/models.yaml``;
3. the cluster profile: the packaged ``configs/<profile>.yaml``, then the user's
   ``~/.config/speedslurm/profiles/<profile>.yaml`` (a profile must exist in one of them);
4. the user's file: ``$SPEEDSLURM_CONFIG`` or ``~/.config/speedslurm/config.yaml``;
5. ``SPEEDSLURM_<SECTION>__<KEY>`` environment variables (values parsed as YAML scalars);
6. CLI flags (``--set section.key=value`` and each command's own flags).

The files, variables and flags are read in :mod:`speedslurm.settings.layers`; the merged values are checked and
converted by pydantic-core in :mod:`speedslurm.settings.check`. Unknown keys and wrong types are
:class:`ConfigError` naming the file, the key and the valid keys.
Nothing is read at import time: a broken file cannot break ``--help``.
"""

from __future__ import annotations

import dataclasses
import os
import typing as tp
from pathlib import Path

from ..errors import ConfigError
from .layers import (
    configs_dir,
    env_layer,
    known_profiles,
    load_yaml,
    merge,
    package_defaults_path,
    parse_overrides,
    profile_paths,
    set_dotted,
    user_config_dir,
    user_config_path,
)

__all__ = ["ClusterSettings", "GatewayModel", "GatewaySettings", "LlamaSettings", "ModelArch", "ModelEntry",
           "NodeSettings", "RunSettings", "Settings", "describe", "load_settings"]

# Metadata of a dataclass field that is not a setting (Settings.origins): never read from the layers.
NOT_A_SETTING = {"setting": False}


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
    warm_placement: bool = True   # followers on idle nodes holding a warm rpc cache of the model (warmcache)
    # extra sbatch options, name -> value (true: a bare flag; false/null: left out); checked, with the
    # file each came from, by speedslurm.planning.sbatchopts when a plan is made
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
    parallel: int | tp.Literal["auto"] = 4  # a number of slots, or "auto": sized from the memory left (plan)
    max_parallel: int = 16      # the most slots "auto" gives
    min_ctx_per_slot: int = 4096  # the least context per slot "auto" gives (or the whole ctx when smaller)
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
    idle_timeout: str = "0"  # a duration (90s, 30m, 2h): end the job after no request for that long; 0 = never


@dataclasses.dataclass(frozen=True)
class RunSettings:
    dir: str = "~/.local/share/speedslurm/runs"
    executor: str = "auto"
    follower_timeout_s: float = 300
    health_timeout_s: float = 1800
    poll_interval_s: float = 0.1
    handover_before_s: float = 600
    outage_s: float = 300  # a batch gives up a replica that answers no request or probe for this long

    @property
    def root(self) -> Path:
        return Path(os.path.expanduser(self.dir))


@dataclasses.dataclass(frozen=True)
class GatewayModel:
    """One alias of ``speedslurm gateway``: what it serves and how (None: the ``gateway`` section's default)."""

    model: str | None = None           # a registry name, a .gguf path, or the http(s) URL of a running server
    nodes: int | None = None           # nodes per replica (None: as the plan chooses)
    min_replicas: int | None = None
    max_replicas: int | None = None
    ctx: int | None = None
    time: str | None = None            # each replica's job time limit (None: cluster.time)
    idle_timeout: str | None = None    # a replica with no request for this long is stopped (0: never)
    slots: int | None = None           # requests at once per replica (None: the server's own slot count)
    api_key_file: str | None = None    # a URL backend's API key, in a file (a deployment's key is its own)


@dataclasses.dataclass(frozen=True)
class GatewaySettings:
    listen: str = "127.0.0.1:8800"
    dir: str = "~/.local/share/speedslurm/gateway"
    min_replicas: int = 0
    max_replicas: int = 1
    idle_timeout: str = "30m"
    time: str | None = None
    max_queue: int = 256
    max_wait_s: float = 900
    max_body_bytes: int = 8 * 1024 * 1024
    max_json_depth: int = 64
    client_timeout_s: float = 60
    backend_timeout_s: float = 600
    retry_after_failure_s: float = 120
    drain_s: float = 60
    scale_up_queue: int = 2
    scale_up_wait_s: float = 2
    scale_up_after_s: float = 20
    scale_down_after_s: float = 300
    scale_down_use: float = 0.5
    queue_replicas: bool = False
    handover_before_s: float | None = None
    on_exit: tp.Literal["stop", "leave"] = "stop"
    access_log: str | None = None
    models: dict[str, GatewayModel] = dataclasses.field(default_factory=dict)

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
    gateway: GatewaySettings = dataclasses.field(default_factory=GatewaySettings)
    # dotted key -> where its value came from (file path, env var, "--set", "default")
    origins: dict[str, str] = dataclasses.field(default_factory=dict, compare=False, repr=False,
                                                metadata=NOT_A_SETTING)

    def to_dict(self) -> dict[str, tp.Any]:
        data = dataclasses.asdict(self)
        data.pop("origins", None)
        return data


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
    layers.append((load_yaml(defaults_path, required=True), "default"))

    user_path = user_config_path(config_path, environ)
    user = load_yaml(user_path, required=bool(config_path or environ.get("SPEEDSLURM_CONFIG")))
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
        layers.append((load_yaml(cdir / "models.yaml", required=False), str(cdir / "models.yaml")))
    layers.append((load_yaml(udir / "models.yaml", required=False), str(udir / "models.yaml")))
    name = chosen or str(layers[0][0].get("profile", "gorgonas"))
    profile_files = [p for p in profile_paths(name, cdir, udir) if p.is_file()]
    if not profile_files:
        raise ConfigError(f"unknown profile {name!r}",
                          fix=f"use one of: {', '.join(known_profiles(cdir, udir)) or '(none found)'}; "
                              f"or write your own as {udir / 'profiles' / (name + '.yaml')}")
    for path in profile_files:
        layers.append((load_yaml(path, required=True), str(path)))
    layers.append((user, str(user_path)))
    layers.extend(env_layers)
    layers.extend(set_layers)
    if cli:
        for key, value in cli.items():
            if value is not None:
                layers.append((set_dotted(key, value), f"flag {key}"))

    for layer, source in layers:
        merge(merged, layer, origins, source)
    if chosen:
        merged["profile"] = chosen
        origins["profile"] = "--profile/SPEEDSLURM_PROFILE"
    from .check import build  # pydantic-core: loaded when settings are, not on import

    settings = build(Settings, merged, origins)
    return dataclasses.replace(settings, origins=origins)


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
