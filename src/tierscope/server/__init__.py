"""The block server: a block service with L3/L4 tiers and server-side prefetch, and its aiohttp app."""

from tierscope._lazy import lazy_exports

__all__ = ["BlockResult", "BlockService", "ServerThread", "create_app", "run_server"]

# Lazy exports, so that a module of this package can be imported without the server's (aiohttp, the
# codecs): the prefetch planner's child process imports only the planning modules.
_LAZY = {"ServerThread": "tierscope.server.app", "create_app": "tierscope.server.app",
         "run_server": "tierscope.server.app", "BlockResult": "tierscope.server.service",
         "BlockService": "tierscope.server.service"}

__getattr__ = lazy_exports(__name__, _LAZY)
