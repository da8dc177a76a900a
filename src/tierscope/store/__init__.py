"""The stores tierscope serves: a synthetic sample, existing files ingested into zarr v3, TileDB or HDF5,
and their coarse levels."""

from __future__ import annotations

from tierscope.store.ingest import ingest, parse_block_spec
from tierscope.store.pyramid import pyramid
from tierscope.store.sample import write_sample

__all__ = ["ingest", "parse_block_spec", "pyramid", "write_sample"]
