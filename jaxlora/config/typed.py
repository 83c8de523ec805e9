"""Typed, frozen config sections from nested mappings, and the one ``key.sub=value`` grammar.

A section is a frozen dataclass deriving :class:`Section`. Its annotations are the schema:
``int``, ``float`` (ints accepted), ``str``, ``bool``, ``Literal[...]`` enums, ``X | None``,
``tuple[X, ...]`` (YAML lists, of sections too), ``dict[K, V]`` and nested sections. Values are
coerced and checked in ``__post_init__``, so configs built in Python are checked like those read
from YAML. Every error is a :class:`ConfigError` that names the dotted key.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import re
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal, Union, get_args, get_origin, get_type_hints

import yaml


class ConfigError(ValueError):
    """A recipe or override that cannot become a valid config; the message names the key."""


def check(ok: bool, key: str, msg: str) -> None:
    """Raise ``ConfigError("key: msg")`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{key}: {msg}")


def check_regex(pattern: str, key: str) -> None:
    try:
        re.compile(pattern)
    except re.error as e:
        raise ConfigError(f"{key}: {pattern!r} is not a valid regular expression ({e})") from None


# Range checks for Section._ranges: (predicate, what the message says the value must be).
GT0 = (lambda v: v > 0, "> 0")
GE0 = (lambda v: v >= 0, ">= 0 (0 = off)")
GE1 = (lambda v: v >= 1, ">= 1")
SEED = (lambda v: 0 <= v < 2**63, "in [0, 2**63)")  # numpy's and JAX's seeds are unsigned
UNIT = (lambda v: 0 <= v < 1, "in [0, 1)")


class Section:
    """Base of every config section: coerces each field to its annotation, then checks ranges.

    ``_prefix`` is the section's dotted path (``"lora."``) used in messages; ``_ranges`` maps a
    field to a range check (``None`` values skip it); ``_validate`` holds the other rules.
    """

    _prefix: ClassVar[str] = ""
    _ranges: ClassVar[dict[str, tuple[Callable[[Any], bool], str]]] = {}

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            tp, value = hints[f.name], getattr(self, f.name)
            if dataclasses.is_dataclass(tp):
                check(isinstance(value, tp), self._prefix + f.name, f"expected a {tp.__name__}")
            else:
                object.__setattr__(self, f.name, coerce(value, tp, self._prefix + f.name))
        for name, (ok, allowed) in self._ranges.items():
            value = getattr(self, name)
            check(
                value is None or ok(value), self._prefix + name, f"must be {allowed}; got {value}"
            )
        self._validate()

    def _validate(self) -> None:
        pass


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def fields(cls: type) -> dict[str, Any]:
    """Field name -> resolved annotation, in declaration order."""
    return {f.name: _hints(cls)[f.name] for f in dataclasses.fields(cls)}


def _describe(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(map(str, get_args(tp)))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in get_args(tp))
    if origin is tuple:
        item = _describe(get_args(tp)[0])
        if item.startswith("one of "):  # a list of Literal values
            return "a list, each " + item
        return "a list of " + item.removeprefix("a ").removeprefix("an ") + "s"
    if origin is dict:
        return (
            f"a mapping (keys: {_describe(get_args(tp)[0])}; values: {_describe(get_args(tp)[1])})"
        )
    if dataclasses.is_dataclass(tp):
        return "a mapping"  # its keys are checked one by one
    names = {int: "an integer", float: "a number", str: "a string", bool: "true/false"}
    return names.get(tp, "null")


def coerce(value: Any, tp: Any, key: str) -> Any:
    """``value`` as type ``tp`` (lists -> tuples, ints -> floats); a ConfigError names ``key``."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        for arm in get_args(tp):  # arms are tried in declared order, so `int | float` keeps ints
            try:
                return coerce(value, arm, key)
            except ConfigError:
                pass
    elif origin is Literal:
        if isinstance(value, str) and value in get_args(tp):
            return value
    elif origin is tuple:
        if isinstance(value, list | tuple):
            return tuple(coerce(v, get_args(tp)[0], f"{key}[{i}]") for i, v in enumerate(value))
    elif origin is dict:
        if isinstance(value, dict):
            kt, vt = get_args(tp)
            return {coerce(k, kt, key): coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    elif tp is type(None):
        if value is None:
            return None
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif tp in (int, str, bool):
        if type(value) is tp:
            return value
    elif dataclasses.is_dataclass(tp):  # a section as a list item (e.g. data.sources)
        if isinstance(value, tp):
            return value
        if isinstance(value, dict):
            return _build_item(tp, value, key)
    else:
        raise TypeError(f"config field {key} has an unsupported annotation {tp!r}")
    raise ConfigError(f"{key}: expected {_describe(tp)}; got {value!r}")


def _build_item(cls: type, value: dict, key: str) -> Any:
    """A mapping in a list -> a ``cls`` section; errors name the entry (``data.sources[1]``)."""
    names = list(fields(cls))
    for k in value:
        if k not in names:
            close = difflib.get_close_matches(str(k), names, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"{key}: unknown key '{k}'{hint} (valid keys: {', '.join(names)})")
    try:
        return build(cls, value)
    except ConfigError as e:
        raise ConfigError(f"{key}: {e}") from None


def all_keys(cls: type, prefix: str = "") -> list[str]:
    """Every leaf key of a section tree as a dotted path (``lora.r``, ``train.lr``, ...)."""
    out = []
    for name, tp in fields(cls).items():
        if dataclasses.is_dataclass(tp):
            out += all_keys(tp, f"{prefix}{name}.")
        else:
            out.append(prefix + name)
    return out


def unknown_key_message(key: str, candidates: Sequence[str]) -> str:
    """'unknown key' with the nearest valid key: the same name in another section, else difflib."""
    depth = key.count(".") + 1
    peers = sorted(
        {".".join(c.split(".")[:depth]) for c in candidates if c.count(".") + 1 >= depth}
    )
    leaf = key.rsplit(".", 1)[-1]
    same_leaf = [p for p in peers if p.rsplit(".", 1)[-1] == leaf]
    close = same_leaf or difflib.get_close_matches(key, peers, n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    section = key.rsplit(".", 1)[0] + "." if "." in key else ""
    valid = [p[len(section) :] for p in peers if p.startswith(section)]
    where = f" in {section[:-1]}" if section else ""
    return f"unknown key '{key}'{hint} (valid keys{where}: {', '.join(valid)})"


def _is_mapping(tp: Any) -> bool:
    return get_origin(tp) is dict


class Whole(dict):
    """A mapping-valued field's value given whole (``lora.rank_pattern={}`` on the command
    line): it replaces what the recipe set instead of merging into it."""


def merge(raw: dict, new: Any, cls: type, source: str, prefix: str = "", root: Any = None) -> None:
    """Merge mapping ``new`` into ``raw`` in place, refusing keys that ``cls`` does not have.

    Sub-sections merge recursively, mapping-valued fields key by key (a :class:`Whole` value
    replaces), anything else replaces. ``source`` (a file, an override) starts every error
    message.
    """
    root = root or cls
    if not isinstance(new, dict):
        raise ConfigError(f"{source}: {prefix[:-1] or 'a recipe'} must be a mapping; got {new!r}")
    schema = fields(cls)
    for key, value in new.items():
        if key not in schema:
            raise ConfigError(f"{source}: {unknown_key_message(prefix + str(key), all_keys(root))}")
        tp = schema[key]
        if dataclasses.is_dataclass(tp):
            merge(raw.setdefault(key, {}), value, tp, source, f"{prefix}{key}.", root)
        elif isinstance(value, Whole):
            raw[key] = dict(value)
        elif _is_mapping(tp) and isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key].update(value)
        else:
            raw[key] = value


def build(cls: type, raw: dict, prefix: str = "") -> Any:
    """Nested mapping -> ``cls`` instance. A mapping field with a default merges over it."""
    kwargs = {}
    for f in dataclasses.fields(cls):
        tp = _hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = build(tp, raw.get(f.name, {}), f"{prefix}{f.name}.")
        elif f.name in raw:
            value = raw[f.name]
            if (
                _is_mapping(tp)
                and isinstance(value, dict)
                and f.default_factory is not dataclasses.MISSING
            ):
                value = {**f.default_factory(), **value}  # e.g. mesh.rules: override one axis
            kwargs[f.name] = value
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{prefix}{f.name}: required key is missing")
    return cls(**kwargs)


def _leaf_type(parts: list[str], root: type, text: str) -> tuple[list[str], Any]:
    """Walk ``parts`` down ``root``'s sections; returns the key path (a mapping-valued field keeps
    the rest of the dots as one key) and the annotation of the field it ends at."""
    cls = root
    for i, part in enumerate(parts):
        schema = fields(cls)
        dotted = ".".join(parts[: i + 1])
        if part not in schema:
            raise ConfigError(f"override {text!r}: {unknown_key_message(dotted, all_keys(root))}")
        tp = schema[part]
        if dataclasses.is_dataclass(tp):
            cls = tp
        elif _is_mapping(tp) and i + 1 < len(parts):
            return [*parts[: i + 1], ".".join(parts[i + 1 :])], get_args(tp)[1]
        elif i + 1 < len(parts):
            raise ConfigError(f"override {text!r}: {dotted} is a value, not a section")
    return parts, tp


def _takes_text(tp: Any) -> bool:
    """A field whose value is text (``str``, ``str | None``, ``tuple[str, ...]``)."""
    if get_origin(tp) in (Union, types.UnionType, tuple):
        return str in get_args(tp)
    return tp is str


def parse_override(text: str, root: type) -> dict:
    """``"lora.r=8"`` -> ``{"lora": {"r": 8}}``, keys checked against ``root``, value as YAML.

    The key path stops at a mapping-valued field; the rest, dots included, is one key in it
    (merged into the recipe's mapping); naming the field itself gives its whole value (which
    replaces the recipe's: ``lora.rank_pattern={}`` clears it). A
    text field whose value does not read as YAML text (``prompt=Reverse: a b c`` is a YAML
    mapping, ``model.revision=1234`` an int) takes the characters as written; a value that is
    not YAML at all (``[q_proj``) is an error.
    """
    key, eq, value = text.partition("=")
    parts = key.strip().split(".")
    if not eq or "" in parts:
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    parts, tp = _leaf_type(parts, root, text)
    try:
        nested: Any = yaml.load(value, Loader=Loader)
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"override {text!r}: cannot parse the value as YAML: {problem}") from None
    if _takes_text(tp) and nested is not None and not isinstance(nested, str | list):
        nested = value
    if _is_mapping(tp) and isinstance(nested, dict):  # the key names the whole mapping
        nested = Whole(nested)
    for part in reversed(parts):
        nested = {part: nested}
    return nested


def from_argv(cls: type, argv: Sequence[str], *, repeatable: Sequence[str] = ()) -> Any:
    """``["key=value", ...]`` -> a validated ``cls``: the grammar every jaxlora CLI shares.

    Keys are ``cls``'s fields (dotted into sub-sections); values are read as YAML. A field named
    in ``repeatable`` (a tuple field) collects every occurrence (``prompt=a prompt=b``).
    """
    raw: dict = {}
    for text in argv:
        new = parse_override(text, cls)
        (key,) = new
        if key in repeatable:
            value = new[key]
            raw.setdefault(key, []).extend(value if isinstance(value, list) else [value])
        else:
            merge(raw, new, cls, f"argument {text!r}")
    return build(cls, raw)


def to_plain(value: Any) -> Any:
    """Dataclasses -> dicts, tuples -> lists: what ``yaml.dump`` with :class:`Dumper` writes."""
    if dataclasses.is_dataclass(value):
        return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple | list):
        return [to_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    return value


# YAML with a float resolver that reads `2e-4` as a number (PyYAML follows YAML 1.1, whose floats
# need a dot: "2.0e-4"). The dumper shares it so strings such as "1e5" are quoted on the way out.
_FLOAT = re.compile(
    r"""^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
    |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)


class Loader(yaml.SafeLoader):
    pass


class Dumper(yaml.SafeDumper):
    pass


for _cls in (Loader, Dumper):
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))


def _represent_list(dumper: Dumper, data: list) -> yaml.Node:
    flat = all(not isinstance(x, list | dict) for x in data)  # [q_proj, v_proj] on one line
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flat)


Dumper.add_representer(list, _represent_list)


def read_yaml(path: Path) -> dict:
    """A YAML file that must hold a mapping (an empty file is ``{}``)."""
    try:
        data = yaml.load(path.read_text(), Loader=Loader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: must be a mapping of keys to values; got {type(data).__name__}")
    return data
