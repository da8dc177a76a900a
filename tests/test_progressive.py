"""Progressive views against a real block server and a real LocalCluster: coarse parts first, each equal
to its level's own selection, level 0 last and exact; a newer view cancels an older one; budget_ms."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
import xarray as xr

import tierscope
from tierscope import refine
from tierscope.errors import NotHeldError
from tierscope.refine import stats as progressive_stats
from tierscope.server import BlockService, ServerThread
from tierscope.store.origin import ZarrOrigin

from conftest import GatedOrigin, wait_for

SPACE = ("z", "y", "x")


def _expected(url: str, k: int, isel: dict, tol: float = 0.0) -> xr.DataArray:
    """Level ``k``'s selection as the tests define it: integers // 2**k, slices start // 2**k to
    ceil(stop / 2**k) along the spatial dimensions; time unchanged."""
    w = 2**k
    mapped = {}
    for dim, key in isel.items():
        if dim not in SPACE:
            mapped[dim] = key
        elif isinstance(key, slice):
            mapped[dim] = slice(key.start // w, math.ceil(key.stop / w))
        else:
            mapped[dim] = key // w
    with xr.open_dataset(url, engine="tierscope", level=k, tol=tol) as ds:
        return ds["u"].isel(mapped).load()


def _fetches(client) -> int:
    return tierscope.stats(client)["total"]["fetches"]


def test_parts_come_coarse_to_fine_and_end_exact(client, levels_url):
    isel = {"time": 1, "z": 5, "y": slice(3, 29), "x": slice(0, 32)}
    ds = xr.open_dataset(levels_url, engine="tierscope")
    selection = ds["u"].isel(isel)
    before = progressive_stats()
    parts = list(tierscope.progressive(selection))

    # level 1 (4 blocks) is skipped: more than 1/8 of level 0's 16, it would only delay level 0
    assert [p.encoding["tierscope_level"] for p in parts] == [2, 0]
    assert [p.shape for p in parts] == [(8, 8), (26, 32)]
    for part in parts:
        assert isinstance(part.variable._data, np.ndarray)  # loaded
        k = part.encoding["tierscope_level"]
        xr.testing.assert_identical(part, _expected(levels_url, k, isel))
    xr.testing.assert_identical(parts[-1], selection.compute())
    np.testing.assert_array_equal(parts[-1].values, ds["u"].isel(isel).values)
    after = progressive_stats()
    assert after["views"] - before["views"] == 1 and after["parts"] - before["parts"] == 2
    assert after["blocks"] - before["blocks"] == 1 + 16  # (26, 32) of (8, 8): 4 x 4 at level 0
    assert after["held_views"] == before["held_views"]  # no coarse level between: nothing asked
    # the selection is still lazy: it can be viewed progressively again
    assert [p.encoding["tierscope_level"] for p in tierscope.progressive(selection)] == [2, 0]


def test_a_view_held_in_l1_loads_no_finer_coarse_part_and_one_not_held_does(client, levels_url,
                                                                            monkeypatch):
    """A whole time step: levels 2 (1 block), 1 (4 blocks, 1/8 of level 0's 32: loaded on the way with
    ``CHEAP`` 8) and 0. Beside the first part level 0 is read from copies only (``direct.copies_only``):
    where its owners hold all of it decoded in L1 that is the view's level 0 and level 1 is left out
    (``held_views``); one block short, the owners answer nothing and the view loads as ever."""
    from tierscope.dask import direct

    monkeypatch.setattr(refine, "CHEAP", 8)

    ds = xr.open_dataset(levels_url, engine="tierscope")
    corner = ds["u"].isel(time=0, z=slice(0, 8), y=slice(0, 8), x=slice(0, 8))  # one level-0 block
    whole = ds["u"].isel(time=0)
    before = progressive_stats()
    assert [p.encoding["tierscope_level"] for p in tierscope.progressive(corner)] == [2, 0]

    total = tierscope.stats(client)["total"]
    with pytest.raises(NotHeldError, match="not held decoded in L1"), direct.copies_only():
        whole.compute()
    after = tierscope.stats(client)["total"]
    for tier in ("l1", "l2"):  # a read not held counts and loads nothing
        assert (after[tier]["hits"], after[tier]["misses"]) == (total[tier]["hits"], total[tier]["misses"])
    with direct.copies_only():
        xr.testing.assert_identical(corner.compute(), ds["u"].isel(time=0, z=slice(0, 8), y=slice(0, 8),
                                                                   x=slice(0, 8)).compute())
    assert tierscope.stats(client)["total"]["l1"]["hits"] == after["l1"]["hits"] + 2  # (copies and then
    # the plain read: one block each)
    # a malformed read is the asker's error; the owner stays up and answers the next one
    from distributed.protocol import ToPickle

    from tierscope.protocol import READ_OP

    data = ds["u"].variable._data
    while not hasattr(data, "spec"):
        data = data.array
    owner = next(iter(client.scheduler_info()["workers"]))
    with pytest.raises(Exception, match="iterable"):
        client.sync(getattr(client.rpc(owner), READ_OP), spec=ToPickle(data.spec), parts=[7], copies=True)
    with direct.copies_only():
        corner.compute()

    parts = list(tierscope.progressive(whole))  # 1 of its 32 level-0 blocks held: level 1 is loaded
    levels = [p.encoding["tierscope_level"] for p in parts]
    assert levels in ([2, 1, 0], [2, 0])  # (passed over when level 0, loading beside it, came first)
    middle = progressive_stats()
    assert middle["held_views"] == before["held_views"]

    again = list(tierscope.progressive(whole))  # now all 32 are in their owners' L1
    assert [p.encoding["tierscope_level"] for p in again] == [2, 0]
    xr.testing.assert_identical(again[-1], whole.compute())
    xr.testing.assert_identical(again[0], parts[0])
    stats = progressive_stats()
    assert stats["held_views"] - middle["held_views"] == 1
    assert stats["parts"] - middle["parts"] == 2
    # level 1's 4 blocks not even asked for (a passed-over level 1 of the view before may still end and
    # count its own)
    assert stats["blocks"] - middle["blocks"] == 1 + 32 or levels == [2, 0] and (
        stats["blocks"] - middle["blocks"] == 1 + 32 + 4)
    ds.close()


def test_a_coarse_level_with_more_than_1_in_32_of_level0s_blocks_is_not_loaded_on_the_way(client, levels_url):
    """A whole time step: level 1 has 4 blocks, 1/8 of level 0's 32: beside level 0 its loads would only
    delay it (``CHEAP``), so the view goes from level 2 straight to level 0, and asks nothing."""
    ds = xr.open_dataset(levels_url, engine="tierscope")
    before = progressive_stats()
    parts = list(tierscope.progressive(ds["u"].isel(time=2)))
    assert [p.encoding["tierscope_level"] for p in parts] == [2, 0]
    after = progressive_stats()
    assert after["blocks"] - before["blocks"] == 1 + 32 and after["held_views"] == before["held_views"]
    ds.close()


def test_lossy_view_ends_equal_to_its_own_level0_view_and_within_tol(client, levels_url):
    tol = 1e-2
    isel = {"time": 2, "z": 11, "y": slice(0, 32), "x": slice(5, 30)}
    with xr.open_dataset(levels_url, engine="tierscope", tol=tol) as ds:
        parts = list(tierscope.progressive(ds["u"].isel(isel)))
        xr.testing.assert_identical(parts[-1], ds["u"].isel(isel).compute())
    assert [p.encoding["tierscope_level"] for p in parts] == [2, 0]
    assert parts[-1].attrs["tierscope_tol"] == tol
    for part in parts:
        exact = _expected(levels_url, part.encoding["tierscope_level"], isel)
        assert part.dims == exact.dims and part.shape == exact.shape
        xr.testing.assert_identical(part.coords.to_dataset(), exact.coords.to_dataset())
        assert float(abs(part - exact).max()) <= tol


GATED = 2  # the time step whose level-0 reads wait for the gate


def test_a_finer_coarse_part_still_loading_is_passed_over_for_level0(client, levels_store, monkeypatch):
    """A whole time step: parts of levels 2 (1 block), 1 (4 blocks, 1/8 of level 0's: loaded on the way
    with ``CHEAP`` 8) and 0. Level 1's reads are held at the origin: level 0 comes without waiting for
    it, and level 1 is never shown."""
    monkeypatch.setattr(refine, "CHEAP", 8)
    origin = GatedOrigin(ZarrOrigin(levels_store), lambda level, index: level == 1)
    # threads enough for the held reads (the view's and the prefetch's) and level 0's
    with ServerThread(BlockService([origin], workers=40)) as server:
        ds = xr.open_dataset(f"{server.url}/datasets/turb", engine="tierscope")
        selection = ds["u"].isel(time=1)
        parts = list(tierscope.progressive(selection))
        assert [p.encoding["tierscope_level"] for p in parts] == [2, 0]
        # level 1 was asked for (its request may reach the server after level 0 came, on a busy machine)
        # and never came (the gate is still shut)
        assert origin.held.wait(10) and not origin.gate.is_set()
        with xr.open_dataset(f"{server.url}/datasets/turb", engine="tierscope") as plain:
            np.testing.assert_array_equal(parts[-1].values, plain["u"].isel(time=1).values)
        origin.gate.set()
        ds.close()


def test_a_newer_view_stops_the_older_views_level0_read(client, levels_store):
    origin = GatedOrigin(ZarrOrigin(levels_store), lambda level, index: level == 0 and index[0] == GATED)
    # threads enough for the gated reads and the newer view's: a stopped read's server work is not dropped
    with ServerThread(BlockService([origin], workers=40)) as server:
        ds = xr.open_dataset(f"{server.url}/datasets/turb", engine="tierscope")
        before, total = progressive_stats(), tierscope.stats(client)["total"]
        older = tierscope.progressive(ds["u"].isel(time=GATED, z=3))
        assert next(older).encoding["tierscope_level"] == 2
        rest: list[xr.DataArray] = []
        waiting = threading.Thread(target=lambda: rest.extend(older))  # level 0 starts once asked for
        waiting.start()
        assert origin.held.wait(10)  # level 0 is loading, held at the origin
        other = tierscope.progressive(ds["v"].isel(time=0, z=3))  # another variable cancels nothing
        newer = tierscope.progressive(ds["u"].isel(time=0, z=12))
        assert [p.encoding["tierscope_level"] for p in newer] == [2, 0]  # while the older one is held

        waiting.join(10)  # its read stopped: the older view ends with no level 0, the gate still shut
        assert not waiting.is_alive() and rest == [] and not origin.gate.is_set()
        after = progressive_stats()
        assert after["cancelled_views"] - before["cancelled_views"] == 1
        assert after["cancelled_blocks"] - before["cancelled_blocks"] == 16  # level 0 of a plane
        assert [p.encoding["tierscope_level"] for p in other] == [2, 0]

        origin.gate.set()  # the owners meet the cancel at their next block and drop the rest
        assert wait_for(lambda: tierscope.stats(client)["total"]["cancelled_reads"] > total["cancelled_reads"])
        reads = tierscope.stats(client)["total"]["cancelled_reads"] - total["cancelled_reads"]
        assert reads <= len(client.scheduler_info()["workers"])
        # kept: the coarse parts (3 blocks), the newer views' level 0 (32), and of the older one's level 0
        # at most the block each stopped owner had started decoding
        l1 = tierscope.stats(client)["total"]["l1"]["blocks"] - total["l1"]["blocks"]
        assert 3 + 32 <= l1 <= 3 + 32 + reads
        ds.close()


def test_coarse_parts_move_no_position_at_the_server(client, levels_store):
    """A coarse part is not a view: its owners' fetches say so (``X-Tierscope-Moves: no``) and the server
    keeps no position and plans no prefetch for it; level 0's read is the one view it sees."""
    service = BlockService([ZarrOrigin(levels_store)], l3="16MiB", l4="16MiB", prefetch="auto")
    with ServerThread(service) as server, xr.open_dataset(f"{server.url}/datasets/turb",
                                                          engine="tierscope") as ds:
        parts = list(tierscope.progressive(ds["u"].isel(time=1, z=9)))
        assert [p.encoding["tierscope_level"] for p in parts] == [2, 0]
        stats = service.stats()
        assert stats["requests"]["user"] == 1 + 16  # the coarse block was served, as a user request
        assert stats["sessions"] == 1  # level 0's position only
        level0 = stats["prefetch"]["planned"]
        assert level0 > 0
        coarse = xr.open_dataset(f"{server.url}/datasets/turb", engine="tierscope", level=2)
        coarse["u"].isel(time=2, z=2).load()  # a level-2 block not held, read as a view: that moves one
        stats = service.stats()
        assert stats["sessions"] == 2 and stats["prefetch"]["planned"] > level0
        coarse.close()


