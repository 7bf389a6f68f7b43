"""The API's clients: which tenant a request belongs to, and the open connections per client.

**Tenant** (:class:`~exo_lab.coordinator.tenants.Tenant`, what the scheduler's fair share, caps
and prefix isolation go by). A client is the TCP peer's address (never ``X-Forwarded-For`` or the
like: any client can write those), together with the API key it sent where the server has one
(only a key the server accepted counts, so a client cannot invent tenants by sending made-up
keys; a key shared by a whole team does not tell its members apart, so the address always
counts too). An IPv6 client is its /64 network, since one host may pick any address in it; an
IPv4-mapped address is the IPv4 one.

**Isolation key.** A request may narrow, never widen, the scope in which its prompt is reused
as a cached prefix: the OpenAI ``user`` field and the ``X-Exo-Lab-Isolation`` header. Requests
share cached prefixes only when their client, ``user`` and header are all the same; an app that
serves several people through one address and key sends each person's id in ``user`` and their
prompts stay apart. Fair share and caps stay per client: isolation keys cannot win more slots.

**Connections.** :class:`ConnectionCounter` counts open connections per client address for the
HTTP server's guard, so that one client cannot take all of ``api.max_connections``.
"""
from __future__ import annotations

import hashlib
import ipaddress

from ..config import ApiConfig
from ..coordinator.tenants import Tenant, TenantLimits

ISOLATION_HEADER = "X-Exo-Lab-Isolation"
IPV6_CLIENT_PREFIX = 64       # an IPv6 client: its /64 network


def client_address(peer_ip: str) -> str:
    """The client an address stands for: the address itself; an IPv6 address's /64 network; an
    IPv4-mapped IPv6 address's IPv4 address. Anything unparsable (a Unix socket) as given."""
    try:
        address = ipaddress.ip_address(peer_ip.split("%", 1)[0])
    except ValueError:
        return peer_ip
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, IPV6_CLIENT_PREFIX), strict=False))
    return str(address)


def tenant_limits(config) -> TenantLimits:
    """The per-client caps of a ClusterConfig's ``api`` section (its defaults without one)."""
    api = getattr(config, "api", None) or ApiConfig()
    return TenantLimits(max_running=api.max_running_per_client, max_queued=api.max_queued_per_client)


def request_tenant(peer_ip: str, accepted_key: str | None, user: str | None, isolation: str | None,
                   limits: TenantLimits) -> Tenant:
    """The tenant of a request from ``peer_ip`` (the TCP peer) that passed the server's key check
    with ``accepted_key`` (None when the server has no key); ``user`` and ``isolation`` (the
    ``X-Exo-Lab-Isolation`` header) narrow its prefix-reuse scope (module docstring)."""
    client_id = client_address(peer_ip)
    if accepted_key is not None:
        client_id = f"{_digest(accepted_key)}@{client_id}"
    narrowed = "" if user is None and isolation is None else _digest(f"{user!r}\n{isolation!r}")
    return Tenant(client_id, narrowed, limits)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:32]


class ConnectionCounter:
    """Open connections per client address (``api.max_connections_per_client``).

    The guard calls :meth:`open` for each new connection before serving it (False: refuse it,
    429 with :meth:`refusal` and Retry-After) and :meth:`close` when a connection it served ends.
    ``peer``: tornado's socket address (a tuple whose first item is the IP) or the IP itself."""

    def __init__(self, max_per_client: int):
        self.max_per_client = max_per_client
        self.refused = 0
        self._open: dict[str, int] = {}

    def open(self, peer) -> bool:
        client = client_address(_ip(peer))
        held = self._open.get(client, 0)
        if held >= self.max_per_client:
            self.refused += 1
            return False
        self._open[client] = held + 1
        return True

    def close(self, peer) -> None:
        client = client_address(_ip(peer))
        held = self._open.pop(client, 0) - 1
        if held > 0:
            self._open[client] = held

    def held(self, peer) -> int:
        """Connections the client of ``peer`` holds open now."""
        return self._open.get(client_address(_ip(peer)), 0)

    def refusal(self, peer) -> str:
        """What a refused client is told."""
        return (f"your client holds {self.held(peer)} of its {self.max_per_client} open connections "
                "(api.max_connections_per_client); reuse them (keep-alive) or close idle ones, then retry")


def _ip(peer) -> str:
    return str(peer[0]) if isinstance(peer, tuple) and peer else str(peer or "")
