"""Typing the merged settings: pydantic-core validates and converts the merged mapping into the frozen dataclasses.

The validator's schema is derived from the dataclasses' own type hints (one rule per kind of hint, below), so a
field added to a settings dataclass is checked without further code. The rules are strict: ``int`` takes no
bool, float or text; ``float`` takes ints and floats; ``bool`` only true/false; ``str`` also takes a number (YAML
reads ``cuda_arch: 86`` as one). ``null`` gives an empty list, mapping or section; a single string is a one-item
list. pydantic-core's errors are turned into a :class:`ConfigError` that names the key, the file, variable or
flag its value came from, what it must be, and the fix.

pydantic-core is used directly rather than through ``pydantic.TypeAdapter``: on the path from ``speedslurm up`` to
its submission, the TypeAdapter costs about 145 ms (pydantic's import and its schema generation) where
pydantic-core costs about 30 ms, and every command loads the settings first.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing as tp

from pydantic_core import CoreSchema, SchemaValidator, ValidationError
from pydantic_core import core_schema as cs

from ..errors import ConfigError
from .settings import NOT_A_SETTING

_T = tp.TypeVar("_T")

_CONFIG = cs.CoreConfig(coerce_numbers_to_str=True)   # each dataclass schema carries it (else it resets it)
_SCALARS: dict[tp.Any, CoreSchema] = {
    str: cs.str_schema(),             # with the config's coerce_numbers_to_str: a number becomes its text
    int: cs.int_schema(strict=True),
    float: cs.float_schema(strict=True),  # strict float still takes an int (and returns a float)
    bool: cs.bool_schema(strict=True),
}


def _none_to_empty_dict(value: tp.Any) -> tp.Any:
    return {} if value is None else value


def _as_list(value: tp.Any) -> tp.Any:
    if value is None:
        return []
    return [value] if isinstance(value, str) else value


def _schema(hint: tp.Any) -> CoreSchema:
    origin, args = tp.get_origin(hint), tp.get_args(hint)
    if origin in (tp.Union, types.UnionType):
        choices = [a for a in args if a is not type(None)]
        inner = (_schema(choices[0]) if len(choices) == 1 else
                 cs.union_schema([_schema(a) for a in choices], custom_error_type="settings_type",
                                 custom_error_message=f"Input should be {type_name(hint)}"))
        return cs.nullable_schema(inner) if len(choices) < len(args) else inner
    if origin is tp.Literal:
        return cs.literal_schema(list(args))
    if origin is list:
        return cs.no_info_before_validator_function(_as_list, cs.list_schema(_schema(args[0])))
    if origin is dict:
        return cs.no_info_before_validator_function(_none_to_empty_dict,
                                                    cs.dict_schema(_SCALARS[str], _schema(args[1])))
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        return cs.no_info_before_validator_function(_none_to_empty_dict, _dataclass_schema(hint))
    if hint not in _SCALARS:
        raise TypeError(f"a settings field of type {hint!r} has no rule in speedslurm.settings.check")
    return _SCALARS[hint]


def _dataclass_schema(cls: type) -> CoreSchema:
    hints = tp.get_type_hints(cls)
    fields = []
    for f in dataclasses.fields(cls):
        schema = _schema(hints[f.name]) if f.metadata != NOT_A_SETTING else cs.any_schema()
        if f.default is not dataclasses.MISSING:
            schema = cs.with_default_schema(schema, default=f.default)
        elif f.default_factory is not dataclasses.MISSING:
            schema = cs.with_default_schema(schema, default_factory=f.default_factory)
        fields.append(cs.dataclass_field(f.name, schema, init=f.metadata != NOT_A_SETTING))
    args = cs.dataclass_args_schema(cls.__name__, fields, extra_behavior="forbid")
    return cs.dataclass_schema(cls, args, [f.name for f in dataclasses.fields(cls)], frozen=True, config=_CONFIG)


@functools.cache
def _validator(cls: type) -> SchemaValidator:
    return SchemaValidator(_dataclass_schema(cls), _CONFIG)


def type_name(hint: tp.Any) -> str:
    """``int``, ``str | None``, ``list[str]``, ``int | 'auto'``: how an error names what a key takes."""
    origin, args = tp.get_origin(hint), tp.get_args(hint)
    if origin in (tp.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is tp.Literal:
        return " | ".join(repr(a) for a in args)
    if isinstance(hint, type):
        return "None" if hint is type(None) else hint.__name__
    return str(hint).replace("typing.", "")


def settings_keys(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.metadata != NOT_A_SETTING]


def build(cls: type[_T], data: dict[str, tp.Any], origins: tp.Mapping[str, str]) -> _T:
    """``data`` (the merged layers) as a ``cls`` instance; any problem is a ConfigError naming its source."""
    try:
        value = tp.cast(_T, _validator(tp.cast(type, cls)).validate_python(data))
    except ValidationError as exc:
        raise _explain(cls, exc, origins) from None
    check_ranges(value, origins)
    return value


@dataclasses.dataclass(frozen=True)
class Range:
    """The values a number setting takes: ``low`` (included, or excluded with ``open_low``) to ``high``."""

    low: float = 0
    high: float | None = None
    open_low: bool = False
    note: str = ""  # what a special value means, e.g. "0: pick a free port"

    def holds(self, value: float) -> bool:
        above = value > self.low if self.open_low else value >= self.low
        return above and (self.high is None or value <= self.high)

    def text(self, whole: bool) -> str:
        kind = "an integer" if whole else "a number"
        if self.high is not None:
            span = f"{kind} from {self.low:g} to {self.high:g}"
        elif self.open_low:
            span = f"{kind} greater than {self.low:g}"
        else:
            span = f"{kind} of at least {self.low:g}"
        return f"{span} ({self.note})" if self.note else span


_PORT = Range(0, 65535, note="0: pick a free port")
_POSITIVE = Range(1)
_ABOVE_ZERO = Range(0, open_low=True)
# A number setting's range, by its dataclass and field name; one not listed here takes 0 or more (a count, a
# size or a number of seconds). Every float must be finite whatever its range (YAML reads .nan and .inf).
RANGES: dict[tuple[str, str], Range] = {
    ("LlamaSettings", "server_port"): _PORT,
    ("LlamaSettings", "rpc_port"): _PORT,
    ("LlamaSettings", "parallel"): _POSITIVE,
    ("LlamaSettings", "max_parallel"): _POSITIVE,
    ("LlamaSettings", "min_ctx_per_slot"): _POSITIVE,
    ("LlamaSettings", "threads"): _POSITIVE,
    ("LlamaSettings", "batch_size"): _POSITIVE,
    ("LlamaSettings", "ubatch_size"): _POSITIVE,
    ("LlamaSettings", "kv_bytes_per_element"): _ABOVE_ZERO,
    ("ClusterSettings", "cpus_per_node"): _POSITIVE,
    ("ClusterSettings", "usable_gib"): _ABOVE_ZERO,
    ("RunSettings", "follower_timeout_s"): _ABOVE_ZERO,
    ("RunSettings", "health_timeout_s"): _ABOVE_ZERO,
    ("RunSettings", "poll_interval_s"): _ABOVE_ZERO,
    ("RunSettings", "outage_s"): _ABOVE_ZERO,
    ("ModelEntry", "ctx"): _POSITIVE,
    ("GatewayModel", "nodes"): _POSITIVE,
    ("GatewayModel", "max_replicas"): _POSITIVE,
    ("GatewayModel", "ctx"): _POSITIVE,
    ("GatewayModel", "slots"): _POSITIVE,
    ("GatewaySettings", "max_replicas"): _POSITIVE,
    ("GatewaySettings", "max_queue"): _POSITIVE,
    ("GatewaySettings", "max_wait_s"): _ABOVE_ZERO,
    ("GatewaySettings", "max_body_bytes"): _POSITIVE,
    ("GatewaySettings", "max_json_depth"): _POSITIVE,
    ("GatewaySettings", "client_timeout_s"): _ABOVE_ZERO,
    ("GatewaySettings", "backend_timeout_s"): _ABOVE_ZERO,
    ("GatewaySettings", "scale_up_queue"): _POSITIVE,
    ("GatewaySettings", "scale_down_use"): Range(0, 1),
    ("ModelArch", "n_layer"): _POSITIVE,
    ("ModelArch", "n_head_kv"): _POSITIVE,
    ("ModelArch", "head_dim"): _POSITIVE,
}
_AT_LEAST_ZERO = Range(0)


def check_ranges(value: tp.Any, origins: tp.Mapping[str, str], prefix: str = "") -> None:
    """Every number in the typed settings ``value`` lies in its :data:`RANGES` entry and is finite, and all text
    is UTF-8; else a :class:`ConfigError` naming the key, where its value came from and the values it takes."""
    if isinstance(value, str):
        _check_text(value, prefix.rstrip("."), origins)
    elif isinstance(value, list):
        for item in value:
            check_ranges(item, origins, prefix)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            if f.metadata == NOT_A_SETTING:
                continue
            item, dotted = getattr(value, f.name), f"{prefix}{f.name}"
            if isinstance(item, (int, float)) and not isinstance(item, bool):
                _check_number(item, dotted, RANGES.get((type(value).__name__, f.name), _AT_LEAST_ZERO), origins)
            else:
                check_ranges(item, origins, dotted + ".")
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_text(str(key), f"{prefix}{key}", origins)
            check_ranges(item, origins, f"{prefix}{key}.")


def _check_text(text: str, dotted: str, origins: tp.Mapping[str, str]) -> None:
    """A byte that is not UTF-8 (from a command line or a variable) arrives as a lone surrogate: refused here,
    not when a job script or a record is written."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        code = ord(text[exc.start])
        what = f"the byte 0x{code - 0xdc00:02x}" if 0xdc80 <= code <= 0xdcff else f"the code point U+{code:04X}"
        raise ConfigError(f"{_source(origins, dotted)}: {dotted.encode('utf-8', 'replace').decode()} holds {what}, "
                          "which is not UTF-8 text",
                          fix="write it as UTF-8 text (check the encoding of the file, terminal or script)") from None


