"""The block server: a block service over origins, and its aiohttp app."""

from tierscope.server.app import ServerThread, create_app
from tierscope.server.service import BlockResult, BlockService

__all__ = ["BlockResult", "BlockService", "ServerThread", "create_app"]
