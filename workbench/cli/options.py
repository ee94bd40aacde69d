"""Command-line options generated from config dataclasses: one source of defaults and help.

:func:`add_config_options` adds one ``--option`` per field of a config (nested configs flattened, or prefixed
with the field name: ``--steering.e2e-steps``); :func:`config_from_args` builds the config back from the parsed
options, starting from a base config (the defaults, or a ``--config`` file) and applying only the options given.
Values are parsed by :func:`workbench.configs.coerce` (lists comma-separated, ``true``/``false``), so a bad value
is one clear error naming the option. Help texts are the comments above (or after) each field in the config's source.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import typing

from ..configs import coerce, field_types, unwrap_optional

_DOC = re.compile(r"^\s*#:?\s?(.*)$")
_FIELD = re.compile(r"^\s*(\w+)\s*:[^#]*?(?:#\s*(.*))?$")


def parse_positive_int(text: str) -> int:
    """``argparse`` type: an int >= 1 (one clear error naming the value otherwise)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int (>= 1), got {value}")
    return value


def field_help(cls) -> dict[str, str]:
    """``{field: help}`` from the comment lines above each field of ``cls`` or its trailing comment."""
    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):
        return {}
    out, pending = {}, []
    for line in lines:
        m = _DOC.match(line)
        if m:
            pending.append(m.group(1))
            continue
        f = _FIELD.match(line)
        if f and (pending or f.group(2)):
            out[f.group(1)] = " ".join(pending + ([f.group(2)] if f.group(2) else []))
        if line.strip():
            pending = []
    return out


def _walk(cls, path: tuple[str, ...] = ()):
    """``(path, type, default)`` of every leaf field of ``cls``, nested configs expanded."""
    inst = cls()
    for name, tp in field_types(cls).items():
        inner, _ = unwrap_optional(tp)
        default = getattr(inst, name)
        if dataclasses.is_dataclass(inner):
            yield from _walk(inner, path + (name,))
        else:
            yield path + (name,), tp, default, cls


def _describe(default) -> str:
    if isinstance(default, (tuple, list)):
        return ",".join(str(x) for x in default)
    return str(default)


#: option string of each generated option's dest, for error messages naming the option the user typed
_OPTION_NAMES: dict[str, str] = {}


def add_config_options(parser: argparse.ArgumentParser, cls, prefix: str = "", flatten: bool = True,
                       skip: typing.Collection[str] = (), group: str | None = None) -> None:
    """Add ``--<prefix><field>`` for every field of ``cls`` (underscores as dashes). Nested configs: their
    fields directly (``flatten``; a nested field whose name an outer option already has gets its full path,
    e.g. ``--steering.decoding.seed`` beside ``--steering.seed``) or as ``--<nested>.<field>``. ``skip``: field paths (``"limit"``,
    ``"selection.batch_size"``, or ``"selection"`` for all its fields) left out."""
    target = parser.add_argument_group(group) if group else parser
    helps: dict = {}
    for path, tp, default, owner in _walk(cls):
        key = ".".join(path)
        if any(key == s or key.startswith(s + ".") for s in skip):
            continue
        helps.setdefault(owner, field_help(owner))
        shown = path[-1] if flatten else key
        opt = "--" + prefix + shown.replace("_", "-")
        if opt in parser._option_string_actions:   # a nested field named like an outer one: its full path
            opt = "--" + prefix + key.replace("_", "-")
        dest = "cfg:" + prefix + key
        _OPTION_NAMES[dest] = opt
        text = helps[owner].get(path[-1], "").replace("%", "%%")
        inner, _ = unwrap_optional(tp)
        if inner is bool:
            target.add_argument(opt, dest=dest, action=argparse.BooleanOptionalAction, default=None,
                                help=f"{text} (default: {default})".strip())
        else:
            meta = "LIST" if typing.get_origin(inner) in (tuple, list) else path[-1].upper()
            target.add_argument(opt, dest=dest, default=None, metavar=meta,
                                help=f"{text} (default: {_describe(default).replace('%', '%%')})".strip())


def config_from_args(cls, args: argparse.Namespace, prefix: str = "", base=None):
    """``base`` (default: ``cls()``) with every option of :func:`add_config_options` that was given applied."""
    cfg = base if base is not None else cls()
    updates: dict = {}
    for path, tp, _, _ in _walk(cls):
        value = getattr(args, "cfg:" + prefix + ".".join(path), None)
        if value is None:
            continue
        dest = "cfg:" + prefix + ".".join(path)
        opt = _OPTION_NAMES.get(dest, "--" + prefix + path[-1].replace("_", "-"))
        updates[path] = coerce(tp, value, opt)
    for path, value in updates.items():
        cfg = _replace(cfg, path, value)
    return cfg


def _replace(cfg, path: tuple[str, ...], value):
    if len(path) == 1:
        return dataclasses.replace(cfg, **{path[0]: value})
    return dataclasses.replace(cfg, **{path[0]: _replace(getattr(cfg, path[0]), path[1:], value)})
