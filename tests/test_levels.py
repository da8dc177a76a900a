"""Levels: every level read through tierscope equals xarray's coarsen(...).mean() of level 0, for stored
levels (zarr, TileDB, HDF5; written by pyramid and by ingest --levels), for the real eofs reanalysis, and
for sample:// datasets; over HTTP and in process; plus the OME-Zarr metadata and the errors."""

from __future__ import annotations

import importlib
import json
import pathlib
import shutil
import time
import urllib.error
import urllib.request
from contextlib import closing

import numpy as np
import pytest
import xarray as xr
import zarr

import tierscope
from tierscope.cli import main
from tierscope.client.source import Source
from tierscope.errors import DatasetNotFoundError, StoreError
from tierscope.coarsen_kernel import window_sums
from tierscope.levels import _divided, coarsen_block, coarsen_levels, level_info, window_layout
from tierscope.server import BlockService, ServerThread
from tierscope.store import ingest, pyramid, write_sample
from tierscope.store.origin import open_origin

# the reanalysis file's "hours since 1-1-1 00:00:0.0" makes xarray warn while decoding either side
pytestmark = pytest.mark.filterwarnings("ignore:Ambiguous reference date string")

SHAPE, BLOCK = (2, 12, 20, 19), (1, 4, 8, 8)  # 19: partial windows at the far edge of x
SAMPLE_SPACE = ("z", "y", "x")
EOFS_SPACE = ("pressure", "latitude", "longitude")
STORES = ("pz", "iz", "it", "ih")  # pyramid on a zarr sample; ingest --levels to zarr, TileDB, HDF5


def _coarsened(ds: xr.Dataset, k: int, space: tuple[str, ...]) -> xr.Dataset:
    """The definition levels must meet: xarray's own coarsen of level 0."""
    return ds.coarsen({d: 2**k for d in space}, boundary="pad").mean() if k else ds


@pytest.fixture(scope="module", autouse=True)
def local_tiers():
    """Blocks go through this process's L1/L2, so levels sharing a block index must not share a key."""
    tierscope.connect(None, l1="32MiB", l2="64MiB")


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pathlib.Path]:
    data = tmp_path_factory.mktemp("levels")
    sample = write_sample(data / "sample.zarr", SHAPE, BLOCK, ("u", "p"), seed=2)
    shutil.copytree(sample, data / "pz.zarr")
    assert pyramid(data / "pz.zarr") == 3
    built = {"pz": data / "pz.zarr"}
    for name, fmt, suffix in (("iz", "zarr", "zarr"), ("it", "tiledb", "tdb"), ("ih", "hdf5", "h5")):
        built[name] = ingest(sample, data / f"{name}.{suffix}", BLOCK, fmt=fmt, levels=9)
    built["sample"] = sample
    return built


@pytest.fixture(scope="module")
def reference(stores) -> xr.Dataset:
    return xr.open_zarr(stores["sample"], consolidated=False).load()


@pytest.fixture(scope="module")
def server(stores):
    origins = [open_origin(stores[name]) for name in STORES]
    with ServerThread(BlockService(origins, l3="16MiB", l4="16MiB")) as running:
        yield running


@pytest.mark.parametrize("name", STORES)
def test_each_level_equals_coarsened_level0(name, stores, reference):
    for k in range(3):
        with xr.open_dataset(stores[name], engine="tierscope", level=k) as ours:
            assert ours.encoding["tierscope_level"] == k and ours.encoding["tierscope_levels"] == 3
            xr.testing.assert_identical(ours.load(), _coarsened(reference, k, SAMPLE_SPACE))
    with pytest.raises(DatasetNotFoundError, match=r"no level 3: its levels are 0\.\.2"):
        xr.open_dataset(stores[name], engine="tierscope", level=3)


