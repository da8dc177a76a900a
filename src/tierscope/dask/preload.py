"""``--preload tierscope.dask.preload``: tierscope on a cluster started from the command line.

- ``dask scheduler --preload tierscope.dask.preload``: the scheduler plugin, before any client comes; it
  installs its worker twin on every current and future worker, so clients that never call
  ``tierscope.connect`` get the cluster's configured tiers and prefetch (dask.config's ``tierscope``
  namespace, read where each side runs). Options come after the module name:
  ``--preload tierscope.dask.preload --tierscope-prefetch playback``.
- ``dask worker --preload tierscope.dask.preload``: that worker's tiers, from its own configuration.

``tierscope.connect(client, ...)`` later replaces both with the sizes and modes it is given.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TYPE_CHECKING

import click

from tierscope.dask.plugin import TierscopeWorkerPlugin
from tierscope.dask.scheduler import TierscopeSchedulerPlugin
from tierscope.dask.tiers import PLUGIN_NAME
from tierscope.prefetch import MODES

if TYPE_CHECKING:
    from distributed import Scheduler, Worker


@click.command()
@click.option("--tierscope-prefetch", type=click.Choice(MODES), default=None,
              help="prefetch mode (default: dask.config's tierscope.prefetch, auto)")
def dask_setup(server: Scheduler | Worker, tierscope_prefetch: str | None) -> Awaitable[None] | None:
    """Add the scheduler plugin (which brings the worker one), or a worker's own tiers."""
    from distributed import Worker

    if isinstance(server, Worker):
        return server.plugin_add(TierscopeWorkerPlugin(), name=PLUGIN_NAME)
    server.add_plugin(TierscopeSchedulerPlugin(tierscope_prefetch, install_workers=True))
    return None
