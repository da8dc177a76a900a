"""The replay harness: metrics on hand-made numbers, and one real replay (block server behind a link proxy,
static zarr over HTTP, LocalCluster with two worker processes, TileDB and HDF5 copies) end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from tierscope.bench.link import parse_link
from tierscope.bench.patterns import generate
from tierscope.bench.replay import (
    Condition,
    add_ratios,
    check_values,
    format_table,
    hit_ratio,
    latency_summary,
    parse_sweep,
    replay,
    rotated,
)
from tierscope.bench.systems import TierSizes, TierscopeSystem, make_system, parse_systems, view_counters
from tierscope.grid import BlockGrid

from tests.conftest import BLOCK, SHAPE

# ---- metrics on hand-made numbers ---------------------------------------------------------------------


def test_latency_summary_percentiles():
    s = latency_summary(range(1, 101))
    assert s["mean"] == pytest.approx(50.5)
    assert s["std"] == pytest.approx(math.sqrt((100**2 - 1) / 12))
    assert s["p50"] == pytest.approx(50.5)
    assert s["p95"] == pytest.approx(95.05)
    assert s["p99"] == pytest.approx(99.01)
    one = latency_summary([7.0])
    assert one == {"mean": 7.0, "std": 0.0, "p50": 7.0, "p95": 7.0, "p99": 7.0}
    with pytest.raises(ValueError, match="at least one latency"):
        latency_summary([])


def test_hit_ratio_shares():
    assert hit_ratio({"l1": 6, "l2": 2, "l3": 1, "l4": 0, "origin": 1}) == {
        "l1": 0.6, "l2": 0.2, "l3": 0.1, "l4": 0.0, "origin": 0.1}
    assert hit_ratio({}) == dict.fromkeys(("l1", "l2", "l3", "l4", "origin"), 0.0)


def test_check_values_bounds_nans_and_shapes():
    ref = np.array([[0.0, 1.0], [np.nan, 100.0]], dtype=np.float32)
    shift = np.array([[1, -1], [0, 1]], dtype=np.float32) * np.float32(0.001)
    assert check_values(ref + shift, ref, 0.0011) == (True, pytest.approx(0.001, rel=1e-2))
    ok, err = check_values(ref + np.float32(0.01), ref, 0.001)
    assert not ok and err == pytest.approx(0.01, rel=1e-3)
    assert check_values(np.nan_to_num(ref), ref, 1.0) == (False, math.inf)  # NaN where the store has one
    assert check_values(ref[:1], ref, 1.0) == (False, math.inf)
    assert check_values(ref.copy(), ref, 0.0) == (True, 0.0)  # lossless: exact


def _snap(l1=(0, 0), l2=(0, 0), fetches=0, network=0.0, server=0.0, decode=0.0, queue=(0, 0.0),
          served=(0, 0, 0)):
    return {"l1_hits": l1[0], "l1_misses": l1[1], "l2_hits": l2[0], "l2_misses": l2[1], "fetches": fetches,
            "network_s": network, "server_s": server, "decode_s": decode, "queue_n": queue[0],
            "queue_s": queue[1], "served_by": dict(zip(("l3", "l4", "origin"), served, strict=True))}


def test_view_counters_split_blocks_and_stages():
    before = _snap(l1=(10, 5), l2=(1, 4), fetches=4, network=0.4, server=0.1, decode=0.1, queue=(15, 0.05),
                   served=(2, 1, 1))
    # the view: 2 L1 hits, 6 misses; of those 2 L2 hits, 4 fetched; the server answered those 4 and 4 worker
    # prefetch requests in the window: 4 from L3, 2 from L4, 2 from the origin
    after = _snap(l1=(12, 11), l2=(3, 8), fetches=12, network=1.6, server=0.5, decode=0.3, queue=(23, 0.09),
                  served=(6, 3, 3))
    blocks, stages = view_counters(before, after, nblocks=8)
    assert blocks == {"l1": 2, "l2": 2, "l3": 2.0, "l4": 1.0, "origin": 1.0}
    assert sum(blocks.values()) == 8
    assert stages["network"] == pytest.approx(1.2 * 4 / 8)  # the user's share of the window's fetches
    assert stages["server"] == pytest.approx(0.4 * 4 / 8)
    assert stages["decode"] == pytest.approx(0.2)
    assert stages["queue"] == pytest.approx(0.04)
    # no tiers: every block from the origin, stages unknown
    assert view_counters(None, None, 3) == ({"l1": 0.0, "l2": 0.0, "l3": 0.0, "l4": 0.0, "origin": 3.0}, None)
    # a scheduler that recorded no load leaves the queue stage unknown; an all-L1 view fetched nothing
    quiet = {**after, "l1_hits": 20, "l1_misses": 5, "queue_n": 15, "fetches": 4}
    blocks, stages = view_counters(before, quiet, 10)
    assert stages["queue"] is None and stages["network"] == 0.0 and blocks["l1"] == 10


def test_ratio_to_baseline_per_condition_and_sequence():
    def rec(system, seq, mean, link="1000mbit,0.1ms"):
        return {"system": system, "sequence": seq, "link": link, "think_ms": 100.0, "tol_rel": 1e-3,
                "sweep": {}, "latency_ms": {"mean": mean}}

    records = [rec("zarr-http", "a", 100.0), rec("tierscope", "a", 20.0), rec("zarr-http", "b", 50.0),
               rec("tierscope", "b", 25.0), rec("tierscope", "a", 30.0, link="100mbit,20ms")]
    add_ratios(records)
    assert [r["ratio_to_baseline"] for r in records] == [1.0, 0.2, 1.0, 0.5, None]


# ---- names and options ---------------------------------------------------------------------------------


def test_systems_by_name():
    assert parse_systems("tierscope, zarr-http,tierscope-1010") == [
        "tierscope", "zarr-http", "tierscope-1010"]
    combo = make_system("tierscope-1010", TierSizes(l1="1MiB", l2="2MiB", l3="3MiB", l4="4MiB"))
    assert isinstance(combo, TierscopeSystem)
    assert [combo._size(t) for t in ("l1", "l2", "l3", "l4")] == ["1MiB", 0, "3MiB", 0]
    assert make_system("raw").codec == "raw" and make_system("raw").bounded
    assert not make_system("fp16").bounded
    with pytest.raises(ValueError, match="unknown system 'tierscope-12'.*tierscope-1010"):
        parse_systems("tierscope-12")
    with pytest.raises(ValueError, match="listed twice"):
        parse_systems("hdf5,hdf5")
    with pytest.raises(ValueError, match="names no system"):
        parse_systems(" , ")


def test_parse_sweep():
    assert parse_sweep("think=0,100,300") == ("think", [0.0, 100.0, 300.0])
    assert parse_sweep("l1=16MiB,64MiB") == ("l1", ["16MiB", "64MiB"])
    assert parse_sweep(None) is None
    with pytest.raises(ValueError, match="VAR one of think, tol"):
        parse_sweep("link=1gbit")
    with pytest.raises(ValueError, match="must be numbers"):
        parse_sweep("tol=big")
    with pytest.raises(ValueError, match="gives no values"):
        parse_sweep("think=")


def test_cli_rejects_bad_input_before_any_work(tmp_path, capsys):
    from tierscope.cli import main

    assert main(["bench", "--systems", "tierscope,nope", "--out", str(tmp_path)]) == 2
    assert "unknown system 'nope'" in capsys.readouterr().err
    assert main(["bench", "--pattern", "spiral", "--out", str(tmp_path)]) == 2
    assert "unknown access pattern 'spiral'" in capsys.readouterr().err
    assert main(["bench", "--link", "fast", "--out", str(tmp_path)]) == 2
    assert "expected RATE[,DELAY]" in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists()


# ---- one real replay ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data(sample_store, tmp_path_factory):
    from tierscope.bench.systems import DataPaths
    from tierscope.store import ingest

    out = tmp_path_factory.mktemp("formats")
    return DataPaths(sample_store, ingest(sample_store, out / "turb.tdb", BLOCK, fmt="tiledb"),
                     ingest(sample_store, out / "turb.h5", BLOCK, fmt="hdf5"), "u")


def test_references_are_read_before_the_replay(data):
    """The stored values of a sequence's views are read once, before any system: a read after a view
    would lengthen that view's think time for the first system only."""
    import xarray as xr

    from tierscope.bench.replay import _Reference

    seq = generate("jumps", BlockGrid(SHAPE, BLOCK), 6, seed=2, steps=2)
    ref = _Reference(data)
    ref.prepare(seq.views)
    stored = xr.open_zarr(data.zarr, consolidated=False)["u"]
    ref.array = None  # the replay's lookups must not read the store again
    for view in seq.views:
        np.testing.assert_array_equal(ref(view), stored.isel(view.isel(stored.dims)).values)


