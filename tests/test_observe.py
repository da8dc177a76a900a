"""What a user sees of tierscope on a real LocalCluster: stats (default client, table), the scheduler's
/tierscope page and its Prometheus /metrics."""

from __future__ import annotations

import re
import time
import urllib.request

import numpy as np
import xarray as xr

import tierscope


def scheduler_url(client) -> str:
    return f"http://127.0.0.1:{client.scheduler_info()['services']['dashboard']}"


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def test_page_metrics_and_table_show_the_views(client, dataset_url, sample_store):
    ds = xr.open_dataset(dataset_url, engine="tierscope")
    ref = xr.open_zarr(sample_store, consolidated=False).u
    for _ in range(2):  # the second time: L1 hits
        np.testing.assert_array_equal(ds.u.isel(time=1, z=slice(0, 16)).values,
                                      ref.isel(time=1, z=slice(0, 16)).values)
    stats = tierscope.stats()  # the default client: the one the fixture made
    assert set(stats["workers"]) == set(client.scheduler_info()["workers"])
    hits = stats["total"]["l1"]["hits"]
    assert hits == 8 and stats["scheduler"]["views"] == 1

    table = tierscope.stats_table()
    assert list(table.index.names) == ["worker", "tier"] and len(table) == 4
    assert table.xs("l1", level="tier")["hits"].sum() == hits
    assert {"misses", "hit_ratio", "capacity", "prefetch_cancelled"} <= set(table.columns)

    deadline = time.monotonic() + 15  # the page shows what the workers' heartbeats carried
    while True:
        page = fetch(f"{scheduler_url(client)}/tierscope")
        shown = sum(int(n) for n in re.findall(r"<td>(\d+)% of \d+</td>", page))
        if all(w in page for w in stats["workers"]) and "100% of" in page or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert all(w in page for w in stats["workers"]), page
    assert "L1 fill" in page and "/ 64 MiB" in page and shown > 0
    assert "turb/u" in page  # the session's position

    metrics = fetch(f"{scheduler_url(client)}/metrics")
    assert 'tierscope_scheduler_events_total{event="views"} 1.0' in metrics
    assert "tierscope_scheduler_positions 1.0" in metrics
    assert 'tierscope_cluster_tier_bytes{tier="l1"}' in metrics


def test_connect_again_replaces_the_plugins_without_a_warning(client):
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tierscope.connect(client, l1="32MiB", l2="32MiB", prefetch="playback")
        tierscope.connect(client, l1="32MiB", l2="32MiB", prefetch="playback")
    assert not [w for w in caught if "already contains a plugin" in str(w.message)]
    assert tierscope.stats(client)["scheduler"]["mode"] == "playback"
