"""Free loopback ports for the services kimiray starts on one machine (Serve, HAProxy stats, Redis in tests)."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the OS picks it). Another process may take it before the caller
    binds, so callers that can retry on a bind failure should."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