@pytest.mark.parametrize("name", STORES)
def test_stored_levels_describe_what_the_rule_derives(name, stores):
    """Shapes, clipped blocks, coarsened coordinates, attributes: the same for every format."""
    with closing(open_origin(stores[name])) as origin:
        for k in (1, 2):
            level = origin.level(k)
            assert level is origin.level(k) and level.name == f"{name}@{k}" and level.info().levels == 3
            expected = level_info(origin.info(), k, level.name)
            stored, derived = (json.dumps(i.to_json(), sort_keys=True) for i in (level.info(), expected))
            assert stored == derived
        assert level.info().variables["u"].shape == (2, 3, 5, 5)


def test_lossy_levels_stay_within_tol(stores, reference, server):
    tol = 1e-3
    expected = _coarsened(reference, 1, SAMPLE_SPACE)
    for location in (stores["it"], f"{server.url}/datasets/pz"):
        ours = xr.open_dataset(location, engine="tierscope", level=1, tol=tol).load()
        error = np.abs(ours.u.values.astype(np.float64) - expected.u.values)
        assert error.max() <= tol  # exact where the tiers held a level's lossless blocks already


def test_levels_over_http(stores, reference, server):
    for name in STORES:
        for k in range(3):
            ours = xr.open_dataset(f"{server.url}/datasets/{name}", engine="tierscope", level=k).load()
            xr.testing.assert_identical(ours, _coarsened(reference, k, SAMPLE_SPACE))
    named = xr.open_dataset(f"{server.url}/datasets/ih@2", engine="tierscope").load()
    xr.testing.assert_identical(named, _coarsened(reference, 2, SAMPLE_SPACE))
    with urllib.request.urlopen(f"{server.url}/datasets") as response:
        assert json.load(response)["datasets"] == sorted(STORES)  # levels are names, not listed ones
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(f"{server.url}/datasets/pz@3")
    assert error.value.code == 404 and "levels are 0..2" in json.load(error.value)["error"]


def test_a_level_goes_through_the_server_tiers(server):
    """Level 1's raw block stays in L4 (read by the tests before); a new tol encodes it once into L3."""
    transport = Source.parse(f"{server.url}/datasets/pz").level(1).transport()
    tiers = [transport.fetch("pz@1", "u", (0, 0, 0, 0), 0.25).tier for _ in range(2)]
    assert tiers == ["l4", "l3"]


@pytest.mark.parametrize("where", ["http", "embedded"])
def test_open_datatree_children_are_the_levels(where, stores, server):
    location = f"{server.url}/datasets/iz" if where == "http" else stores["iz"]
    tree = xr.open_datatree(location, engine="tierscope")
    try:
        assert list(tree.children) == ["0", "1", "2"] and not tree.dataset.variables
        for k in range(3):
            level = xr.open_dataset(location, engine="tierscope", level=k).load()
            xr.testing.assert_identical(tree[str(k)].to_dataset().load(), level)
    finally:
        tree.close()


def test_ome_zarr_metadata_and_plain_zarr_readers(stores):
    store = stores["pz"]
    ome = zarr.open_group(store, mode="r").attrs["ome"]
    assert ome["version"] == "0.5" and {e["name"] for e in ome["multiscales"]} == {"u", "p"}
    entry = next(e for e in ome["multiscales"] if e["name"] == "u")
    assert [a["type"] for a in entry["axes"]] == ["time", "space", "space", "space"]
    assert [d["path"] for d in entry["datasets"]] == ["u", "1/u", "2/u"]
    assert entry["datasets"][2]["coordinateTransformations"] == [
        {"type": "scale", "scale": [1.0, 4.0, 4.0, 4.0]},
        {"type": "translation", "translation": [0.0, 1.5, 1.5, 1.5]},
    ]
    assert zarr.open_group(store, mode="r")["1/u"].shape == (2, 6, 10, 10)
    plain = xr.open_zarr(store, group="1", consolidated=False).load()
    xr.testing.assert_identical(plain, xr.open_dataset(store, engine="tierscope", level=1).load())
    assert "ome" not in xr.open_dataset(store, engine="tierscope").attrs  # store metadata, not an attribute


