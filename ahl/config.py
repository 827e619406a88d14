"""Build the library's dataclass configs from params.yaml sections, with errors that name the bad key."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Mapping, TypeVar

from ahl.errors import UserError

T = TypeVar("T")


def _check_type(value: Any, annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_check_type(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (list, tuple):
        return isinstance(value, (list, tuple))
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True


def from_params(cls: type[T], section: Mapping[str, Any] | None, name: str, **overrides: Any) -> T:
    """``cls(**section)`` with a clear error for unknown keys and values of the wrong type."""
    section = dict(section or {})
    section.update(overrides)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(section) - set(fields))
    if unknown:
        raise UserError(
            f"params.yaml: unknown key(s) {', '.join(f'{name}.{k}' for k in unknown)}; "
            f"known keys of {name}: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for key, value in section.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint) and isinstance(value, Mapping):
            value = from_params(hint, value, f"{name}.{key}")
        elif not _check_type(value, hint):
            raise UserError(f"params.yaml: {name}.{key} = {value!r} is not a valid {hint}")
        elif hint is float and isinstance(value, int):
            value = float(value)
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except UserError:
        raise
    except (TypeError, ValueError) as exc:
        raise UserError(f"params.yaml: section {name}: {exc}") from None


def positive(name: str, value: float) -> None:
    if value <= 0:
        raise UserError(f"params.yaml: {name} must be > 0, got {value!r}")


def one_of(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise UserError(f"params.yaml: {name} must be one of {', '.join(map(str, choices))}; got {value!r}")
