"""Free TCP ports on this machine for tests that start services (loopback)."""
from __future__ import annotations

import random
import socket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port_range(size: int = 100) -> int:
    """The first of ``size`` consecutive ports that are all free now (a config's port_range)."""
    for _ in range(50):
        first = random.randrange(20000, 30000 - size)
        try:
            for port in range(first, first + size):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
    raise RuntimeError(f"no {size} consecutive free ports in 20000-30000")