@pytest.fixture(scope="module")
def eofs_stores(tmp_path_factory: pytest.TempPathFactory) -> tuple[pathlib.Path, dict[str, pathlib.Path]]:
    """Real NCEP/NCAR 500 hPa heights (netCDF3) shipped inside the eofs wheel, ingested with levels."""
    eofs = pytest.importorskip("eofs")
    src = pathlib.Path(eofs.__file__).parent / "examples" / "example_data" / "hgt_djf.nc"
    out = tmp_path_factory.mktemp("eofs")
    return src, {fmt: ingest(src, out / f"hgt.{fmt}", (1, 1, 16, 16), fmt=fmt, levels=4)
                 for fmt in ("zarr", "tiledb", "hdf5")}


@pytest.mark.parametrize("fmt", ["zarr", "tiledb", "hdf5"])
def test_reanalysis_levels_equal_coarsened_source(fmt, eofs_stores):
    src, stores = eofs_stores
    source = xr.open_dataset(src).load()
    for k in range(3):  # latitude 29 and longitude 49 in blocks of 16: levels 0..2
        ours = xr.open_dataset(stores[fmt], engine="tierscope", level=k).load()
        xr.testing.assert_identical(ours, _coarsened(source, k, EOFS_SPACE))
    assert ours.sizes["latitude"] == 8 and ours.sizes["longitude"] == 13 and ours.sizes["bound"] == 2
    with pytest.raises(DatasetNotFoundError, match=r"levels are 0\.\.2"):
        xr.open_dataset(stores[fmt], engine="tierscope", level=3)


def test_tiledb_levels_are_written_in_pieces_as_large_as_level0s(tmp_path, monkeypatch):
    """Each TileDB write makes a fragment (a directory of files): a coarse level's pieces, a fraction of
    level 0's, are merged up to the piece size before they are written; the values are the rule's."""
    ingest_module = importlib.import_module("tierscope.store.ingest")
    tiledb = pytest.importorskip("tiledb")
    sample = write_sample(tmp_path / "s.zarr", (2, 16, 64, 64), (1, 8, 16, 16), ("u",), seed=4)
    monkeypatch.setattr(ingest_module, "PIECE_BYTES", 2**16)  # level 0 (512 KiB): 8 pieces of 64 KiB
    store = ingest(sample, tmp_path / "s.tdb", (1, 8, 16, 16), fmt="tiledb", levels=2)
    fragments = [len(tiledb.array_fragments(str(store / group / "u"))) for group in ("", "1", "2")]
    assert fragments == [8, 1, 1]  # unmerged: [8, 4, 2] (level 1's 8 pieces regrouped into whole blocks)
    reference = xr.open_zarr(sample, consolidated=False).load()
    for k in range(3):
        ours = xr.open_dataset(store, engine="tierscope", level=k).load()
        xr.testing.assert_identical(ours, _coarsened(reference, k, SAMPLE_SPACE))


def test_reanalysis_levels_over_http(eofs_stores):
    src, stores = eofs_stores
    source = xr.open_dataset(src).load()
    with ServerThread(BlockService([open_origin(stores["zarr"])])) as server:
        tree = xr.open_datatree(f"{server.url}/datasets/hgt", engine="tierscope", tol=0.5)
        for k in range(3):
            expected = _coarsened(source, k, EOFS_SPACE).z.values
            assert np.abs(tree[str(k)].z.values - expected).max() <= 0.5
        tree.close()


SYNTHETIC = [
    ("sample://s?shape=2,16,32,37&block=1,8,8,8&variables=u,p", 4),  # one tile: the whole space
    ("sample://s?shape=2,40,48,72&block=1,8,8,8&variables=u&period=16", 5),  # 2^k divides the period
    ("sample://s?shape=1,40,48,72&block=1,4,4,4&variables=u&period=12", 6),  # ... and does not
]


