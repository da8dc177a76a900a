"""Error hierarchy: every tierscope error is a ``TierscopeError`` and also the builtin it refines,
so callers can keep catching ``KeyError``/``ValueError``/``ConnectionError`` as they already do."""

from __future__ import annotations

__all__ = [
    "AuthenticationError",
    "BlockIndexError",
    "DatasetNotFoundError",
    "FrameError",
    "ChecksumError",
    "NotHeldError",
    "ReadCancelledError",
    "ServerUnavailableError",
    "StoreError",
    "TierscopeError",
    "VariableNotFoundError",
]


class TierscopeError(Exception):
    """Base class of tierscope's errors."""


class DatasetNotFoundError(TierscopeError, KeyError):
    """No served dataset has this name."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class VariableNotFoundError(TierscopeError, KeyError):
    """The dataset has no variable of this name."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class BlockIndexError(TierscopeError, IndexError):
    """A block index outside the variable's block grid, or of the wrong length."""


class StoreError(TierscopeError, OSError):
    """A store could not be opened or read."""


class FrameError(TierscopeError, ValueError):
    """Bytes that are not a valid tierscope frame."""


class ChecksumError(FrameError):
    """A frame whose payload does not match its checksum (corrupted in transit or at rest)."""


class ServerUnavailableError(TierscopeError, ConnectionError):
    """The block server could not be reached or answered with an error."""


class AuthenticationError(TierscopeError, PermissionError):
    """The block server refused the request: no valid bearer token (``token=`` or ``TIERSCOPE_TOKEN``)."""


class NotHeldError(TierscopeError):
    """A copies-only read found a block its owner does not hold decoded in L1 (nothing was loaded):
    ``tierscope.dask.direct.copies_only``."""


class ReadCancelledError(TierscopeError):
    """A read was stopped before it finished: a newer progressive view of the same variable replaced
    the one it was loading for (``tierscope.dask.direct.cancellable``)."""
