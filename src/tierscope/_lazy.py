"""Lazy exports for a package (PEP 562 module ``__getattr__``): a name is imported from its module on
first use, so importing the package costs none of those modules' imports (optional extras, the server's
aiohttp and codecs in the planner's child process)."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(package: str, names: Mapping[str, str]) -> Callable[[str], Any]:
    """The ``__getattr__`` of ``package`` that takes each of ``names`` (name -> module defining it) from
    its module when first asked for."""

    def __getattr__(name: str) -> Any:
        if name in names:
            return getattr(importlib.import_module(names[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