def test_on_update_gets_each_part_and_returns_level0_or_none_when_cancelled(client, levels_url):
    ds = xr.open_dataset(levels_url, engine="tierscope")
    seen: list[int] = []
    last = tierscope.progressive(ds["p"].isel(time=1, z=0), lambda part: seen.append(
        part.encoding["tierscope_level"]))
    assert seen == [2, 0]
    xr.testing.assert_identical(last, ds["p"].isel(time=1, z=0).compute())

    seen.clear()
    newer = []

    def move_on(part: xr.DataArray) -> None:  # a slider moved while the first part was shown
        seen.append(part.encoding["tierscope_level"])
        if not newer:
            newer.append(tierscope.progressive(ds["p"].isel(time=2, z=0)))

    assert tierscope.progressive(ds["p"].isel(time=1, z=1), move_on) is None
    assert seen == [2]


def test_budget_picks_the_finest_level_expected_within_it(client, levels_url):
    ds = xr.open_dataset(levels_url, engine="tierscope", tol=1e-3)  # a tol nothing measured yet

    def first_level(budget_ms: float | None) -> int:
        parts = tierscope.progressive(ds["v"].isel(time=2, z=7), budget_ms=budget_ms)
        levels = [p.encoding["tierscope_level"] for p in parts]
        assert levels == sorted(levels, reverse=True) and levels[-1] == 0
        return levels[0]

    assert first_level(1e9) == 2  # nothing measured: the coarsest
    assert first_level(1e9) == 0  # measured: level 0 fits a huge budget
    assert first_level(1e-9) == 2  # nothing fits a tiny one: the coarsest
    assert first_level(None) == 2
    for bad in (0, -1.0, math.inf, math.nan, "10", True):
        with pytest.raises(ValueError, match="budget_ms must be a positive number"):
            tierscope.progressive(ds["v"].isel(time=2, z=7), budget_ms=bad)


