"""Attributes in stores whose metadata is not JSON: TileDB metadata and HDF5 attributes.

zarr keeps attributes as JSON, so the zarr origin describes a dataset with JSON-native values. TileDB
and HDF5 store typed values instead, and each loses something on a round trip (TileDB turns ``True``
into ``1`` and cannot hold a list of strings; neither holds ``None``, a dict or an empty list). So that
all three origins describe the same ingested data identically, a value is stored natively only where
it comes back exactly (a string, an int64, a float, a non-empty list of only ints or only floats), and
as JSON text otherwise. The keys kept as JSON, and the store's own bookkeeping (dimension names,
variable order), go in one reserved entry, ``_tierscope``, itself JSON text.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np

from tierscope.errors import StoreError
from tierscope.metadata import jsonable

__all__ = ["RESERVED", "pack", "unpack"]

RESERVED = "_tierscope"
"""The attribute holding tierscope's bookkeeping (JSON text) in TileDB and HDF5 stores."""

_INT64 = np.iinfo(np.int64)


def pack(attrs: Mapping[Any, Any], **bookkeeping: Any) -> dict[str, Any]:
    """Attributes as values TileDB metadata and HDF5 attributes hold exactly, plus the bookkeeping."""
    native: dict[str, Any] = {}
    as_json: list[str] = []
    for key, value in jsonable(dict(attrs)).items():
        if key == RESERVED:
            raise StoreError(f"attribute name {RESERVED!r} is reserved for tierscope's bookkeeping")
        stored = _native(value)
        if stored is None:
            stored = json.dumps(value)
            as_json.append(key)
        native[key] = stored
    native[RESERVED] = json.dumps({**bookkeeping, "json": as_json})
    return native


def unpack(stored: Mapping[str, Any], where: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(attrs, bookkeeping)`` from what ``pack`` wrote; ``where`` names the object in errors."""
    if RESERVED not in stored:
        raise StoreError(f"{where} has no {RESERVED!r} attribute: not written by tierscope ingest")
    try:
        bookkeeping = json.loads(_text(stored[RESERVED]))
        as_json = set(bookkeeping.pop("json"))
        attrs = {
            key: json.loads(_text(value)) if key in as_json else jsonable(value)
            for key, value in stored.items()
            if key != RESERVED
        }
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise StoreError(f"{where} has a corrupt {RESERVED!r} attribute: {exc}") from exc
    return attrs, bookkeeping


def _native(value: Any) -> Any:
    """The value as stored natively, or None where only JSON keeps it exactly."""
    if isinstance(value, str) or _is_int64(value) or isinstance(value, float):
        return value
    if isinstance(value, list) and value:
        if all(_is_int64(v) for v in value):
            return np.array(value, dtype=np.int64)
        if all(isinstance(v, float) for v in value):
            return np.array(value, dtype=np.float64)
    return None


def _is_int64(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and _INT64.min <= value <= _INT64.max


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
