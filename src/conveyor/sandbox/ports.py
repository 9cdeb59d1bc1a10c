"""Free loopback ports for the sandbox's servers.

Ports are taken from the kernel (bind to port 0) rather than from a fixed range, so
that several sandboxes, and whatever else runs on the machine, do not collide.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable

LOOPBACK = "127.0.0.1"


def free_ports(names: Iterable[str], *, host: str = LOOPBACK) -> dict[str, int]:
    """One distinct free port per name. All sockets stay open until every port is chosen,
    so the kernel cannot hand the same port out twice."""
    sockets: list[socket.socket] = []
    ports: dict[str, int] = {}
    try:
        for name in names:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.bind((host, 0))
            ports[name] = sock.getsockname()[1]
    finally:
        for sock in sockets:
            sock.close()
    return ports
