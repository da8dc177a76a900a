"""``dask scheduler --preload tierscope.dask.preload``: tierscope's prefetch plugin on a CLI-started cluster.

Options come after the module name: ``--preload tierscope.dask.preload --tierscope-prefetch playback``.
The workers get their tiers when the notebook calls ``tierscope.connect(client, ...)``, which also
replaces this plugin with one sized to the tiers it sets.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from tierscope.dask.scheduler import TierscopeSchedulerPlugin
from tierscope.dask.tiers import DEFAULT_L1, DEFAULT_L2
from tierscope.prefetch import MODES

if TYPE_CHECKING:
    from distributed import Scheduler


@click.command()
@click.option("--tierscope-prefetch", type=click.Choice(MODES), default="auto", show_default=True)
def dask_setup(scheduler: Scheduler, tierscope_prefetch: str) -> None:
    """Add the plugin before any client connects."""
    scheduler.add_plugin(TierscopeSchedulerPlugin(tierscope_prefetch, DEFAULT_L1, DEFAULT_L2))