def test_replay_end_to_end(data, cluster, tmp_path):
    import xarray as xr
    from distributed import Client

    from tierscope.bench.plots import plot_results

    grid = BlockGrid(SHAPE, BLOCK)
    seqs = [generate("playback", grid, 4, seed=3), generate("wandering", grid, 3, seed=1),
            generate("jumps", grid, 6, seed=2, steps=2)]
    u = xr.open_zarr(data.zarr, consolidated=False)["u"].values
    tol = 1e-3 * float(np.nanmax(u) - np.nanmin(u))
    cond = Condition(parse_link("1gbit,0.1ms"), think_ms=10.0, tol_rel=1e-3, tol=tol,
                     sizes=TierSizes(l1="8MiB", l2="8MiB", l3="16MiB", l4="16MiB"))
    systems = ["tierscope", "tierscope-0111", "zarr-http", "zarr-local", "tiledb", "hdf5", "raw"]
    ticks = []
    with Client(cluster) as client:
        records = replay(seqs, systems, data, client, [cond], repeat=1,
                         progress=lambda label: lambda: ticks.append(label))
    assert len(ticks) == len(systems) * 13
    assert [(r["system"], r["pattern"]) for r in records] == [
        (s, p) for p in ("playback", "wandering", "jumps") for s in systems]
    for r in records:
        for key in ("system", "pattern", "sequence", "views", "latency_ms", "hit_ratio", "stage_ms",
                    "ratio_to_baseline", "setup_s"):
            assert key in r, key
        assert set(r["latency_ms"]) == {"mean", "std", "p50", "p95", "p99"}
        assert r["latency_ms"]["mean"] > 0 and r["latency_ms"]["p50"] <= r["latency_ms"]["p99"]
        assert r["mismatches"] == 0, r["errors"]
        assert r["max_error"] <= tol * 1.001
        assert sum(r["hit_ratio"].values()) == pytest.approx(1.0)
        assert r["link"] == "1000mbit,0.1ms" and r["views"] == len(r["samples_ms"])
        if r["system"].startswith("tierscope") or r["system"] == "raw":
            assert set(r["stage_ms"]) == {"queue", "network", "server", "decode"}
            # a cold start: the first view's blocks come from the origin through the server
            assert r["hit_ratio"]["origin"] > 0
        else:
            assert r["stage_ms"] is None and r["hit_ratio"]["origin"] == 1.0
        if r["system"] == "zarr-http":
            assert r["ratio_to_baseline"] == 1.0
        assert r["first_ms"] == pytest.approx(r["samples_ms"][0], abs=1e-3)  # the first view, apart
        if r["pattern"] == "jumps":  # views 3 (a jump) and 1, 2, 4, 5 (t+1 after a jump), apart
            samples = r["samples_ms"]
            assert r["cold_ms"]["mean"] == pytest.approx(samples[3], abs=1e-3)
            assert r["warm_ms"]["mean"] == pytest.approx(np.mean([samples[i] for i in (1, 2, 4, 5)]), abs=1e-3)
        else:
            assert "cold_ms" not in r
    by = {(r["system"], r["pattern"]): r for r in records}
    for pattern in ("playback", "wandering"):
        assert by[("tierscope-0111", pattern)]["hit_ratio"]["l1"] == 0.0  # L1 off
    assert by[("tierscope", "playback")]["hit_ratio"]["l1"] > 0
    assert by[("raw", "playback")]["max_error"] == 0.0  # uncompressed transfer is exact

    results = {"records": records}
    (tmp_path / "results.json").write_text(json.dumps(results))
    plots = plot_results(json.loads((tmp_path / "results.json").read_text()), tmp_path)
    names = sorted(p.name for p in plots)
    assert names == ["hits_1000mbit-0.1ms.png", "latency_1000mbit-0.1ms.png", "stages_1000mbit-0.1ms.png"]
    for p in plots:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
    table = format_table(records)
    assert "| tierscope-0111 |" in table and "**wandering**, link 1000mbit,0.1ms" in table
    assert "| first ms | cold ms | warm ms |" in table


