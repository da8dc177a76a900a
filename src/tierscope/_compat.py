"""Every use of a private dask, distributed or xarray API, in one place.

tierscope leans on a few internals that have no public equivalent (each says why below). Keeping them
here means a new dask or distributed release that changes one breaks one function, found by one test
run: CI runs the Dask integration tests against the oldest and the newest supported releases (the
lower bounds in pyproject.toml are the tested ones; .ci/run).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

# A task type whose ``block_fusion`` keeps dask's array optimisation from fusing block loads into the
# slicing after them (distributed's P2P shuffle does the same): the scheduler plugin must see block keys.
from dask._task_spec import Task
# A lazily materialised layer: a variable of 10^7 blocks must not build a task per block.
from dask.highlevelgraph import Layer, MaterializedLayer
# The values xarray's zarr writer stores for a variable: several zarr groups written by one ``da.store``
# (each ``to_zarr`` optimises its own graph, so a level-0 piece feeding three groups was read three times).
from xarray.backends.zarr import encode_zarr_variable

__all__ = ["Layer", "MaterializedLayer", "Task", "encode_zarr_variable", "keep_from_stealing",
           "send_to_scheduler", "set_handler", "set_stream_handler", "unset_handler"]


def send_to_scheduler(client: Any, msg: dict[str, Any]) -> None:
    """Send ``msg`` on the client's batched stream to the scheduler: no round trip, and in order with the
    graphs the client submits (``Client._send_to_scheduler``; there is no public fire-and-forget call)."""
    client._send_to_scheduler(msg)


def set_stream_handler(server: Any, op: str, handler: Callable[..., Any]) -> None:
    """Handle stream messages ``{"op": op, ...}`` on a scheduler or worker (its handler table)."""
    server.stream_handlers[op] = handler


def set_handler(server: Any, op: str, handler: Callable[..., Any]) -> None:
    """Answer RPC calls of ``op`` on a scheduler or worker (its handler table)."""
    server.handlers[op] = handler


def unset_handler(server: Any, op: str) -> None:
    server.handlers.pop(op, None)


def keep_from_stealing(scheduler: Any, ts: Any) -> None:
    """Take a task off work stealing's lists: it may move a loosely restricted task to any idle worker,
    and there is no public way to exempt one (the stealing extension's internals)."""
    steal = scheduler.extensions.get("stealing")
    if steal is not None:
        steal.remove_key_from_stealable(ts)
        getattr(steal, "unknown_durations", {}).get(ts.prefix.name, set()).discard(ts)
