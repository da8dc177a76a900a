"""The stores tierscope serves: a synthetic sample, and existing files ingested into zarr v3."""

from __future__ import annotations

from tierscope.store.ingest import ingest, parse_block_spec
from tierscope.store.sample import write_sample

__all__ = ["ingest", "parse_block_spec", "write_sample"]