@pytest.mark.parametrize(("url", "levels"), SYNTHETIC)
def test_synthetic_levels_equal_coarsened_level0(url, levels):
    level0 = xr.open_dataset(url, engine="tierscope").load()
    assert xr.open_dataset(url, engine="tierscope").encoding["tierscope_levels"] == levels
    for k in range(1, levels):
        ours = xr.open_dataset(url, engine="tierscope", level=k).load()
        xr.testing.assert_identical(ours, _coarsened(level0, k, SAMPLE_SPACE))


def test_synthetic_windows_longer_than_the_period_average_the_same_values():
    """256-point windows over a 16-point period: weighted sums over the tile, not a 2^25-point gather
    (xarray's coarsen would pad the two-point z and y axes to 256 too: the means are taken directly)."""
    import math

    from tierscope.store.synthetic_levels import GATHER_LIMIT

    url = "sample://s?shape=1,2,2,5000&block=1,1,1,32&variables=u&period=16"
    with closing(open_origin(url)) as origin:
        level = origin.level(8)
        assert math.prod(axis.gathered for axis in level._axes) > GATHER_LIMIT
        ours = level.read_block("u", (0, 0, 0, 0))
    u = xr.open_dataset(url, engine="tierscope").u.values
    expected = [u[0, :, :, start:start + 256].astype(np.float64).mean() for start in range(0, 5000, 256)]
    np.testing.assert_allclose(ours.ravel(), expected, rtol=1e-6)
    assert ours.shape == (1, 1, 1, 20)


def test_a_synthetic_coarse_block_costs_one_tile():
    """All eight level-1 blocks of a step: one level-0 tile and one coarse tile computed, no more."""
    with closing(open_origin("sample://c?shape=2,64,64,64&block=1,16,16,16&variables=u")) as origin:
        level = origin.level(1)
        for index in level.info().variable("u").grid.indices():
            if index[0] == 0:
                level.read_block("u", index)
        assert origin.tiles.stats.misses == 2


def test_a_huge_synthetic_dataset_reports_its_levels_at_once(server):
    start = time.perf_counter()
    with closing(open_origin("sample://big?shape=10000,1024,2048,2048")) as origin:
        assert origin.info().levels == 6  # 2048 / 2^5 = 64, one default block
        assert origin.level(5).info().variables["u"].shape == (10000, 32, 64, 64)
    assert time.perf_counter() - start < 2
    with closing(open_origin("sample://big?shape=10000,1024,2048,2048&levels=2")) as capped:
        assert capped.info().levels == 3
    with pytest.raises(ValueError, match="levels"):
        open_origin("sample://big?shape=10,64,64,64&levels=-1")


def test_level_argument_errors(stores):
    for level, error in ((-1, ValueError), (1.5, TypeError), ("1", TypeError), (True, TypeError)):
        with pytest.raises(error, match="level"):
            xr.open_dataset(stores["pz"], engine="tierscope", level=level)
    with pytest.raises(DatasetNotFoundError, match="its levels are 0 only"):
        xr.open_dataset(stores["sample"], engine="tierscope", level=1)


