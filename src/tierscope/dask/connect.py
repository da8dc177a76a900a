"""``tierscope.connect`` and ``tierscope.stats``: attach tiers and prefetch to a Dask cluster, read them back."""

from __future__ import annotations

from typing import Any

from tierscope import config
from tierscope.cache import check_policy
from tierscope.config import tier_bytes
from tierscope.codec.device import check_device
from tierscope.dask.tiers import PLUGIN_NAME, configure_local_tiers, local_tiers
from tierscope.prefetch import check_mode

__all__ = ["connect", "stats", "stats_table"]

COUNTERS = ("hits", "misses", "evictions", "waits", "prefetched", "prefetch_used", "prefetch_wasted",
            "blocks", "nbytes", "capacity")


def connect(
    client_or_cluster: Any = None,
    l1: int | float | str | None = None,
    l2: int | float | str | None = None,
    policy: str | None = None,
    prefetch: str | None = None,
    device: str | None = None,
    direct: bool | None = None,
) -> Any:
    """Give every worker L1 (decoded) and L2 (encoded) tiers, and the scheduler tierscope's prefetch plugin.

    ``client_or_cluster`` is a ``distributed.Client``, a cluster object (a Client is made for it), or
    None to size the tiers of this process (dask's local schedulers; no prefetch without a scheduler).
    ``policy``: lru, lfu, fifo or distance (evict the blocks farthest from the current view first);
    ``prefetch``: off, neighbourhood, momentum, playback or auto. ``device``: where workers decode and
    keep L1, "auto" (each worker's GPU when CuPy sees one), "cpu" or "gpu". Sizes are bytes (``"2GiB"``)
    or a fraction of each worker's memory limit (``0.2``); 0 switches a tier off. Every argument left out
    comes from dask.config's ``tierscope`` namespace (docs/configuration.md).
    ``direct``: a view whose blocks all sit in their owners' L1 or L2 is read from them without a Dask graph
    (one request per owner instead of a scheduler round trip; the scheduler plugin still hears of it).
    Calling again resets the tiers and the plugin. Returns the client (None without one).
    """
    l1 = config.get("l1") if l1 is None else l1
    l2 = config.get("l2") if l2 is None else l2
    policy = check_policy(config.get("policy") if policy is None else policy)
    prefetch = check_mode(config.get("prefetch") if prefetch is None else prefetch)
    device = config.get("device") if device is None else device
    check_device(device)
    direct = config.get("direct") if direct is None else direct
    l1_bytes, l2_bytes = tier_bytes(l1, None, "l1"), tier_bytes(l2, None, "l2")  # validated here
    if client_or_cluster is None:
        configure_local_tiers(l1_bytes, l2_bytes, policy, device)
        return None
    from distributed import Client

    from tierscope.dask.direct import disable, enable
    from tierscope.dask.plugin import TierscopeWorkerPlugin
    from tierscope.dask.scheduler import SCHEDULER_PLUGIN_NAME, TierscopeSchedulerPlugin

    client = client_or_cluster if isinstance(client_or_cluster, Client) else Client(client_or_cluster)
    equipped = client.register_plugin(TierscopeWorkerPlugin(l1, l2, policy, device), name=PLUGIN_NAME)
    if client.run_on_scheduler(_close_plugin):  # replaced, not overwritten: distributed warns on overwrites
        client.unregister_scheduler_plugin(SCHEDULER_PLUGIN_NAME)
    client.register_plugin(TierscopeSchedulerPlugin(prefetch, l1, l2, equipped=sorted(equipped)))
    (enable if direct else disable)(client)
    return client


async def _close_plugin(dask_scheduler: Any) -> bool:
    """Close the current scheduler plugin (its planning thread ends: removing a plugin does not close
    it); whether there was one."""
    from tierscope.dask.scheduler import SCHEDULER_PLUGIN_NAME

    plugin = dask_scheduler.plugins.get(SCHEDULER_PLUGIN_NAME)
    if plugin is not None:
        await plugin.close()
    return plugin is not None


