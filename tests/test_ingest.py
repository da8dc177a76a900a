"""Ingest into block-aligned zarr v3, and the block specs the command line hands it (TileDB and HDF5
outputs: test_origins.py)."""

from __future__ import annotations

import contextlib
import importlib
import math
import os
import pathlib
import re
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator

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


# --- several inputs, the default block, progress ---------------------------------------------------


def _parts(tmp_path: pathlib.Path, time_units: tuple[str, ...] = ("hours since 2000-01-01",) * 3):
    """The synthetic dataset split along time into netCDF files, written out of order."""
    full = _synthetic().drop_vars("crs")
    paths = []
    for i, units in enumerate(time_units):
        part = full.isel(time=slice(2 * i, 2 * i + 2))
        part.attrs["history"] = f"part {i}"  # differs: dropped from the combined attributes
        paths.append(tmp_path / f"part{i}.nc")
        part.to_netcdf(paths[-1], encoding={"temp": PACKED, "time": TIME | {"units": units}})
    return full, paths


@pytest.mark.parametrize("as_glob", [False, True])
def test_several_inputs_combine_by_coords(tmp_path, as_glob: bool) -> None:
    full, paths = _parts(tmp_path)
    src = str(tmp_path / "part*.nc") if as_glob else [paths[2], paths[0], paths[1]]
    out = ingest(src, tmp_path / "all.zarr", {"time": 1, "x": 5})
    combined = xr.open_mfdataset(paths, combine="by_coords", data_vars="minimal", coords="minimal",
                                 compat="override", join="exact", combine_attrs="drop_conflicts")
    with combined, xr.open_zarr(out, consolidated=False) as ingested:
        xr.testing.assert_identical(ingested.load(), combined.load())
        np.testing.assert_array_equal(ingested.time.values, full.time.values)
        assert ingested.attrs == {"title": "ingest test"}
    stored = zarr.open_group(out, mode="r")
    assert stored["temp"].dtype == np.int16 and stored["temp"].chunks == (1, 8, 5)


def test_several_inputs_keep_string_labels_in_memory(tmp_path) -> None:
    paths = [tmp_path / f"labels{i}.nc" for i in range(2)]
    for i, path in enumerate(paths):
        xr.Dataset(
            {"v": (("station", "time"), np.arange(6.0).reshape(2, 3) + 10 * i)},
            coords={"station": ["north", "south"], "name": ("station", ["a", "bc"]),
                    "time": np.arange(3) + 3 * i},
        ).to_netcdf(path, engine="netcdf4")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # labels chunked into dask object arrays make xarray warn
        out = ingest(paths, tmp_path / "labels.zarr", {"time": 1})
    with xr.open_zarr(out, consolidated=False) as ingested:
        assert ingested.name.values.tolist() == ["a", "bc"]
        assert ingested.time.values.tolist() == list(range(6))
    assert str(zarr.open_group(out, mode="r")["name"].metadata.data_type.to_json(zarr_format=3)) == "string"


def test_inputs_that_encode_differently_are_refused(tmp_path) -> None:
    units = ("hours since 2000-01-01", "hours since 2000-01-01", "hours since 1999-12-31")
    _, paths = _parts(tmp_path, units)
    with pytest.raises(ValueError, match=re.escape("encode 'time' differently (units 'hours since "
                                                   "2000-01-01' vs 'hours since 1999-12-31')")):
        ingest(paths, tmp_path / "out.zarr", {"time": 1})
    assert not list(tmp_path.glob("*.zarr")) and not list(tmp_path.glob(".out*"))


def test_a_pattern_that_matches_nothing_is_a_store_error(tmp_path) -> None:
    with pytest.raises(StoreError, match=re.escape(f"cannot read {tmp_path / 'none*.nc'}: no file matches")):
        ingest(str(tmp_path / "none*.nc"), tmp_path / "out.zarr")


def test_default_block_is_time_one_and_the_source_chunks_near_1mib(tmp_path) -> None:
    src = tmp_path / "chunked.nc"
    data = np.zeros((3, 64, 128, 256), np.float32)
    xr.Dataset({"u": (("time", "z", "y", "x"), data), "s": (("time",), np.arange(3.0))}).to_netcdf(
        src, engine="netcdf4", encoding={"u": {"chunksizes": (3, 32, 128, 256)}})  # 4 MiB a step
    chunks = _chunks(ingest(src, tmp_path / "halved.zarr"))
    assert chunks["u"] == (1, 32, 64, 128)  # time 1, the largest sizes halved down to 1 MiB
    assert chunks["s"] == (1,)
    small = tmp_path / "small.nc"
    xr.Dataset({"u": (("time", "z", "y", "x"), data)}).to_netcdf(
        small, engine="netcdf4", encoding={"u": {"chunksizes": (1, 8, 8, 8)}})  # 2 KiB chunks
    assert _chunks(ingest(small, tmp_path / "doubled.zarr"))["u"] == (1, 64, 64, 64)  # doubled to 1 MiB


