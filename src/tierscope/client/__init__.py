"""Transports from a process to block service: HTTP to a server, or an embedded in-process service."""

from tierscope.client.source import Source, Transport

__all__ = ["Source", "Transport"]