def test_pyramid_refuses_and_rebuilds(stores, tmp_path, capsys):
    with pytest.raises(StoreError, match="no such file"):
        pyramid(tmp_path / "missing.zarr")
    assert main(["pyramid", str(tmp_path / "missing.zarr")]) == 2
    assert "no such file" in capsys.readouterr().err
    with pytest.raises(ValueError, match="computes its levels"):
        pyramid("sample://s?shape=1,8,8,8")
    store = shutil.copytree(stores["sample"], tmp_path / "turb.zarr")
    assert main(["pyramid", str(store), "--quiet"]) == 0
    assert "with levels 0..2" in capsys.readouterr().out
    assert main(["pyramid", str(store)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert pyramid(store, levels=1, overwrite=True) == 2
    assert not (store / "2").exists()
    assert len(zarr.open_group(store, mode="r").attrs["ome"]["multiscales"][0]["datasets"]) == 2
    xr.testing.assert_identical(xr.open_dataset(store, engine="tierscope", level=1).load(),
                                xr.open_dataset(stores["pz"], engine="tierscope", level=1).load())
    assert not list(tmp_path.glob(".*"))  # no staging left behind


PIECES = [  # (shape, windows): NumPy sums runs along the last window axis, then adds the runs in order
    ((1, 64, 256, 256), {1: 2, 2: 2, 3: 2}),  # several blocks of runs summed at a time
    ((2, 32, 48, 80), {1: 4, 2: 4, 3: 4}),
    ((1, 16, 32, 64), {1: 8, 2: 8, 3: 8}),
    ((1, 32, 64, 48), {1: 16, 2: 16, 3: 16}),
    ((1, 17, 33, 35), {1: 4, 2: 4, 3: 4}),  # partial windows at every far edge
    ((12, 16, 4), {0: 2, 1: 4, 2: 4}),  # x one window: y and x runs merge into runs of 16
    ((5, 8, 8), {1: 8, 2: 8}),  # ... into runs of 64: NumPy's own loop
    ((10, 6, 2), {0: 2, 1: 2}),  # a last axis kept (bounds): runs of one value
    ((40, 3), {0: 3}),
    ((50,), {0: 32}),
    ((3, 256), {1: 128}),  # the longest run the compiled loop sums
    ((2, 512), {1: 256}),  # ... beyond: NumPy's own (recursive pairwise) loop
    ((4, 4, 6, 4), {0: 2, 1: 2, 2: 2, 3: 2}),  # three window axes before the run's: NumPy's own loop
]


def _same_bits(got: np.ndarray, expected: np.ndarray) -> bool:
    """Equal bit for bit, -0.0 apart from 0.0; NaN equals any NaN (inf - inf has no one sign)."""
    nan = np.isnan(expected)
    return (got.dtype == expected.dtype and got.shape == expected.shape and np.array_equal(np.isnan(got), nan)
            and np.array_equal(got[~nan].view(np.uint8), expected[~nan].view(np.uint8)))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # inf - inf, and float16 overflowing, on both sides
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16, np.complex64])
@pytest.mark.parametrize(("shape", "windows"), PIECES)
def test_a_coarsened_piece_is_xarrays_mean_bit_for_bit(shape, windows, dtype):
    """Without NaN, with some, with windows of NaN only; values over 40 orders of magnitude, zeros of
    both signs (a window of -0.0 only), infinities; and a fill value counted as missing."""
    rng = np.random.default_rng(len(shape) * 100 + sum(windows.values()))
    values = rng.standard_normal(shape) * np.exp(rng.uniform(-20, 20, shape))
    special = rng.integers(0, values.size, values.size // 50)
    values.ravel()[special] = rng.choice([0.0, -0.0, np.inf, -np.inf], special.size)
    values[(slice(0, 2),) * len(shape)] = -0.0
    dims = [f"d{a}" for a in range(len(shape))]
    for nan in (0.0, 0.1, 0.9):
        piece = values.astype(dtype)
        piece[(piece == -999.0) | (rng.random(shape) < nan)] = np.nan  # -999: the fill value below
        expected = xr.Variable(dims, piece).coarsen({dims[a]: w for a, w in windows.items()}, "mean",
                                                    boundary="pad").values
        assert _same_bits(coarsen_block(piece, windows), expected)
        filled = np.where(np.isnan(piece), -999.0, piece).astype(dtype)
        expected = np.where(np.isnan(expected), -999.0, expected).astype(dtype)
        assert _same_bits(coarsen_block(filled, windows, [-999.0]), expected)


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_levels_of_a_block_are_summed_by_the_compiled_loop(k):
    """A level's windows over a 3-D block (with or without a time axis before it) are a layout the
    compiled loop covers, so NumPy's one call per run is never what coarsens a stored level."""
    w = 2**k
    for shape in ((2, 64, 64, 64), (64, 64, 64), (1, 64, 128)):
        axes = {a: w for a, n in enumerate(shape) if n > 1 and (len(shape) < 4 or a > 0)}
        values = np.random.default_rng(k).standard_normal(shape).astype(np.float32)
        total = window_sums(values, window_layout(shape, axes))
        assert total is not None
        expected = np.add.reduce(values.reshape([s for a, n in enumerate(shape)
                                                 for s in (n // axes.get(a, 1), axes.get(a, 1))]),
                                 axis=tuple(range(1, 2 * len(shape), 2)))
        assert _same_bits(total.reshape(expected.shape), expected)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # inf - inf
@pytest.mark.parametrize(("shape", "dims"), [
    ((2, 64, 64, 128), 3),  # one pass: a time step's z, y and x
    ((3, 32, 48), 2),  # y and x only
    ((1, 16, 64, 16), 3),  # x in one window at level 4: NumPy's merged runs, level by level
    ((1, 8, 24, 40), 3),  # windows that do not divide: padded, level by level
])
def test_every_level_of_a_piece_at_once_is_each_level_on_its_own(shape, dims):
    """``coarsen_levels`` (one pass over the piece where it can) equals ``coarsen_block`` per level bit for
    bit: with and without NaN (a level holding one is summed again with its counts) and infinities."""
    rng = np.random.default_rng(sum(shape))
    values = (rng.standard_normal(shape) * np.exp(rng.uniform(-20, 20, shape))).astype(np.float32)
    values.ravel()[rng.integers(0, values.size, 20)] = rng.choice([np.inf, -np.inf, -0.0], 20)
    levels = [{a: 2**k for a in range(len(shape) - dims, len(shape))} for k in range(1, 5)]
    for nan in (0.0, 0.01):
        piece = np.where(rng.random(shape) < nan, np.nan, values).astype(np.float32)
        for got, axes in zip(coarsen_levels(piece, levels), levels, strict=True):
            assert _same_bits(got, coarsen_block(piece, axes))


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_whole_windows_divide_in_the_values_own_type_as_xarray_does_in_float64(dtype):
    """``coarsen_levels`` divides whole windows' sums by their power-of-two count in the values' type;
    xarray divides in float64 and rounds back: the same bits, down to quotients that are subnormal."""
    info = np.finfo(dtype)
    rng = np.random.default_rng(3)
    mantissas = rng.integers(1, 2**info.nmant, 4096).astype(np.float64)
    values = np.concatenate([
        info.smallest_subnormal * np.arange(1, 4097),  # quotients that round below the subnormals' step
        mantissas * 2.0**(info.minexp - info.nmant) * rng.integers(1, 64, 4096),  # across the normal edge
        rng.standard_normal(4096) * np.exp(rng.uniform(-10, 10, 4096)),
        [info.max, -info.max, np.inf, -np.inf, 0.0, -0.0],
    ]).astype(dtype)
    # 12: a count no whole window has; 2**25 and 2**40: windows whose 1 / count float16 cannot hold
    for count in (2, 8, 64, 512, 4096, 12, 2**25, 2**40):
        expected = np.true_divide(values, np.intp(count)).astype(dtype)
        assert _same_bits(_divided(values.copy(), count), expected)
    piece = values[:8 * 8 * 64].reshape(8, 8, 64)
    levels = [{a: 2**k for a in range(3)} for k in (1, 2, 3)]
    for got, axes in zip(coarsen_levels(piece, levels), levels, strict=True):
        assert _same_bits(got, coarsen_block(piece, axes))


def test_a_coarsened_integer_piece_is_the_first_of_each_window():
    piece = np.arange(2 * 9 * 10, dtype=np.int16).reshape(2, 9, 10)
    np.testing.assert_array_equal(coarsen_block(piece, {1: 4, 2: 4}), piece[:, ::4, ::4])
