"""The synthetic sample: layout, determinism, and that it really looks like turbulence."""

from __future__ import annotations

import math
import re
import tracemalloc

import numpy as np
import pytest
import xarray as xr
import zarr

from tierscope.store import write_sample

SHAPE = (3, 16, 24, 32)  # y is not a multiple of the block: its last block is partial
BLOCK = (1, 8, 16, 16)
VARIABLES = ("u", "v", "w", "p")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory):
    return write_sample(tmp_path_factory.mktemp("sample") / "s.zarr", SHAPE, BLOCK, seed=7)


def _arrays(path) -> dict[str, np.ndarray]:
    group = zarr.open_group(path, mode="r")
    return {name: group[name][...] for name in sorted(group.array_keys())}


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def test_layout_is_zarr_v3_chunked_by_block(store) -> None:
    group = zarr.open_group(store, mode="r")
    assert group.metadata.zarr_format == 3
    assert sorted(group.array_keys()) == sorted((*VARIABLES, "time", "z", "y", "x"))
    for name in VARIABLES:
        array = group[name]
        assert (array.shape, array.chunks, array.dtype) == (SHAPE, BLOCK, np.float32)
        assert array.metadata.dimension_names == ("time", "z", "y", "x")


def test_coordinates_and_attributes(store) -> None:
    ds = xr.open_zarr(store, consolidated=False)
    assert ds.time.dtype == np.float64  # simulation seconds, not decoded to datetimes
    np.testing.assert_allclose(ds.time.values, [0.0, 0.1, 0.2])
    assert ds.time.attrs["units"] == "s"
    for dim, n in zip(("z", "y", "x"), SHAPE[1:], strict=True):
        np.testing.assert_allclose(ds[dim].values, np.arange(n) * 2 * math.pi / n)
        assert ds[dim].dtype == np.float64 and ds[dim].attrs["units"] == "m"
        assert ds[dim].values.max() < 2 * math.pi
    assert ds.u.attrs == {"long_name": "x-velocity", "units": "m s-1", "spectrum": "k^-5/3"}
    assert ds.p.attrs == {"long_name": "pressure fluctuation", "units": "Pa", "spectrum": "k^-7/3"}
    assert ds.attrs == {
        "title": "tierscope synthetic turbulence sample",
        "seed": 7,
        "spectrum": "k^-5/3",
        "generator": "tierscope.sample",
    }


def test_values_are_zero_mean_unit_std_and_fields_differ(store) -> None:
    arrays = _arrays(store)
    for name in VARIABLES:
        data = arrays[name]
        assert np.isfinite(data).all()
        assert abs(float(data[0].mean())) < 1e-4  # the k=0 mode is removed
        assert float(data[0].std()) == pytest.approx(1.0, rel=1e-3)
        assert 0.8 < float(data.std()) < 1.2
    for a, b in (("u", "v"), ("u", "w"), ("v", "p")):
        assert abs(_corr(arrays[a][0], arrays[b][0])) < 0.9


def test_same_seed_is_bit_identical_other_seed_differs(store, tmp_path) -> None:
    same = write_sample(tmp_path / "same.zarr", SHAPE, BLOCK, seed=7)
    other = write_sample(tmp_path / "other.zarr", SHAPE, BLOCK, seed=8)
    expected, again, different = _arrays(store), _arrays(same), _arrays(other)
    for name in expected:
        assert np.array_equal(expected[name], again[name])
    for name in VARIABLES:
        assert not np.allclose(expected[name], different[name])
    np.testing.assert_array_equal(expected["x"], different["x"])


def test_field_depends_on_seed_and_name_only(store, tmp_path) -> None:
    alone = write_sample(tmp_path / "alone.zarr", SHAPE, (2, 16, 24, 32), ("v",), seed=7)
    assert zarr.open_group(alone, mode="r")["v"].chunks == (2, 16, 24, 32)
    np.testing.assert_array_equal(_arrays(alone)["v"], _arrays(store)["v"])


def test_time_steps_are_correlated_but_not_identical(store) -> None:
    u = _arrays(store)["u"]
    one, two = _corr(u[0], u[1]), _corr(u[0], u[2])
    assert 0.5 < one < 0.999
    assert two < one


def _spectrum_slope(field: np.ndarray, kmin: int = 3, kmax: int = 12) -> float:
    """Least-squares slope of log E(k) over integer shells of the 3-D energy spectrum."""
    energy = np.abs(np.fft.fftn(field.astype(np.float64))) ** 2
    k = [np.fft.fftfreq(n, 1.0 / n) for n in field.shape]
    kk = np.sqrt(k[0][:, None, None] ** 2 + k[1][None, :, None] ** 2 + k[2][None, None, :] ** 2)
    shells = np.bincount(np.rint(kk).astype(int).ravel(), energy.ravel())
    ks = np.arange(kmin, kmax + 1)
    return float(np.polyfit(np.log(ks), np.log(shells[ks]), 1)[0])


