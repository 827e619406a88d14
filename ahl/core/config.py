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
import unicodedata
from pathlib import Path
from typing import Any, Mapping, TypeVar

import yaml

from ahl.core.errors import UserError

T = TypeVar("T")


class _Loader(yaml.SafeLoader):
    """YAML 1.2 floats: ``lr: 2e-4`` is the float 0.0002 (as DVC reads it), not the string YAML 1.1 makes of it."""


    def construct_mapping(self, node, deep=False):
        """A key given twice in one mapping is refused, as DVC refuses it (PyYAML alone keeps the last value)."""
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: merged below, its keys may repeat
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                if isinstance(key, typing.Hashable) and key in seen:
                    raise DuplicateKey(f"key {key!r} given twice (lines {seen[key]} and {line})")
                if isinstance(key, typing.Hashable):
                    seen[key] = line
        return super().construct_mapping(node, deep=deep)


class DuplicateKey(yaml.YAMLError):
    pass


_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789"))


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A params file as a mapping; a missing file, bad YAML or a non-mapping is a UserError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"missing {path}: run stages from the project root, or pass --params PATH")
    try:
        data = yaml.load(path.read_text(), Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)
    except DuplicateKey as exc:
        raise UserError(f"{path}: {exc}; keep one (DVC refuses the file too)") from None
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


# Characters that separate paths somewhere (/, \\, : on Windows) or look like a slash to a reader (fraction, division
# and fullwidth slashes, the big solidus); names holding one are refused, not interpreted.
SEPARATORS = frozenset("/\\:\u2044\u2215\uff0f\u29f8")


def path_component(name: str, what: str) -> str:
    """``name`` when it can only ever be one file or folder name: not empty, not . or .., no separator, no NUL or
    other control character, no leading or trailing space. ``what`` names it in the error (e.g. "classname")."""
    bad = next((c for c in name if c in SEPARATORS or unicodedata.category(c) == "Cc"), None)
    if not name or name in (".", "..") or bad is not None or name != name.strip():
        why = f"holds {bad!r}" if bad is not None else "is not a name"
        raise UserError(
            f"{what} = {name!r} {why}: it must be one folder name (letters, digits, - _ .), e.g. brick or "
            "my_parts; a dataset elsewhere goes in through data.local"
        )
    return name


def at_least(name: str, value: float, low: float) -> None:
    if not value >= low:
        raise UserError(f"params.yaml: {name} must be >= {low}, got {value!r}")


# Upper bounds of the run-length and batch params (far above the papers': 30-50 epochs of 20 steps of 48), so that
# a typo of a few extra digits is refused in one line instead of training for years or swapping for minutes.
MAX_EPOCHS = 10_000
MAX_STEPS = 100_000
MAX_BATCH = 4_096


def at_most(name: str, value: float, high: float, what: str) -> None:
    if not value <= high:
        raise UserError(f"params.yaml: {name} = {value!r} is above the limit of {high} {what}; lower it")


def run_bounds(section: str, config: Any, epochs=("epochs",), steps=("steps_per_epoch",), batches=("batch_size",)):
    """``section``'s epoch, step and batch params within MAX_EPOCHS, MAX_STEPS and MAX_BATCH."""
    for name in epochs:
        at_most(f"{section}.{name}", getattr(config, name), MAX_EPOCHS, "epochs (the papers: 30-50)")
    for name in steps:
        at_most(f"{section}.{name}", getattr(config, name), MAX_STEPS, "steps (the papers: 20 per epoch)")
    for name in batches:
        at_most(f"{section}.{name}", getattr(config, name), MAX_BATCH, "images per batch (the papers: 48)")


def one_of(name: str, value: Any, choices: typing.Iterable) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise UserError(f"params.yaml: {name} must be one of {', '.join(map(str, choices))}; got {value!r}")
