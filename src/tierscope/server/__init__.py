"""The block server: a block service with L3/L4 tiers and server-side prefetch, and its aiohttp app."""

from tierscope.server.app import ServerThread, create_app, run_server
from tierscope.server.service import BlockResult, BlockService

__all__ = ["BlockResult", "BlockService", "ServerThread", "create_app", "run_server"]