def test_a_failing_system_is_noted_and_the_others_still_run(data, cluster, tmp_path):
    from distributed import Client

    from tierscope.bench.systems import DataPaths

    broken = DataPaths(data.zarr, data.tiledb, tmp_path / "gone.h5", "u")  # the HDF5 copy went missing
    seqs = [generate("playback", BlockGrid(SHAPE, BLOCK), 2, seed=3)]
    cond = Condition(None, think_ms=0.0, tol_rel=0.0, tol=0.0, sizes=TierSizes())
    failures = []
    with Client(cluster) as client:
        records = replay(seqs, ["hdf5", "zarr-local"], broken, client, [cond], repeat=2, failures=failures)
        assert [r["system"] for r in records] == ["zarr-local"] and records[0]["mismatches"] == 0
        # noted once: a system that failed is not run again in the next repetition
        assert [(f["system"], f["sequence"]) for f in failures] == [("hdf5", seqs[0].name)]
        assert "gone.h5" in failures[0]["error"]
        with pytest.raises(OSError, match="gone.h5"):  # without a failures list the error propagates
            replay(seqs, ["hdf5"], broken, client, [cond])


def test_repetitions_rotate_the_order_of_the_systems_and_pool_per_system(data, cluster):
    from distributed import Client

    assert rotated(["a", "b", "c"], 0) == ["a", "b", "c"] and rotated(["a", "b", "c"], 4) == ["b", "c", "a"]
    seqs = [generate("playback", BlockGrid(SHAPE, BLOCK), 3, seed=3)]
    cond = Condition(None, think_ms=0.0, tol_rel=0.0, tol=0.0, sizes=TierSizes())
    labels = []
    with Client(cluster) as client:
        records = replay(seqs, ["hdf5", "zarr-local"], data, client, [cond], repeat=2,
                         progress=lambda label: labels.append(label.split()[0]) or (lambda: None))
    assert labels == ["hdf5", "zarr-local", "zarr-local", "hdf5"]  # the first place taken in turn
    assert [r["system"] for r in records] == ["hdf5", "zarr-local"]
    for r in records:
        assert r["repeat"] == 2 and len(r["samples_ms"]) == 2 * 3 and r["mismatches"] == 0


