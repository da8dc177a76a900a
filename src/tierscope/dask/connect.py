"""``tierscope.connect`` and ``tierscope.stats``: attach tiers to a Dask cluster and read them back."""

from __future__ import annotations

from typing import Any

from dask.utils import parse_bytes

from tierscope.dask.tiers import PLUGIN_NAME, configure_local_tiers, local_tiers

__all__ = ["connect", "stats"]


def _size(value: int | str, name: str) -> int:
    size = parse_bytes(value) if isinstance(value, str) else int(value)
    if size < 0:
        raise ValueError(f"{name} must be >= 0 bytes, got {value!r}")
    return size


def connect(client_or_cluster: Any = None, l1: int | str = "2GiB", l2: int | str = "4GiB") -> Any:
    """Give every worker of a cluster L1 (decoded) and L2 (encoded) tiers of the given sizes.

    ``client_or_cluster`` is a ``distributed.Client``, a cluster object (a Client is made for it), or
    None to size the tiers of this process (dask's local schedulers). Calling again resets the tiers.
    Returns the client (None without one). Size 0 switches a tier off.
    """
    l1_bytes, l2_bytes = _size(l1, "l1"), _size(l2, "l2")
    if client_or_cluster is None:
        configure_local_tiers(l1_bytes, l2_bytes)
        return None
    from distributed import Client

    from tierscope.dask.plugin import TierscopeWorkerPlugin

    client = client_or_cluster if isinstance(client_or_cluster, Client) else Client(client_or_cluster)
    client.register_plugin(TierscopeWorkerPlugin(l1_bytes, l2_bytes), name=PLUGIN_NAME)
    return client


def _worker_stats(dask_worker: Any) -> dict[str, Any] | None:
    plugin = dask_worker.plugins.get(PLUGIN_NAME)
    return plugin.tiers.stats() if plugin is not None and plugin.tiers is not None else None


def _total(per: dict[str, dict[str, Any]]) -> dict[str, Any]:
    total: dict[str, Any] = {"fetches": 0, "stage_s": {}}
    for tier in ("l1", "l2"):
        total[tier] = {}
        for stats in per.values():
            for k, v in stats[tier].items():
                total[tier][k] = total[tier].get(k, 0) + v
        looks = total[tier].get("hits", 0) + total[tier].get("misses", 0)
        total[tier]["hit_ratio"] = total[tier].get("hits", 0) / looks if looks else 0.0
    for stats in per.values():
        total["fetches"] += stats["fetches"]
        for k, v in stats["stage_s"].items():
            total["stage_s"][k] = total["stage_s"].get(k, 0.0) + v
    return total


def stats(client: Any = None) -> dict[str, Any]:
    """Per-worker and total tier counters: hits, misses, evictions, occupancy, fetches, stage times.

    ``{"workers": {address: {...}}, "total": {...}}``; with no client, this process's tiers under
    the address ``"local"``.
    """
    if client is None:
        per = {"local": local_tiers().stats()}
    else:
        per = {a: s for a, s in client.run(_worker_stats).items() if s is not None}
    return {"workers": per, "total": _total(per)}
