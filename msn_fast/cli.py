"""Typed dotted overrides for the config: `--optim.lr 5e-4`, `--data.path=DIR`, `--data.global_scale 0.2 0.9`.

A small parser rather than a CLI library, so every mistake is reported as ONE line that names the
flag (an unknown option gets a "did you mean"), and `--help` lists every field with its type,
default and the docstring written under it in config.py.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import sys
import types
import typing

from .config import Config, section_fields


class UsageError(ValueError):
    """Bad command line or input; reported as one line, without a traceback."""


def _fields(cfg: Config) -> dict[str, tuple[object, str, type]]:
    """'section.name' -> (section object, field name, resolved type); plus top-level scalars as 'name'."""
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            hints = typing.get_type_hints(type(value))
            for g in section_fields(value):
                out[f"{f.name}.{g.name}"] = (value, g.name, hints[g.name])
        else:
            out[f.name] = (cfg, f.name, typing.get_type_hints(type(cfg))[f.name])
    return out


def _coerce(flag: str, tp, values: list[str]):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        if len(values) == 1 and values[0].lower() in ("none", "null"):
            return None
        tp = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is tuple:
        parts = values[0].split(",") if len(values) == 1 else values
        if len(parts) != len(args):
            raise UsageError(f"{flag} takes {len(args)} values; got {' '.join(values)!r}")
        return tuple(_coerce(flag, a, [p]) for a, p in zip(args, parts))
    if len(values) != 1:
        raise UsageError(f"{flag} takes one value; got {' '.join(values)!r}")
    v = values[0]
    if tp is bool:
        if v.lower() in ("1", "true", "yes", "on"):
            return True
        if v.lower() in ("0", "false", "no", "off"):
            return False
        raise UsageError(f"{flag} expects true or false; got {v!r}")
    try:
        return tp(v)
    except ValueError:
        raise UsageError(f"{flag} expects {tp.__name__}; got {v!r}") from None


def apply_overrides(cfg: Config, argv: list[str]) -> Config:
    """Return `cfg` with the `--section.field value...` flags of argv applied and re-validated."""
    fields = _fields(cfg)
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise UsageError(f"unexpected argument {arg!r} (options look like --optim.lr 5e-4)")
        key, _, inline = arg[2:].partition("=")
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f"; did you mean --{close[0]}?" if close else "; see --help"
            raise UsageError(f"unknown option --{key}{hint}")
        values = [inline] if inline else []
        i += 1
        while not inline and i < len(argv) and not argv[i].startswith("--"):
            values.append(argv[i])
            i += 1
        if not values:
            raise UsageError(f"--{key} needs a value")
        obj, name, tp = fields[key]
        setattr(obj, name, _coerce(f"--{key}", tp, values))
    try:  # rebuild every section so the __post_init__ checks see the overridden values
        sections = {f.name: dataclasses.replace(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)
                    if dataclasses.is_dataclass(getattr(cfg, f.name))}
        return dataclasses.replace(cfg, **sections)
    except (TypeError, ValueError) as e:
        raise UsageError(str(e)) from None


@functools.cache
def _module_docstrings(module_name: str) -> dict[str, str]:
    """'Class.field' -> the string literal written under the field, for the classes of a module's source."""
    tree = ast.parse(inspect.getsource(sys.modules[module_name]))
    docs = {}
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
        body = cls.body
        for a, b in zip(body, body[1:]):
            if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant):
                docs[f"{cls.name}.{a.target.id}"] = str(b.value.value).strip()
    return docs


def _field_doc(cls: type, name: str) -> str | None:
    """The docstring of field `name` of `cls`, found where it is declared: in config.py, or for DataConfig's view
    fields in dataloading/recipe.py (ViewRecipe, its base)."""
    for klass in cls.__mro__:
        if klass is not object and klass.__module__ in sys.modules:
            doc = _module_docstrings(klass.__module__).get(f"{klass.__name__}.{name}")
            if doc:
                return doc
    return None


def help_text(cfg: Config, prog: str, summary: str) -> str:
    lines = [f"usage: {prog} [--model NAME] [--section.field VALUE ...]", "", summary, "",
             "options (defaults are those of the chosen --model recipe):"]
    for key, (obj, name, tp) in _fields(cfg).items():
        value = getattr(obj, name)
        shown = " ".join(map(str, value)) if isinstance(value, tuple) else value
        tname = getattr(tp, "__name__", str(tp)).replace("typing.", "")
        lines.append(f"  --{key} {tname.upper() if isinstance(tp, type) else tname}  (default: {shown})")
        doc = _field_doc(type(obj), name)
        if doc:
            lines.append(f"      {doc}")
    return "\n".join(lines)