def test_energy_spectrum_follows_kolmogorov(tmp_path) -> None:
    path = write_sample(tmp_path / "cube.zarr", (1, 64, 64, 64), (1, 64, 64, 64), ("u", "p"))
    arrays = _arrays(path)
    velocity, pressure = _spectrum_slope(arrays["u"][0]), _spectrum_slope(arrays["p"][0])
    assert -2.1 < velocity < -1.2  # -5/3, steepened a little by the dissipation cutoff
    assert -2.9 < pressure < -1.9  # -7/3
    assert pressure < velocity


def test_memory_does_not_grow_with_time_steps(tmp_path) -> None:
    def peak(steps: int) -> int:
        tracemalloc.start()
        write_sample(tmp_path / f"t{steps}.zarr", (steps, 32, 64, 64), (1, 32, 64, 64), ("u",))
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return top

    peak(1)  # warm up: lazy imports and caches would count against the first run
    one_step = 32 * 64 * 64 * 4
    short, long = peak(2), peak(24)
    assert long < short + 2 * one_step  # 22 more steps (11 MiB) cost nothing more


def test_existing_output_needs_overwrite(store, tmp_path) -> None:
    with pytest.raises(FileExistsError, match=re.escape(str(store))):
        write_sample(store, SHAPE, BLOCK)
    path = write_sample(tmp_path / "o.zarr", (1, 4, 4, 4), (1, 4, 4, 4), ("u",))
    write_sample(path, (2, 8, 8, 8), (1, 4, 4, 4), ("v",), overwrite=True)
    assert sorted(zarr.open_group(path, mode="r").array_keys()) == ["time", "v", "x", "y", "z"]
    assert zarr.open_group(path, mode="r")["v"].shape == (2, 8, 8, 8)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"shape": (4, 8, 8)}, "shape must have 4 entries"),
        ({"shape": (4, 8, 0, 8)}, "shape must be a non-empty sequence of positive ints"),
        ({"shape": (4, 8, 8.0, 8)}, "shape must be"),
        ({"shape": (True, 8, 8, 8)}, "shape must be"),
        ({"block": (1, 8, 8)}, "block must have 4 entries"),
        ({"block": (1, -8, 8, 8)}, "block must be"),
        ({"variables": ()}, "at least one"),
        ({"variables": ("u", "")}, "non-empty names"),
        ({"variables": ("u", "u")}, "must be unique"),
        ({"variables": ("u", "time")}, "must differ from the dimensions"),
        ({"variables": "uvw"}, "not the string 'uvw'"),
        ({"seed": -1}, "seed must be a non-negative integer"),
    ],
)
def test_invalid_arguments(tmp_path, kwargs: dict, message: str) -> None:
    arguments = {"shape": (2, 8, 8, 8), "block": (1, 8, 8, 8)} | kwargs
    with pytest.raises(ValueError, match=re.escape(message)):
        write_sample(tmp_path / "bad.zarr", **arguments)
    assert not (tmp_path / "bad.zarr").exists()


def test_sample_field_is_what_write_sample_stores(tmp_path):
    from tierscope.store.sample import sample_field

    out = write_sample(tmp_path / "f.zarr", shape=(3, 8, 8, 8), block=(1, 8, 8, 8), variables=("u", "p"),
                       seed=4)
    stored = xr.open_zarr(out, consolidated=False)
    np.testing.assert_array_equal(sample_field((8, 8, 8), "p", seed=4, step=2), stored.p[2].values)



def test_time_coordinate_holds_exact_decimals(tmp_path):
    """``sel(time=0.3)`` finds step 3: the coordinate holds the float nearest 0.3, not 3 * 0.1."""
    written = xr.open_zarr(write_sample(tmp_path / "t.zarr", (20, 8, 8, 8), (1, 8, 8, 8), ("u",)),
                           consolidated=False)
    synthetic = xr.open_dataset("sample://t?shape=20,8,8,8&variables=u", engine="tierscope")
    for ds in (written, synthetic):
        assert ds.time.values.tolist() == [float(f"{i}e-1") for i in range(20)]
        np.testing.assert_array_equal(ds.u.sel(time=0.3).values, ds.u.isel(time=3).values)
        assert ds.sel(time=[0.3, 0.7, 1.9]).time.size == 3
