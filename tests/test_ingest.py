"""Ingest into block-aligned zarr v3, and the block specs the command line hands it (TileDB and HDF5
outputs: test_origins.py)."""

from __future__ import annotations

import importlib
import math
import pathlib
import re

import numpy as np
import pandas as pd
import pytest
import xarray as xr
import zarr
from hypothesis import given
from hypothesis import strategies as st

from tierscope.errors import StoreError
from tierscope.store import ingest, parse_block_spec

# the package re-exports the function under the module's name: reach the module itself
ingest_module = importlib.import_module("tierscope.store.ingest")

# the reanalysis file's "hours since 1-1-1 00:00:0.0" makes xarray warn while decoding either side
pytestmark = pytest.mark.filterwarnings("ignore:Ambiguous reference date string")


@pytest.fixture(scope="module")
def reanalysis() -> pathlib.Path:
    """Real NCEP/NCAR 500 hPa heights (netCDF3) shipped inside the eofs wheel."""
    eofs = pytest.importorskip("eofs")
    return pathlib.Path(eofs.__file__).parent / "examples" / "example_data" / "hgt_djf.nc"


def _synthetic() -> xr.Dataset:
    """Packed int16 with a fill value, int-encoded datetimes, an auxiliary and a scalar variable."""
    rng = np.random.default_rng(3)
    temp = 280.0 + 5.0 * rng.standard_normal((6, 8, 10))
    temp[0, 0, :3] = np.nan
    return xr.Dataset(
        {
            "temp": (("time", "y", "x"), temp, {"long_name": "air temperature", "units": "K"}),
            "count": (("time", "y", "x"), rng.integers(0, 100, (6, 8, 10)).astype(np.int32)),
            "crs": ((), np.int32(0), {"grid_mapping_name": "latitude_longitude"}),
        },
        coords={
            "time": pd.date_range("2000-01-01", periods=6, freq="6h"),
            "y": np.arange(8.0),
            "x": np.arange(10.0),
            "lat": (("y", "x"), rng.uniform(-90, 90, (8, 10)), {"units": "degrees_north"}),
        },
        attrs={"title": "ingest test", "history": "written by test_ingest"},
    )


PACKED = {"dtype": "int16", "scale_factor": 0.01, "add_offset": 280.0, "_FillValue": -32767}
TIME = {"units": "hours since 2000-01-01", "calendar": "proleptic_gregorian", "dtype": "int32"}


