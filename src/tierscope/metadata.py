"""What a client needs to know about a dataset before it loads any block.

A ``DatasetInfo`` travels as JSON (``GET /datasets/{name}``). Variables are described *raw* — as stored,
before CF decoding — so the client decodes them with xarray's own conventions and gets exactly what
``xr.open_zarr`` would give. Dimension coordinates travel inline (the client needs them to build indexes);
every other variable is served block by block.
"""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tierscope import codec
from tierscope.errors import VariableNotFoundError
from tierscope.grid import BlockGrid

__all__ = ["DatasetInfo", "VariableInfo", "check_tol", "jsonable", "time_axis"]


def jsonable(value: Any) -> Any:
    """Convert attribute values (numpy scalars and arrays, tuples) to JSON-native types."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return [jsonable(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return jsonable(value.item())
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return value


def time_axis(dims: tuple[str, ...]) -> int | None:
    """The time-like axis of ``dims``: one named ``time``/``t``, else the first whose name starts with
    ``time``; None without one."""
    names = [str(d).lower() for d in dims]
    for candidate in ("time", "t"):
        if candidate in names:
            return names.index(candidate)
    return next((i for i, d in enumerate(names) if d.startswith("time")), None)


@dataclass(frozen=True)
class VariableInfo:
    """A block-served variable: raw dtype, dims, shape, block shape and raw (CF-encoded) attributes."""

    name: str
    dims: tuple[str, ...]
    shape: tuple[int, ...]
    dtype: np.dtype
    block: tuple[int, ...]
    attrs: dict[str, Any] = field(default_factory=dict)
    # > 0 for a pre-encoded store (``tierscope ingest --tol``): its blocks are frames within this bound of
    # the original values, so only views with at least this tol can be served from it.
    stored_tol: float = 0.0

    @property
    def grid(self) -> BlockGrid:
        return BlockGrid(self.shape, self.block)

    @property
    def time_axis(self) -> int | None:
        """The time-like axis (a dim named ``time``/``t``, else one whose name starts with ``time``)."""
        return time_axis(self.dims)

    def to_json(self) -> dict[str, Any]:
        return {
            "dims": list(self.dims),
            "shape": list(self.shape),
            "dtype": self.dtype.str,
            "block": list(self.block),
            "attrs": jsonable(self.attrs),
            "stored_tol": self.stored_tol,
        }

    def check_view_tol(self, tol: float) -> None:
        """A view's tol must be at least what the stored frames hold: a tighter one cannot be honoured."""
        if tol < self.stored_tol:
            raise ValueError(
                f"variable {self.name!r} is stored pre-encoded within {self.stored_tol:g} of the original "
                f"values (tierscope ingest --tol); views of it need tol >= {self.stored_tol:g}, got {tol:g}"
            )

    @classmethod
    def from_json(cls, name: str, obj: dict[str, Any]) -> VariableInfo:
        return cls(
            name=name,
            dims=tuple(obj["dims"]),
            shape=tuple(int(s) for s in obj["shape"]),
            dtype=np.dtype(obj["dtype"]),
            block=tuple(int(b) for b in obj["block"]),
            attrs=dict(obj.get("attrs", {})),
            stored_tol=float(obj.get("stored_tol", 0.0)),
        )


def _coord_to_json(values: np.ndarray, attrs: dict[str, Any]) -> dict[str, Any]:
    if values.dtype.kind in "OUST":
        return {"dtype": "str", "values": [str(v) for v in values.tolist()], "attrs": jsonable(attrs)}
    frame = codec.encode(values, 0.0, codec="zstd")
    return {"frame": base64.b64encode(frame).decode("ascii"), "attrs": jsonable(attrs)}


def _coord_from_json(obj: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
    if "frame" in obj:
        values = codec.decode(base64.b64decode(obj["frame"]))
    else:
        values = np.array(obj["values"], dtype=object)
    return values, dict(obj.get("attrs", {}))


@dataclass(frozen=True)
class DatasetInfo:
    """Everything about one dataset except its block data.

    ``levels``: how many resolution levels the dataset has, level 0 (this data) included; level ``k`` is
    served as the dataset ``NAME@k`` (``tierscope.levels``), whose info has the same ``levels``.
    """

    name: str
    attrs: dict[str, Any]
    variables: dict[str, VariableInfo]
    coords: dict[str, tuple[np.ndarray, dict[str, Any]]]  # dimension coordinate -> (raw values, attrs)
    levels: int = 1

    @property
    def dims(self) -> dict[str, int]:
        sizes: dict[str, int] = {name: len(values) for name, (values, _) in self.coords.items()}
        for var in self.variables.values():
            sizes.update(zip(var.dims, var.shape, strict=True))
        return sizes

    def variable(self, name: str) -> VariableInfo:
        try:
            return self.variables[name]
        except KeyError:
            known = ", ".join(sorted(self.variables)) or "none"
            raise VariableNotFoundError(
                f"dataset {self.name!r} has no variable {name!r} (variables: {known})"
            ) from None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dims": self.dims,
            "attrs": jsonable(self.attrs),
            "variables": {k: v.to_json() for k, v in self.variables.items()},
            "coords": {k: _coord_to_json(v, a) for k, (v, a) in self.coords.items()},
            "levels": self.levels,
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> DatasetInfo:
        return cls(
            name=obj["name"],
            attrs=dict(obj.get("attrs", {})),
            variables={k: VariableInfo.from_json(k, v) for k, v in obj["variables"].items()},
            coords={k: _coord_from_json(v) for k, v in obj.get("coords", {}).items()},
            levels=int(obj.get("levels", 1)),
        )


def check_tol(tol: float) -> float:
    """Validate a view's error bound: finite and >= 0 (0 = lossless)."""
    try:
        value = float(tol)
    except (TypeError, ValueError):
        raise ValueError(f"tol must be a number, got {tol!r}") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"tol must be finite and >= 0, got {tol!r}")
    return value
