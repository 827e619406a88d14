"""The one config path: params.yaml -> typed dataclasses, with an error naming the key for every mistake.

params.yaml is the one source of values: a key missing from a section is an error (a dataclass default never
applies silently), an unknown key is an error naming the nearest known one, and a value of the wrong type is an
error naming the key and the expected type. Each library module owns its section's dataclass (and its checks in
``__post_init__``); this module only knows how to fill one from a mapping.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Mapping, TypeVar

import yaml

from ahl.errors import UserError

T = TypeVar("T")


class _Loader(yaml.SafeLoader):
    """YAML 1.2 floats: ``lr: 2e-4`` is the float 0.0002 (as DVC reads it), not the string YAML 1.1 makes of it."""


_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789"))


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A params file as a mapping; a missing file, bad YAML or a non-mapping is a UserError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"missing {path}: run stages from the project root, or pass --params PATH")
    try:
        data = yaml.load(path.read_text(), Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as exc:
        raise UserError(f"{path} is not valid YAML: {' '.join(str(exc).split())}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{path} must be a mapping of sections, got {type(data).__name__}")
    return data


def nearest(key: str, known: typing.Iterable[str]) -> str:
    """' (did you mean X?)' for a misspelt key, or ''."""
    match = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""


def check_keys(mapping: Mapping[str, Any], known: typing.Collection[str], where: str) -> None:
    """Unknown keys are an error naming each one, its nearest known key and the known keys of ``where``."""
    unknown = sorted(set(mapping) - set(known))
    if unknown:
        names = ", ".join(f"{where}{k}{nearest(k, known)}" for k in unknown)
        raise UserError(f"params.yaml: unknown key {names}; known keys: {', '.join(sorted(known))}")


def _type_name(annotation: Any) -> str:
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if annotation is type(None):
        return "null"
    if typing.get_origin(annotation) in (list, tuple):
        return f"a list of {_type_name(args[0])}" if args else "a list"
    return getattr(annotation, "__name__", str(annotation))


def _convert(value: Any, annotation: Any, key: str) -> Any:
    """``value`` as ``annotation`` (int -> float, list -> tuple), or a UserError naming ``key``."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(annotation):
            try:
                return _convert(value, option, key)
            except UserError:
                continue
    elif annotation is type(None):
        if value is None:
            return None
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise UserError(f"params.yaml: {key} = {value!r} is not a finite number")
            return float(value)
    elif annotation is int or annotation is bool or annotation is str:
        if isinstance(value, annotation) and not (annotation is int and isinstance(value, bool)):
            return value
    elif origin in (list, tuple):
        if isinstance(value, (list, tuple)):
            (item,) = typing.get_args(annotation)[:1] or (Any,)
            items = [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
            return tuple(items) if origin is tuple else items
    elif annotation is Any:
        return value
    raise UserError(f"params.yaml: {key} = {value!r} is not {_type_name(annotation)}")


def from_params(cls: type[T], section: Any, name: str) -> T:
    """``cls`` filled from the params section ``name``: every field must be given (params.yaml is the one
    source of values), no other key may be; nested dataclasses are sections of their own (``ahl.hadg``)."""
    if not isinstance(section, Mapping):
        raise UserError(f"params.yaml: {name} must be a mapping of keys, got {section!r}")
    hints = typing.get_type_hints(cls)
    fields = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    check_keys(section, fields, f"{name}.")
    missing = [f for f in fields if f not in section]
    if missing:
        raise UserError(
            f"params.yaml: missing key(s) {', '.join(f'{name}.{k}' for k in missing)}; every value is set in "
            f"params.yaml (see the committed params.yaml for the defaults and their meaning)"
        )
    kwargs = {}
    for key in fields:
        hint, value = hints[key], section[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = from_params(hint, value, f"{name}.{key}")
        else:
            kwargs[key] = _convert(value, hint, f"{name}.{key}")
    try:
        return cls(**kwargs)
    except UserError:
        raise
    except (TypeError, ValueError) as exc:
        raise UserError(f"params.yaml: section {name}: {exc}") from None


def to_params(config: Any) -> dict[str, Any]:
    """The inverse of from_params: a dataclass as the plain mapping params.yaml would hold."""
    return dataclasses.asdict(config)


def positive(name: str, value: float) -> None:
    if not value > 0:
        raise UserError(f"params.yaml: {name} must be > 0, got {value!r}")


def at_least(name: str, value: float, low: float) -> None:
    if not value >= low:
        raise UserError(f"params.yaml: {name} must be >= {low}, got {value!r}")


def one_of(name: str, value: Any, choices: typing.Iterable) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise UserError(f"params.yaml: {name} must be one of {', '.join(map(str, choices))}; got {value!r}")