@pytest.fixture(scope="module")
def netcdf4(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    path = tmp_path_factory.mktemp("src") / "packed.nc"
    netcdf_only = {"zlib": True, "complevel": 4, "shuffle": True, "chunksizes": (1, 8, 10)}
    encoding = {"temp": PACKED | netcdf_only, "time": TIME}
    _synthetic().to_netcdf(path, engine="netcdf4", format="NETCDF4", encoding=encoding)
    return path


def _assert_same_decoding(out: pathlib.Path, src: pathlib.Path, **open_kwargs) -> None:
    with xr.open_dataset(src, **open_kwargs) as original:
        with xr.open_zarr(out, consolidated=False) as ingested:
            xr.testing.assert_identical(ingested.load(), original.load())


def _chunks(out: pathlib.Path) -> dict[str, tuple[int, ...]]:
    group = zarr.open_group(out, mode="r")
    assert group.metadata.zarr_format == 3
    return {name: group[name].chunks for name in group.array_keys()}


@pytest.mark.parametrize(
    ("block", "z_chunks", "bounds_chunks"),
    [((1, 1, 16, 16), (1, 1, 16, 16), (65, 2)), ({"time": 1}, (1, 1, 29, 49), (1, 2))],
)
def test_reanalysis_round_trips(reanalysis, tmp_path, block, z_chunks, bounds_chunks) -> None:
    out = ingest(reanalysis, tmp_path / "hgt.zarr", block)
    assert out == tmp_path / "hgt.zarr"
    _assert_same_decoding(out, reanalysis)
    chunks = _chunks(out)
    assert chunks["z"] == z_chunks
    assert chunks["bounds_time"] == bounds_chunks
    assert chunks["time"] == (65,) and chunks["latitude"] == (29,)  # dimension coords: one chunk
    with xr.open_dataset(reanalysis, decode_cf=False) as raw:  # stored raw, attributes as-is
        stored = zarr.open_group(out, mode="r")
        np.testing.assert_array_equal(stored["z"][...], raw.z.values)
        assert dict(stored["time"].attrs) == raw.time.attrs
        assert dict(stored["z"].attrs) == raw.z.attrs
    with xr.open_zarr(out, consolidated=False) as ingested:
        assert ingested.time.dtype.kind == "M" and ingested.z.data.chunksize == z_chunks


@pytest.mark.parametrize(("block", "temp_chunks"), [((1, 4, 4), (1, 4, 4)), ({"x": 5}, (1, 8, 5))])
def test_packed_netcdf4_round_trips_raw(netcdf4, tmp_path, block, temp_chunks) -> None:
    out = ingest(netcdf4, tmp_path / "packed.zarr", block)
    _assert_same_decoding(out, netcdf4)
    stored = zarr.open_group(out, mode="r")
    assert stored["temp"].dtype == np.int16 and stored["temp"].chunks == temp_chunks
    assert {k: stored["temp"].attrs[k] for k in ("scale_factor", "add_offset", "_FillValue")} == {
        "scale_factor": 0.01,
        "add_offset": 280.0,
        "_FillValue": -32767,
    }
    assert (stored["temp"][0, 0, :3] == -32767).all()
    assert stored["time"].dtype == np.int32
    assert dict(stored["time"].attrs) == {k: v for k, v in TIME.items() if k != "dtype"}
    assert stored["lat"].chunks == ((8, 10) if isinstance(block, tuple) else (8, 5))
    assert stored["crs"].shape == () and dict(stored["crs"].attrs) == dict(_synthetic().crs.attrs)
    for netcdf_key in ("zlib", "complevel", "shuffle", "chunksizes", "contiguous", "source"):
        assert netcdf_key not in stored["temp"].attrs
    with xr.open_zarr(out, consolidated=False) as ingested:
        assert np.isnan(ingested.temp.values[0, 0, :3]).all()
        assert "lat" in ingested.coords and ingested.attrs == _synthetic().attrs


def test_streams_in_pieces_aligned_to_blocks(netcdf4, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(ingest_module, "PIECE_BYTES", 64)  # force many dask pieces
    out = ingest(netcdf4, tmp_path / "pieces.zarr", (1, 2, 3))
    _assert_same_decoding(out, netcdf4)
    assert _chunks(out)["temp"] == (1, 2, 3)


@given(
    st.lists(st.tuples(st.integers(0, 40), st.integers(1, 12)), min_size=0, max_size=4),
    st.sampled_from([1, 2, 4, 8]),
    st.integers(1, 4096),
)
def test_pieces_are_block_multiples(dims, itemsize, budget) -> None:
    shape = tuple(n for n, _ in dims)
    block = tuple(max(1, min(b, n)) for n, b in dims)
    original = ingest_module.PIECE_BYTES
    ingest_module.PIECE_BYTES = budget
    try:
        piece = ingest_module._piece(shape, block, itemsize)
    finally:
        ingest_module.PIECE_BYTES = original
    for p, b, n in zip(piece, block, shape, strict=True):
        assert p >= 1 and (p % b == 0 or p == max(n, 1))
    if itemsize * math.prod(block) <= budget:
        assert itemsize * math.prod(piece) <= budget


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_zarr_inputs_round_trip(tmp_path, zarr_format: int) -> None:
    src = tmp_path / f"v{zarr_format}.zarr"
    data = _synthetic().drop_vars("crs")
    encoding = {"temp": PACKED, "time": TIME}
    data.to_zarr(src, zarr_format=zarr_format, consolidated=zarr_format == 2, encoding=encoding)
    out = ingest(src, tmp_path / "out.zarr", {"time": 2, "x": 5})
    _assert_same_decoding(out, src, engine="zarr", consolidated=False)
    chunks = _chunks(out)
    assert chunks["temp"] == (2, 8, 5) and chunks["lat"] == (8, 5) and chunks["time"] == (6,)
    assert zarr.open_group(out, mode="r")["temp"].dtype == np.int16


def test_string_labels_become_variable_length_utf8(tmp_path) -> None:
    src = tmp_path / "labels.nc"
    xr.Dataset(
        {"v": (("station", "time"), np.arange(6.0).reshape(2, 3))},
        coords={"station": ["north", "south"], "name": ("station", ["a", "bc"])},
    ).to_netcdf(src, engine="netcdf4")
    out = ingest(src, tmp_path / "labels.zarr", {"time": 1})
    _assert_same_decoding(out, src)
    stored = zarr.open_group(out, mode="r")
    assert str(stored["name"].metadata.data_type.to_json(zarr_format=3)) == "string"
    assert stored["v"].chunks == (2, 1)


def test_missing_source_is_a_store_error(tmp_path) -> None:
    missing = tmp_path / "nowhere.nc"
    with pytest.raises(StoreError, match=re.escape(str(missing))) as caught:
        ingest(missing, tmp_path / "out.zarr", (1, 1, 1))
    assert isinstance(caught.value, OSError)
    assert not (tmp_path / "out.zarr").exists()


def test_unreadable_source_is_a_store_error(tmp_path) -> None:
    garbage = tmp_path / "garbage.nc"
    garbage.write_bytes(b"this is not a dataset\n" * 10)
    with pytest.raises(StoreError, match=re.escape(str(garbage))):
        ingest(garbage, tmp_path / "out.zarr", (1, 1, 1))


@pytest.mark.parametrize("fmt", ["ZARR", "netcdf", ""])
def test_unsupported_format(reanalysis, tmp_path, fmt: str) -> None:
    message = f"output format {fmt!r} is not supported; supported: zarr, tiledb, hdf5"
    with pytest.raises(ValueError, match=re.escape(message)):
        ingest(reanalysis, tmp_path / "out", (1, 1, 16, 16), fmt=fmt)
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_overwrite(reanalysis, tmp_path) -> None:
    out = ingest(reanalysis, tmp_path / "hgt.zarr", {"time": 1})
    with pytest.raises(FileExistsError, match=re.escape(str(out))):
        ingest(reanalysis, out, (1, 1, 16, 16))
    ingest(reanalysis, out, {"latitude": 16}, overwrite=True)
    assert _chunks(out)["z"] == (1, 1, 16, 49)
    _assert_same_decoding(out, reanalysis)
    with pytest.raises(ValueError, match="refusing to overwrite the source"):
        ingest(out, out, {"time": 1}, overwrite=True)


@pytest.mark.parametrize(
    ("block", "message"),
    [
        ((1, 0, 16, 16), "block must be a non-empty sequence of positive ints"),
        ((), "block must be"),
        ({"time": -1}, "block sizes must be"),
        ({"time": 1.5}, "block sizes must be"),
        ({"": 1}, "non-empty strings"),
        ({"level": 1}, "block names unknown dimension(s) ['level']"),
        ((1, 16, 16), "has 3 sizes but no variable has as many dims"),
    ],
)
def test_invalid_blocks(reanalysis, tmp_path, block, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        ingest(reanalysis, tmp_path / "out.zarr", block)
    assert not (tmp_path / "out.zarr").exists()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1,64,64,64", (1, 64, 64, 64)),
        (" 1 , 64,64 ,\t64 ", (1, 64, 64, 64)),
        ("128", (128,)),
        ("time=1,z=64,y=64,x=64", {"time": 1, "z": 64, "y": 64, "x": 64}),
        (" time = 2 ,x=8 ", {"time": 2, "x": 8}),
    ],
)
def test_parse_block_spec(text: str, expected) -> None:
    assert parse_block_spec(text) == expected
    assert type(parse_block_spec(text)) is type(expected)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "expected e.g. '1,64,64,64'"),
        ("   ", "expected e.g."),
        ("1,,2", "expected e.g."),
        ("1,2,", "expected e.g."),
        ("0,64", "size '0' is not a positive integer"),
        ("1,-64", "size '-64' is not a positive integer"),
        ("1,6.4", "size '6.4' is not a positive integer"),
        ("1,1_0", "size '1_0' is not a positive integer"),
        ("1,abc", "size 'abc' is not a positive integer"),
        ("time=1,64", "mixes plain sizes and name=size entries"),
        ("time=0", "size '0' is not a positive integer"),
        ("time=", "size '' is not a positive integer"),
        ("x=1=2", "size '1=2' is not a positive integer"),
        ("=4", "empty dimension name"),
        ("time=1, time=2", "duplicate dimension 'time'"),
    ],
)
def test_parse_block_spec_rejects(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(f"invalid block spec {text!r}: {message}")):
        parse_block_spec(text)