def test_progress_counts_every_byte_once(netcdf4, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(ingest_module, "PIECE_BYTES", 64)  # many pieces, many reports
    reports: list[tuple[int, int]] = []
    ingest(netcdf4, tmp_path / "p.zarr", (1, 2, 5), progress=lambda *report: reports.append(report))
    with xr.open_dataset(netcdf4, decode_cf=False) as raw:
        streamed = sum(raw[name].nbytes for name in ("temp", "count", "lat", "crs"))
    assert len(reports) > 10
    assert [done for done, _ in reports] == sorted(done for done, _ in reports)
    assert reports[-1] == (streamed, streamed)


# --- where the output goes -------------------------------------------------------------------------

CLI = [sys.executable, "-m", "tierscope"]


def _run(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=300, **kwargs)


def _one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def _tree(path: pathlib.Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_missing_parent_is_an_error_and_is_not_created(netcdf4, tmp_path) -> None:
    out = tmp_path / "missing" / "dir" / "out.zarr"
    _one_line_error(_run("ingest", str(netcdf4), str(out), "--block", "time=1"),
                    f"cannot write {out}: {out.parent} is not an existing directory")
    assert not (tmp_path / "missing").exists()


@contextlib.contextmanager
def _read_only(directory: pathlib.Path) -> Iterator[None]:
    """A directory nobody may write into: mode 555, or, for root (who ignores modes), immutable."""
    if os.geteuid() != 0:
        directory.chmod(0o555)
        try:
            yield
        finally:
            directory.chmod(0o755)
        return
    if subprocess.run(["chattr", "+i", str(directory)], capture_output=True).returncode != 0:
        pytest.skip("running as root without chattr +i: every directory is writable")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(directory)], check=True)


def test_unwritable_directory_is_an_error(netcdf4, tmp_path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    with _read_only(locked):
        result = _run("ingest", str(netcdf4), str(locked / "out.zarr"), "--block", "time=1")
        _one_line_error(result, f"cannot write {locked / 'out.zarr'}: directory {locked} is not writable")
        assert list(locked.iterdir()) == []


def test_output_inside_the_source_is_refused(tmp_path) -> None:
    src = tmp_path / "src.zarr"
    _synthetic().drop_vars("crs").to_zarr(src, zarr_format=3, consolidated=False)
    before = _tree(src)
    inside = src / "temp" / "copy.zarr"
    _one_line_error(_run("ingest", str(src), str(inside), "--block", "time=1"),
                    f"refusing to write {inside} inside the source store {src}")
    assert _tree(src) == before


def test_overwrite_through_a_symlink_replaces_the_store_it_points_at(netcdf4, tmp_path) -> None:
    (tmp_path / "real").mkdir()
    target = ingest(netcdf4, tmp_path / "real" / "store.zarr", (1, 8, 10))
    link = tmp_path / "link.zarr"
    link.symlink_to(target)
    result = _run("ingest", str(netcdf4), str(link), "--block", "1,2,5", "--overwrite", "--quiet")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"wrote {link}\n" and result.stderr == ""
    assert link.is_symlink() and link.resolve() == target
    assert _chunks(target)["temp"] == (1, 2, 5)
    assert sorted(p.name for p in tmp_path.rglob(".*")) == []


# --- interrupts --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slow_source(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """8 MiB in 24 variables that ingest to 1,8,8,8 blocks: 6000 tiny chunks, many seconds of writing
    in pieces that each take well under a second (an interrupt waits for the pieces being written)."""
    path = tmp_path_factory.mktemp("slow") / "slow.nc"
    rng = np.random.default_rng(0)
    shape = (8, 16, 32, 32)
    xr.Dataset({f"v{i}": (("time", "z", "y", "x"), rng.standard_normal(shape, dtype=np.float32))
                for i in range(24)}).to_netcdf(path)
    return path


@pytest.mark.parametrize(("signum", "code", "overwrite"),
                         [(signal.SIGINT, 130, False), (signal.SIGTERM, 143, True)])
def test_an_interrupt_removes_the_partial_and_keeps_the_old_store(
    slow_source, netcdf4, tmp_path, signum: int, code: int, overwrite: bool
) -> None:
    out = tmp_path / "out.zarr"
    if overwrite:
        ingest(netcdf4, out, (1, 8, 10))
    before = _tree(out) if overwrite else None
    command = [*CLI, "ingest", str(slow_source), str(out), "--block", "1,8,8,8", "--quiet"]
    proc = subprocess.Popen([*command, *(["--overwrite"] if overwrite else [])],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob(".out.zarr.partial-*/v*/c")):  # writing blocks
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no partial store appeared"
            time.sleep(0.02)
        proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == code
    assert stderr == f"tierscope ingest: interrupted by {signal.Signals(signum).name}\n" and stdout == ""
    assert list(tmp_path.iterdir()) == ([out] if overwrite else [])
    if overwrite:
        assert _tree(out) == before