def _check_number(value: float, dotted: str, allowed: Range, origins: tp.Mapping[str, str]) -> None:
    whole = isinstance(value, int)
    if not whole and not math.isfinite(value):
        raise ConfigError(f"{_source(origins, dotted)}: {dotted} must be a finite number, not {shown(value)}",
                          fix=f"set {dotted} to {allowed.text(whole)}")
    if not allowed.holds(value):
        raise ConfigError(f"{_source(origins, dotted)}: {dotted} must be {allowed.text(whole)}, not {shown(value)}",
                          fix=f"set {dotted} to {allowed.text(whole)}")


def _source(origins: tp.Mapping[str, str], dotted: str) -> str:
    """Where ``dotted`` (or, for a section, the values inside it; for a list item, its list) was set."""
    if dotted in origins:
        return origins[dotted]
    inside = next((v for k, v in origins.items() if k.startswith(dotted + ".")), None)
    if inside is not None:
        return inside
    parts = dotted.split(".")
    while parts:
        parts.pop()
        if ".".join(parts) in origins:
            return origins[".".join(parts)]
    return "settings"


def _walk(cls: type, loc: tuple[str | int, ...]) -> tuple[str, str, type, tp.Any]:
    """Follow an error's location through the type hints: (dotted key, dotted key of its section, the
    dataclass of that section, the hint at the location: None where the key is unknown, ``"[key]"`` where a
    mapping's name is wrong rather than its value)."""
    hint: tp.Any = cls
    parts: list[str] = []
    section, section_cls = "", cls
    for part in loc:
        if part == "[key]":  # a name in a mapping (not its value) is wrong
            return ".".join(parts[:-1]), section, section_cls, "[key]"
        choices = [a for a in tp.get_args(hint) if a is not type(None)]
        if tp.get_origin(hint) in (tp.Union, types.UnionType) and len(choices) == 1:
            hint = choices[0]
        if dataclasses.is_dataclass(hint) and isinstance(hint, type):
            section, section_cls = ".".join(parts), hint
            hint = tp.get_type_hints(hint).get(str(part))
            parts.append(str(part))
        elif tp.get_origin(hint) is dict:
            hint = tp.get_args(hint)[1]
            parts.append(str(part))
        elif tp.get_origin(hint) is list:
            hint = tp.get_args(hint)[0]      # an item: named by its list
        else:
            break
    return ".".join(parts), section, section_cls, hint