def test_selections_it_cannot_map_are_refused_naming_the_problem(levels_url, levels_store):
    ds = xr.open_dataset(levels_url, engine="tierscope")
    u = ds["u"]
    refused = {
        "indexed with an array along 'x'": u.isel(x=[1, 2]),
        "steps by 2 along 'y'": u.isel(y=slice(None, None, 2)),
        "is empty along 'z'": u.isel(z=slice(4, 4)),
        "transposed or indexed with arrays": u.isel(time=0).transpose("x", "y", "z"),
        "holds loaded values": u.isel(time=0, z=0).load(),
        "holds loaded values ": xr.DataArray(np.zeros((2, 3)), name="plain"),
        "with the dataset's dimensions": u.isel(time=0).rename(x="lon"),
    }
    for message, selection in refused.items():
        with pytest.raises(ValueError, match=message.strip()):
            tierscope.progressive(selection)
    plotted = u.isel(time=0, z=0)
    plotted.values  # noqa: B018 - what a .plot() does: the lazy selection now caches its values
    with pytest.raises(ValueError, match="holds loaded values"):
        tierscope.progressive(plotted)
    with xr.open_dataset(levels_url, engine="tierscope", chunks={}) as chunked:
        with pytest.raises(ValueError, match="is a dask array"):
            tierscope.progressive(chunked["u"].isel(time=0))
    with xr.open_dataset(levels_url, engine="tierscope", level=1) as level1:
        with pytest.raises(ValueError, match="selection of level 1 .*start from level 0"):
            tierscope.progressive(level1["u"].isel(time=0))
    with xr.open_zarr(levels_store, chunks=None, consolidated=False) as plain:  # lazy: xarray's zarr
        with pytest.raises(ValueError, match="not a lazy selection of a dataset opened with engine="):
            tierscope.progressive(plain["u"].isel(time=0))
    with pytest.raises(TypeError, match="take an xarray DataArray, got Dataset"):
        tierscope.progressive(ds.isel(time=0))