_SPACE = st.sampled_from(["", " ", "  ", "\t"])
_NAME = st.text(st.sampled_from("abcxyzT_0123456789"), min_size=1, max_size=8)


@given(st.lists(st.tuples(_SPACE, st.integers(1, 10**6), _SPACE), min_size=1, max_size=6))
def test_parse_block_spec_round_trips_sizes(entries) -> None:
    text = ",".join(f"{a}{size}{b}" for a, size, b in entries)
    assert parse_block_spec(text) == tuple(size for _, size, _ in entries)


@given(st.dictionaries(_NAME, st.integers(1, 10**6), min_size=1, max_size=5), _SPACE)
def test_parse_block_spec_round_trips_names(spec: dict[str, int], space: str) -> None:
    text = ",".join(f"{space}{name}{space}={space}{size}{space}" for name, size in spec.items())
    assert parse_block_spec(text) == spec


@given(st.text(alphabet=st.sampled_from("0123456789-=,. xtz\t٣"), max_size=20))
def test_parse_block_spec_only_raises_value_error(text: str) -> None:
    try:
        spec = parse_block_spec(text)
    except ValueError as error:
        assert str(error).startswith(f"invalid block spec {text!r}")
    else:
        sizes = spec.values() if isinstance(spec, dict) else spec
        assert sizes and all(isinstance(s, int) and s > 0 for s in sizes)
