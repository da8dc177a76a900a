"""tierscope's settings: the ``tierscope`` namespace of ``dask.config``, with shipped defaults.

One parser and one set of defaults (``tierscope.yaml``, loaded when tierscope is imported, as distributed
loads ``distributed.yaml``), read by ``connect``, the worker and scheduler plugins, the backend's
transports and ``tierscope serve``. Everything Dask users do to configure Dask works here:
``dask.config.set({"tierscope.l1": "2GiB"})``, YAML files, ``DASK_TIERSCOPE__L1=2GiB``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dask.config
import yaml
from dask.utils import parse_bytes, parse_timedelta

__all__ = ["get", "get_bytes", "get_seconds", "tier_bytes"]

with (Path(__file__).with_name("tierscope.yaml")).open() as _file:
    dask.config.update_defaults(yaml.safe_load(_file))


def get(key: str) -> Any:
    """The setting ``tierscope.<key>`` (dashes or underscores, as dask.config accepts)."""
    return dask.config.get(f"tierscope.{key}")


def get_seconds(key: str) -> float:
    return float(parse_timedelta(get(key), default="seconds"))


def get_bytes(key: str) -> int:
    value = get(key)
    return int(parse_bytes(value) if isinstance(value, str) else value)


def tier_bytes(value: int | float | str, memory_limit: int | None, name: str) -> int:
    """A tier size: bytes (an int or a string like ``"2GiB"``) or a fraction 0 < x < 1 of
    ``memory_limit`` (a worker's, or the machine's memory without one)."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"{name} must be bytes ('2GiB', 2147483648) or a fraction of memory, got {value!r}")
    if isinstance(value, float) and 0 < value < 1:
        from distributed.system import MEMORY_LIMIT

        return int(value * (memory_limit or MEMORY_LIMIT))
    try:
        size = parse_bytes(value) if isinstance(value, str) else int(value)
    except (ValueError, TypeError):
        raise ValueError(f"{name} must be bytes ('2GiB', 2147483648) or a fraction of memory, "
                         f"got {value!r}") from None
    if size < 0:
        raise ValueError(f"{name} must be >= 0 bytes, got {value!r}")
    return size
