"""Configs that are also command lines: a frozen dataclass documents each field once (the string
literal under the field), and :func:`add_arguments` turns the fields into argparse options whose
``--help`` is that text. The CLIs build the config with :func:`from_args`; Python callers build
the same dataclass. Per-field CLI details go in ``field(metadata=cli(...))``.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
from functools import lru_cache

__all__ = ["cli", "field_docs", "add_arguments", "from_args"]


def cli(flag: str | None = None, *, aliases=(), metavar: str | None = None, choices=None,
        positional: bool = False, hidden: bool = False, type=None, nargs=None,
        required: bool = False) -> dict:
    """Metadata for one config field: its flag (default ``--field-name``), other spellings,
    metavar, choices, argparse type, whether the command line must give it, or ``hidden``
    (not on the command line)."""
    return {"cli": dict(flag=flag, aliases=tuple(aliases), metavar=metavar, choices=choices,
                        positional=positional, hidden=hidden, type=type, nargs=nargs,
                        required=required)}


@lru_cache(maxsize=None)
def field_docs(cls) -> dict[str, str]:
    """{field name: its docstring} read from the class source (the string literal right after
    each annotated field); {} where the source is unavailable."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue
        body = tree.body[0].body
        for a, b in zip(body, body[1:]):
            if (isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name)
                    and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant)
                    and isinstance(b.value.value, str)):
                docs[a.target.id] = " ".join(b.value.value.split())
    return docs


def _base_type(annotation: str):
    """int / float / str / bool from a string annotation like "int | None"."""
    names = {p.strip() for p in str(annotation).replace("Optional[", "").rstrip("]").split("|")}
    for t in (bool, int, float):
        if t.__name__ in names:
            return t
    return str


def _default_text(value) -> str:
    if value is None or value is False or value == "" or value == ():
        return ""
    if isinstance(value, (tuple, list)):
        value = ",".join(map(str, value))
    return f" (default: {value})"


def add_arguments(parser: argparse.ArgumentParser, cls, *, skip=(), defaults: dict | None = None):
    """Add one option per field of the dataclass ``cls`` (``skip``: fields not on this command
    line; ``defaults``: command-line defaults that differ from the dataclass's)."""
    docs = field_docs(cls)
    defaults = defaults or {}
    for f in dataclasses.fields(cls):
        meta = f.metadata.get("cli", {})
        if f.name in skip or meta.get("hidden"):
            continue
        default = defaults.get(f.name, f.default if f.default is not dataclasses.MISSING
                               else (f.default_factory() if f.default_factory
                                     is not dataclasses.MISSING else None))
        kind = meta.get("type") or _base_type(f.type)
        text = docs.get(f.name, "")
        kw = {"help": (text + ("" if kind is bool else _default_text(default))).replace("%", "%%")}
        if meta.get("choices") is not None:
            kw["choices"] = meta["choices"]
        if meta.get("metavar"):
            kw["metavar"] = meta["metavar"]
        if meta.get("nargs"):
            kw["nargs"] = meta["nargs"]
        if meta.get("required"):
            kw["required"] = True
        if meta.get("positional"):
            parser.add_argument(f.name, type=kind, default=default, **kw)
            continue
        flags = [meta.get("flag") or "--" + f.name.replace("_", "-"), *meta.get("aliases", ())]
        if kind is bool:
            kw["action"] = "store_true" if not default else argparse.BooleanOptionalAction
            kw["default"] = bool(default)
        else:
            kw.update(type=kind, default=default)
        parser.add_argument(*flags, dest=f.name, **kw)


def from_args(cls, args: argparse.Namespace, **overrides):
    """The dataclass ``cls`` from parsed arguments (fields missing from ``args`` keep their
    defaults); ``overrides`` win."""
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in vars(args).items() if k in names}
    values.update(overrides)
    return cls(**values)