def test_a_tierscope_system_leaves_its_server_idle_and_empty(data, cluster):
    """The next system (maybe on another server, on the same cores) must not pay for this one's prefetch."""
    from distributed import Client

    from tierscope.bench.systems import Testbed, _http_json  # (a class named Test* is kept out of collection)

    seqs = generate("playback", BlockGrid(SHAPE, BLOCK), 3, seed=3)
    sizes = TierSizes(l1="8MiB", l2="8MiB", l3="16MiB", l4="16MiB", prefetch="auto")
    system = make_system("tierscope-live", sizes)
    with Client(cluster) as client, Testbed(data, client, None) as bed:
        system.setup(bed, 0.0)
        for view in seqs.views:
            system.read(view)
        url = system._server.url
        assert _http_json("GET", f"{url}/stats")["tiers"]["l3"]["blocks"] > 0
        system.teardown()
        stats = _http_json("GET", f"{url}/stats")
        assert stats["config"]["prefetch"] == "off" and stats["prefetch"]["queued"] == 0
        assert [stats["tiers"][t]["blocks"] for t in ("l3", "l4")] == [0, 0]
        assert [stats["config"][t] for t in ("l3", "l4")] == [0, 0]


def test_plots_with_a_sweep_from_hand_made_records(tmp_path):
    from tierscope.bench.plots import plot_results

    records = []
    for think in (0.0, 100.0):
        for system, mean, ratio, stages in (("tierscope", 20.0 + think / 10, {"l1": 0.9, "origin": 0.1},
                                             {"queue": 1.0, "network": 2.0, "server": 0.5, "decode": 3.0}),
                                            ("zarr-http", 100.0, {"origin": 1.0}, None)):
            records.append({
                "system": system, "pattern": "playback", "sequence": "playback-0", "link": "1000mbit,0.1ms",
                "think_ms": think, "tol_rel": 1e-3, "sweep": {"think": think}, "ratio_to_baseline": None,
                "latency_ms": {"mean": mean, "std": 1.0, "p50": mean, "p95": mean * 1.5, "p99": mean * 2},
                "hit_ratio": {t: ratio.get(t, 0.0) for t in ("l1", "l2", "l3", "l4", "origin")},
                "stage_ms": stages, "setup_s": 0.1, "mismatches": 0, "bounded": True, "first_ms": mean})
    names = sorted(p.name for p in plot_results({"records": records}, tmp_path))
    assert names == ["hits_1000mbit-0.1ms-think-0.0.png", "hits_1000mbit-0.1ms-think-100.0.png",
                     "latency_1000mbit-0.1ms-think-0.0.png", "latency_1000mbit-0.1ms-think-100.0.png",
                     "stages_1000mbit-0.1ms-think-0.0.png", "stages_1000mbit-0.1ms-think-100.0.png",
                     "sweep_think.png"]
    assert all((tmp_path / n).read_bytes()[:4] == b"\x89PNG" for n in names)
