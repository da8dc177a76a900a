"""tierscope's dask.config namespace reaches connect, the workers' tiers and the scheduler plugin."""

from __future__ import annotations

import dask
import pytest
from distributed import Client, LocalCluster

import tierscope
from tierscope import config
from tierscope.dask.plugin import TierscopeWorkerPlugin
from tierscope.dask.tiers import PLUGIN_NAME


def capacities(client: Client, tier: str) -> set[int]:
    return {w[tier]["capacity"] for w in tierscope.stats(client)["workers"].values()}


def test_defaults_ship_with_the_package():
    assert config.get("prefetch") == "auto" and config.get("serve.port") == 8765
    assert config.get_seconds("direct-read.ask-timeout") == 1.0
    assert config.get_bytes("prefetch-batch.bytes") == 8 << 20


def test_tier_sizes_are_bytes_or_fractions_of_memory():
    assert config.tier_bytes("2GiB", None, "l1") == 2 << 30
    assert config.tier_bytes(0.25, 4 << 30, "l1") == 1 << 30
    assert config.tier_bytes(0, 4 << 30, "l1") == 0
    for bad, message in [("lots", "l2 must be bytes"), (-1, "l2 must be >= 0"), (True, "l2 must be bytes")]:
        with pytest.raises(ValueError, match=message):
            config.tier_bytes(bad, None, "l2")


def test_a_local_clusters_configuration_reaches_its_workers_tiers():
    with dask.config.set({"tierscope.l1": "20MiB", "tierscope.l2": "12MiB"}):  # nannies pass it on
        cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
    with cluster, Client(cluster) as client:
        client.register_plugin(TierscopeWorkerPlugin(), name=PLUGIN_NAME)  # sizes left to each worker
        assert capacities(client, "l1") == {20 << 20} and capacities(client, "l2") == {12 << 20}


def test_connect_reads_dask_config_and_takes_fractions(client):
    with dask.config.set({"tierscope.l1": "40MiB", "tierscope.l2": 0.01, "tierscope.prefetch": "playback"}):
        tierscope.connect(client)
    limits = {w["memory_limit"] for w in client.scheduler_info()["workers"].values()}
    assert capacities(client, "l1") == {40 << 20}
    assert capacities(client, "l2") == {int(0.01 * limit) for limit in limits}
    assert tierscope.stats(client)["scheduler"]["mode"] == "playback"


def test_layers_import_only_what_they_need():
    """The codec imports no dask, the HTTP client no server (tierscope.protocol holds what they share)."""
    import subprocess
    import sys

    def loaded(module: str) -> set[str]:
        probe = f"import sys, {module}; print(' '.join(sys.modules))"
        return set(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                                  check=True).stdout.split())

    assert not {m.split(".")[0] for m in loaded("tierscope.codec")} & {"dask", "distributed"}
    assert not {m for m in loaded("tierscope.client.http") if m.startswith("tierscope.server")}
