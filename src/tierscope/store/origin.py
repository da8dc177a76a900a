"""Origins: where blocks come from before any tier holds them.

An origin reads one stored block of one variable of one dataset. Today: zarr v3 stores written by
``tierscope sample`` / ``tierscope ingest`` (or any block-aligned zarr v3 store xarray wrote).
"""

from __future__ import annotations

import abc
from pathlib import Path

import numpy as np

from tierscope.errors import StoreError
from tierscope.grid import BlockIndex
from tierscope.metadata import DatasetInfo

__all__ = ["Origin", "ZarrOrigin", "dataset_name", "open_origin"]


def dataset_name(path: str | Path) -> str:
    """The name a store is served under: its directory name without the ``.zarr`` suffix."""
    name = Path(path).resolve().name
    return name[: -len(".zarr")] if name.endswith(".zarr") else name


class Origin(abc.ABC):
    """A dataset's source of raw blocks."""

    name: str

    @abc.abstractmethod
    def info(self) -> DatasetInfo:
        """The dataset's description (raw variables, dimension coordinates, attributes)."""

    @abc.abstractmethod
    def read_block(self, variable: str, index: BlockIndex) -> np.ndarray:
        """One whole stored block, raw (not CF-decoded)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release file handles."""


class ZarrOrigin(Origin):
    """A zarr v3 group whose arrays carry xarray's ``dimension_names``."""

    def __init__(self, path: str | Path, name: str | None = None) -> None:
        from xarray.backends.zarr import ZarrStore

        self.path = Path(path)
        self.name = name or dataset_name(path)
        if not self.path.exists():
            raise StoreError(f"cannot open store {str(self.path)!r}: no such file or directory")
        try:
            self._store = ZarrStore.open_group(
                str(self.path), mode="r", zarr_format=3, consolidated=False
            )
            self._info = self._describe()
        except StoreError:
            raise
        except Exception as exc:
            raise StoreError(
                f"cannot open store {str(self.path)!r} as a zarr v3 dataset: {exc}"
            ) from exc

    def _describe(self) -> DatasetInfo:
        from tierscope.metadata import VariableInfo

        variables, coords = {}, {}
        for name, var in self._store.get_variables().items():
            if var.dims == (name,):
                coords[name] = (np.asarray(var.values), dict(var.attrs))
                continue
            block = tuple(var.encoding["chunks"])
            variables[name] = VariableInfo(
                name=name,
                dims=tuple(var.dims),
                shape=tuple(var.shape),
                dtype=np.dtype(var.dtype),
                block=block,
                attrs=dict(var.attrs),
            )
        return DatasetInfo(
            name=self.name, attrs=dict(self._store.get_attrs()), variables=variables, coords=coords
        )

    def info(self) -> DatasetInfo:
        return self._info

    def read_block(self, variable: str, index: BlockIndex) -> np.ndarray:
        var = self._info.variable(variable)
        index = var.grid.check(index)
        try:
            block = self._store.zarr_group[variable].get_block_selection(index)
        except Exception as exc:
            raise StoreError(
                f"reading block {index} of {variable!r} from {str(self.path)!r} failed: {exc}"
            ) from exc
        return np.asarray(block)

    def close(self) -> None:
        self._store.close()


def open_origin(path: str | Path, name: str | None = None) -> Origin:
    """Open a store as an origin, detecting its format."""
    return ZarrOrigin(path, name=name)
