"""Config dataclasses as JSON and back: :func:`to_dict`, :func:`from_dict` (nested configs, tuples, unknown keys).

Every stage config, :class:`workbench.pipeline.RunConfig` and the command-line options generated from them
(:mod:`workbench.cli.options`) go through these two functions, so a saved ``config.json`` repeats a run exactly.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Annotated, Any

from .errors import WorkbenchError


@dataclasses.dataclass(frozen=True)
class AtLeast:
    """A lower bound of a numeric config field, ``Annotated[int, AtLeast(1)]``: checked by :func:`coerce`, so a
    config read from JSON or the command line fails before anything runs (``--limit 0``, ``--max-new-tokens -1``)."""

    minimum: float


class OutOfRange(WorkbenchError):
    """A value below its field's :class:`AtLeast` bound."""


#: an int >= 1 (prompt counts, token counts, batch sizes, steps)
PositiveInt = Annotated[int, AtLeast(1)]
#: an int >= 0
NonNegativeInt = Annotated[int, AtLeast(0)]


def to_dict(cfg) -> dict:
    """A config dataclass (nested ones included) as a JSON-able dict; tuples become lists."""
    return dataclasses.asdict(cfg, dict_factory=lambda kv: {k: list(v) if isinstance(v, tuple) else v for k, v in kv})


def field_types(cls) -> dict[str, Any]:
    """``{field name: resolved type}`` of a config dataclass (string annotations resolved)."""
    hints = typing.get_type_hints(cls, include_extras=True)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls) if f.init}


def unwrap_optional(tp) -> tuple[Any, bool]:
    """``(inner type, whether None is allowed)`` of ``X | None`` / ``Optional[X]``; other types unchanged."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        none = len(args) < len(typing.get_args(tp))
        return (args[0] if len(args) == 1 else typing.Union[tuple(args)]), none
    return tp, False


def coerce(tp, value, where: str):
    """``value`` (from JSON or the command line) as type ``tp``: nested configs, tuples, ints, floats, bools."""
    inner, nullable = unwrap_optional(tp)
    if value is None:
        if nullable or inner is Any:
            return None
        raise WorkbenchError(f"{where} may not be null")
    if typing.get_origin(inner) is Annotated:
        base, *extras = typing.get_args(inner)
        value = coerce(base, value, where)
        for bound in extras:
            if isinstance(bound, AtLeast) and value < bound.minimum:
                raise OutOfRange(f"{where} must be >= {bound.minimum:g}, got {value!r}")
        return value
    if dataclasses.is_dataclass(inner):
        if isinstance(value, inner):
            return value
        if not isinstance(value, dict):
            raise WorkbenchError(f"{where} must be an object of {inner.__name__} fields, got {value!r}")
        return from_dict(inner, value, where)
    origin = typing.get_origin(inner)
    if origin in (tuple, list):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise WorkbenchError(f"{where} must be a list, got {value!r}")
        args = [a for a in typing.get_args(inner) if a is not Ellipsis]
        item = args[0] if args else Any
        out = [coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin in (typing.Union, types.UnionType):          # e.g. int | str: the first type that takes it
        for a in typing.get_args(inner):
            try:
                return coerce(a, value, where)
            except OutOfRange:
                raise                     # a number out of its range is not another member's value ("0" is no "auto")
            except WorkbenchError:
                continue
        raise WorkbenchError(f"{where}: {value!r} is none of {typing.get_args(inner)}")
    if inner is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise WorkbenchError(f"{where} must be true or false, got {value!r}")
    if inner in (int, float):
        if isinstance(value, bool):
            raise WorkbenchError(f"{where} must be a number, got {value!r}")
        try:
            num = inner(value)
        except (TypeError, ValueError):
            raise WorkbenchError(f"{where} must be {'an integer' if inner is int else 'a number'}, "
                                 f"got {value!r}") from None
        if inner is int and isinstance(value, float) and value != num:
            raise WorkbenchError(f"{where} must be an integer, got {value!r}")
        return num
    if inner is str:
        if not isinstance(value, str):
            raise WorkbenchError(f"{where} must be a string, got {value!r}")
        return value
    return value


def from_dict(cls, data: dict, where: str | None = None):
    """A ``cls`` config from a dict such as :func:`to_dict` wrote; an unknown key is an error naming it."""
    where = where or cls.__name__
    if not isinstance(data, dict):
        raise WorkbenchError(f"{where} must be an object, got {type(data).__name__}")
    types_ = field_types(cls)
    unknown = sorted(set(data) - set(types_))
    if unknown:
        raise WorkbenchError(f"{where}: unknown field(s) {unknown}; known: {sorted(types_)}")
    return cls(**{k: coerce(types_[k], v, f"{where}.{k}") for k, v in data.items()})
