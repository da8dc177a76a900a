"""One event-loop thread per process for tierscope's async I/O, with a synchronous facade.

Block loads run in Dask worker threads (or the notebook's thread); they call ``sync(coro)`` which runs the
coroutine on this loop, so one aiohttp session with keep-alive connections serves every thread. After a
fork the child gets a fresh loop (the parent's thread does not exist there).
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["SyncError", "loop", "sync"]

T = TypeVar("T")

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None


class SyncError(RuntimeError):
    """``sync`` was called from the I/O loop's own thread, which would deadlock."""


def loop() -> asyncio.AbstractEventLoop:
    """The process's I/O loop, started on first use."""
    global _loop
    with _lock:
        if _loop is None:
            new = asyncio.new_event_loop()
            threading.Thread(target=new.run_forever, name="tierscope-io", daemon=True).start()
            _loop = new
        return _loop


def sync(coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
    """Run ``coro`` on the I/O loop and wait for its result."""
    io_loop = loop()
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is io_loop:
        coro.close()
        raise SyncError("tierscope.sync() called from the tierscope I/O loop itself")
    return asyncio.run_coroutine_threadsafe(coro, io_loop).result(timeout)


def _reset_after_fork() -> None:
    global _loop, _lock
    _loop, _lock = None, threading.Lock()


os.register_at_fork(after_in_child=_reset_after_fork)