def _default_client() -> Any:
    try:
        from distributed import default_client

        return default_client()
    except (ImportError, ValueError):
        return None


def stats_table(client: Any = None) -> Any:
    """``stats`` as a pandas DataFrame: one row per worker and tier (l1, l2), columns hits, misses,
    hit_ratio, evictions, blocks, nbytes, capacity and the worker's prefetch figures (prefetch_issued,
    prefetch_used, prefetch_wasted, prefetch_cancelled, ...)."""
    import pandas as pd

    rows = []
    for worker, figures in stats(client)["workers"].items():
        prefetch = {f"prefetch_{k}": v for k, v in figures.get("prefetch", {}).items()}
        for tier in ("l1", "l2"):
            counts = {k: v for k, v in figures[tier].items() if k != "policy"}
            rows.append({"worker": worker, "tier": tier, **counts, **prefetch})
    return pd.DataFrame(rows).set_index(["worker", "tier"]) if rows else pd.DataFrame()


def _worker_stats(dask_worker: Any) -> dict[str, Any] | None:
    plugin = dask_worker.plugins.get(PLUGIN_NAME)
    return plugin.stats() if plugin is not None else None


async def _scheduler_stats(dask_scheduler: Any) -> dict[str, Any] | None:
    """The scheduler plugin's stats once its planning thread has handed back the views it was given."""
    from tierscope.dask.scheduler import SCHEDULER_PLUGIN_NAME

    plugin = dask_scheduler.plugins.get(SCHEDULER_PLUGIN_NAME)
    if plugin is None:
        return None
    await plugin.settled()
    return plugin.stats()


def _add(into: dict[str, Any], stats: dict[str, Any]) -> None:
    for k, v in stats.items():
        if isinstance(v, dict):
            _add(into.setdefault(k, {}), v)
        elif isinstance(v, int | float) and not isinstance(v, bool):
            into[k] = into.get(k, 0) + v


def _total(per: dict[str, dict[str, Any]]) -> dict[str, Any]:
    total: dict[str, Any] = {"fetches": 0, "cancelled_reads": 0, "retries": 0, "stage_s": {},
                             "prefetch_stage_s": {}, "prefetch": {}}
    for stats in per.values():
        _add(total, {k: v for k, v in stats.items() if k in total or k in ("l1", "l2")})
    _hit_ratios(total)
    return total


def _hit_ratios(stats: dict[str, Any]) -> None:
    """Add each tier's hit ratio over user lookups (hits + misses)."""
    for tier in ("l1", "l2"):
        counts = stats.setdefault(tier, {})
        looks = counts.get("hits", 0) + counts.get("misses", 0)
        counts["hit_ratio"] = counts.get("hits", 0) / looks if looks else 0.0


def stats(client: Any = None) -> dict[str, Any]:
    """Per-worker and total figures: tier hits/misses/evictions/occupancy, fetches, stage times, prefetch.

    ``{"workers": {address: {...}}, "total": {...}, "scheduler": {...}, "progressive": {...}}``;
    ``scheduler`` holds the prefetch plugin's counts (views, plans) and the queue-time distribution of user
    loads; ``progressive`` this process's progressive views (``tierscope.refine.stats``: views, parts,
    blocks, cancelled views and blocks). Without a
    client, the default one (the latest ``Client`` made here); with none at all, this process's tiers
    under the address ``"local"``.
    """
    client = client if client is not None else _default_client()
    if client is None:
        from tierscope.client.http import retries

        per = {"local": {**local_tiers().stats(), "prefetch": {}, "retries": retries()}}
        scheduler = None
    else:
        per = {a: s for a, s in client.run(_worker_stats).items() if s is not None}
        scheduler = client.run_on_scheduler(_scheduler_stats)
    from tierscope import refine

    total = _total(per)  # before the per-worker ratios, which must not be summed
    for worker_stats in per.values():
        _hit_ratios(worker_stats)
    return {"workers": per, "total": total, "scheduler": scheduler, "progressive": refine.stats()}
