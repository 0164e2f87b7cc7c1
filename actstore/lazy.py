"""Lazy package exports: a package's ``__init__`` lists what it exports and the module each name
comes from; a module is imported when one of its names is first used. Importing a package for
its command line (``--help``) then loads no torch, sklearn or pandas."""
from __future__ import annotations

import importlib
import sys

__all__ = ["lazy_exports"]


def lazy_exports(package: str, table: dict[str, str]):
    """``(__getattr__, __dir__)`` for ``package`` whose names in ``table`` load on first use.

    Parameters
    ----------
    package : str
        The package's ``__name__``.
    table : dict
        Exported name -> the module that defines it: a submodule name ("run", relative to the
        package), a dotted module path ("probes.errors"), or "" for the submodule of that
        name itself.

    Returns
    -------
    tuple of callables
        Assign them to the package's ``__getattr__`` and ``__dir__``.
    """
    def module_of(name: str) -> str:
        where = table[name]
        return where if "." in where else f"{package}.{where}"

    def __getattr__(name: str):
        if name not in table:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        if table[name] == "":
            value = importlib.import_module(f"{package}.{name}")
        else:
            value = getattr(importlib.import_module(module_of(name)), name)
        setattr(sys.modules[package], name, value)     # later uses skip this function
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(table))

    return __getattr__, __dir__
