"""Chunks and coarse levels' layouts written outside zarr's event loop (``zarr_chunks``): the same files
zarr and xarray write, byte for byte."""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr
from zarr.codecs import ShardingCodec

from tierscope.codec.zarr3 import TierscopeZarrCodec
from tierscope.store import ingest, write_sample
from tierscope.store.zarr_chunks import _SyncChunks, chunk_writer, group_like

SHAPE, CHUNKS = (5, 70, 130), (2, 32, 64)  # edge chunks on every axis


def _values(dtype: str = "float32") -> np.ndarray:
    rng = np.random.default_rng(7)
    return np.cumsum(rng.standard_normal(SHAPE), axis=-1).astype(dtype)


def _chunk_files(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _pieces() -> list[tuple[slice, ...]]:
    """Whole-chunk regions as ``da.store`` hands them out, the last reaching the array's end."""
    return [(slice(t, min(t + 2, 5)), slice(0, 64), slice(0, 130)) for t in (0, 2, 4)] + [
        (slice(t, min(t + 2, 5)), slice(64, 70), slice(0, 130)) for t in (0, 2, 4)]


@pytest.mark.parametrize("dtype,fill,kwargs", [
    ("float32", 0.0, {}),
    ("float64", np.nan, {}),
    ("int16", -7, {}),
    ("float32", 0.0, {"serializer": TierscopeZarrCodec(codec="lorenzo", tol=1e-3), "compressors": None}),
])
def test_direct_chunks_equal_zarr_writes_byte_for_byte(tmp_path: Path, dtype: str, fill: float,
                                                       kwargs: dict) -> None:
    values = _values(dtype)
    stores = {}
    for how in ("zarr", "direct"):
        path = tmp_path / f"{how}.zarr"
        group = zarr.open_group(path, mode="w", zarr_format=3)
        array = group.create_array("u", shape=SHAPE, chunks=CHUNKS, dtype=dtype, fill_value=fill, **kwargs)
        target = chunk_writer(array) if how == "direct" else array
        assert isinstance(target, _SyncChunks) == (how == "direct")
        for region in _pieces():
            target[region] = values[region]
        stores[how] = path
    zarr_files, direct_files = _chunk_files(stores["zarr"]), _chunk_files(stores["direct"])
    assert len([key for key in zarr_files if "/c/" in key]) == 3 * 3 * 3
    assert direct_files == zarr_files
    back = zarr.open_array(stores["direct"] / "u", mode="r")[...]
    if kwargs:
        assert float(np.abs(back.astype(np.float64) - values).max()) <= 1e-3
    else:
        np.testing.assert_array_equal(back, values)


def test_regions_not_of_whole_chunks_and_other_dtypes_go_to_zarr(tmp_path: Path) -> None:
    values = _values()
    array = zarr.create_array(tmp_path / "u.zarr", shape=SHAPE, chunks=CHUNKS, dtype="float32", fill_value=0)
    target = chunk_writer(array)
    target[:, :40, :] = values[:, :40, :]  # ends inside a chunk: zarr reads it back and merges
    target[:, 40:, :] = values[:, 40:, :].astype(np.float64)  # zarr casts
    target[0] = values[0] + 1  # not a region of every axis
    values[0] += 1
    np.testing.assert_array_equal(array[...], values)


def test_stores_and_codecs_without_a_synchronous_path_are_written_by_zarr(tmp_path: Path) -> None:
    in_memory = zarr.create_array(zarr.storage.MemoryStore(), shape=SHAPE, chunks=CHUNKS, dtype="float32")
    assert chunk_writer(in_memory) is in_memory
    sharded = zarr.create_array(tmp_path / "s.zarr", shape=SHAPE, chunks=CHUNKS, dtype="float32",
                                shards=(4, 64, 128))
    assert isinstance(sharded.metadata.codecs[0], ShardingCodec)
    assert chunk_writer(sharded) is sharded


def _labelled_source(path: Path, y: np.ndarray) -> Path:
    """A netCDF file with labels and a scalar (a CF grid mapping) beside the data, on the coordinate
    ``y``: floats keep their type at every level, integers' level means are floats."""
    rng = np.random.default_rng(3)
    xr.Dataset(
        {"t": (("time", "y", "x"), rng.standard_normal((2, 20, 24)).astype("float32"), {"units": "K"}),
         "station": (("n",), np.array(["a", "bb"], dtype=object)),
         "crs": ((), np.int32(0), {"grid_mapping_name": "latitude_longitude"})},
        coords={"time": [0.0, 6.0], "y": y, "x": np.linspace(0, 1, 24)},
        attrs={"title": "labelled"},
    ).to_netcdf(path)
    return path


@pytest.mark.filterwarnings("ignore:Ambiguous reference date string")
@pytest.mark.parametrize("source,block,kwargs,derived", [
    ("sample", (1, 4, 8, 8), {}, 2),
    ("sample", (1, 4, 8, 8), {"tol": 0.01}, 2),  # pre-encoded: the codec's settings carried over
    ("eofs", (1, 1, 16, 16), {}, 2),
    ("labels", (1, 8, 8), {}, 2),  # labels and a scalar in the derived groups
    ("integer y", (1, 8, 8), {}, 0),  # the levels' y is float: xarray lays them out
])
def test_levels_laid_out_from_level0_are_what_xarray_writes(tmp_path: Path, monkeypatch, source: str,
                                                            block: tuple, kwargs: dict, derived: int) -> None:
    """Coarse levels whose zarr documents ingest derives from level 0's (``group_like``) are the files
    xarray's own layout gives, byte for byte; a level xarray stores otherwise is laid out by xarray."""
    ingest_module = importlib.import_module("tierscope.store.ingest")
    if source == "sample":
        src = write_sample(tmp_path / "sample.zarr", (2, 12, 20, 19), (1, 4, 8, 8), ("u", "p"), seed=2)
    elif source == "eofs":
        src = Path(pytest.importorskip("eofs").__file__).parent / "examples" / "example_data" / "hgt_djf.nc"
    else:
        y = np.arange(20, dtype="int64") if source == "integer y" else np.linspace(0, 1, 20)
        src = _labelled_source(tmp_path / "labelled.nc", y)
    laid = []

    def counted(*args):
        laid.append(args[1])
        return group_like(*args)

    monkeypatch.setattr(ingest_module, "group_like", counted)
    ours = ingest(src, tmp_path / "ours.zarr", block, levels=9, **kwargs)
    assert len(laid) == derived
    monkeypatch.setattr(ingest_module, "_alike", lambda like, other: False)
    theirs = ingest(src, tmp_path / "theirs.zarr", block, levels=9, **kwargs)
    assert len(laid) == derived
    files = _chunk_files(ours)
    assert len([key for key in files if key.endswith("zarr.json")]) > 10
    assert files == _chunk_files(theirs)