def shown(value: tp.Any, most: int = 60) -> str:
    """``repr(value)``, cut to about ``most`` characters (a value may be a whole file's worth of text)."""
    try:
        text = repr(value)
    except ValueError:  # an int of more digits than Python converts to text
        return "a number too long to show"
    return text if len(text) <= most else f"{text[:most - 10]}...{text[-6:]} ({len(text)} characters)"


def _explain(cls: type, exc: ValidationError, origins: tp.Mapping[str, str]) -> ConfigError:
    errors = exc.errors()
    first = errors[0]
    dotted, section, section_cls, hint = _walk(cls, first["loc"])
    if first["type"] == "unexpected_keyword_argument":
        where = f" in {section}" if section else ""
        return ConfigError(f"{_source(origins, dotted)}: unknown key '{dotted}'",
                           fix=f"valid keys{where}: {', '.join(settings_keys(section_cls))}")
    if first["type"] == "missing":
        missing = [str(e["loc"][-1]) for e in errors if e["type"] == "missing" and e["loc"][:-1] == first["loc"][:-1]]
        return ConfigError(f"{_source(origins, section)}: {section} lacks required key(s) {', '.join(missing)}",
                           fix=f"add {', '.join(missing)} to that entry")
    src, value = _source(origins, dotted), first["input"]
    if hint == "[key]":
        return ConfigError(f"{_source(origins, f'{dotted}.{value}')}: {dotted} has a name that is not text: {shown(value)}",
                           fix=f"quote the name, e.g. \"{value}\": ...")
    if tp.get_origin(hint) is dict or (dataclasses.is_dataclass(hint) and isinstance(hint, type)):
        entries = tp.get_origin(hint) is dict and dataclasses.is_dataclass(tp.get_args(hint)[1])
        return ConfigError(f"{src}: {dotted} must be a mapping{' of names to entries' if entries else ''}, "
                           f"not {shown(value)}",
                           fix=f"write `{dotted.rpartition('.')[2]}:` followed by `name: {{...}}` lines" if entries
                           else "write it as `key: value` lines")
    expected = type_name(hint)
    return ConfigError(f"{src}: {dotted} must be {expected}, not {shown(value)}",
                       fix=f"set {dotted} to a value of type {expected}")
