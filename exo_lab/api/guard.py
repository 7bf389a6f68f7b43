"""The API server's limits, from config.yaml's ``api`` section. What they mean, and the server
class that enforces them for every HTTP service, are in :mod:`exo_lab.httpguard`."""
from __future__ import annotations

from dataclasses import dataclass

from ..httpguard import HttpLimits


@dataclass(frozen=True)
class ApiLimits(HttpLimits):
    """The API's :class:`~exo_lab.httpguard.HttpLimits`, and the open connections one client
    (address) may hold; config.yaml's ``api.max_connections``, ``api.max_connections_per_client``
    and ``api.allowed_hosts`` set the fields of the same names. None: no per-client cap."""

    max_connections_per_client: int | None = 64


def limits_from_config(config) -> ApiLimits:
    """The limits a config.yaml's ``api`` section sets (the defaults for the rest)."""
    api = getattr(config, "api", None)
    return ApiLimits(max_connections=getattr(api, "max_connections", ApiLimits.max_connections),
                     max_connections_per_client=getattr(api, "max_connections_per_client",
                                                        ApiLimits.max_connections_per_client),
                     allowed_hosts=tuple(getattr(api, "allowed_hosts", ()) or ()))
