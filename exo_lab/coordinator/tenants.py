"""Tenants: who a request belongs to, and the waiting queue that serves them fairly.

A tenant is one client of the cluster. The API derives it from the client's address and the
API key it sent (:mod:`exo_lab.api.tenants`); a notebook's own requests are :data:`LOCAL`. The
scheduling core (:mod:`exo_lab.coordinator.schedule`) uses it three ways:

- **Caps.** A tenant holds at most ``limits.max_running`` KV slots and has at most
  ``limits.max_queued`` requests waiting (:class:`TenantLimits`; None: no cap of its own).
- **Fair share.** A free slot goes to the waiting tenant that holds the fewest slots, ties to
  the one served least recently; within a tenant, first come first served (:class:`FairQueue`).
- **Isolation.** A slot's cached prefix is offered only to requests of the same :attr:`Tenant.scope`
  (the tenant, narrowed by an isolation key the client may send), so no request's speed or
  counters depend on another tenant's prompts.

What is shown of a tenant (status, dashboard, logs) is its :attr:`Tenant.label`: a salted hash,
stable while this process runs, that names neither the address nor the key.
"""
from __future__ import annotations

import collections
import functools
import hashlib
import secrets
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

_LABEL_SALT = secrets.token_bytes(16)
REMEMBERED_TENANTS = 4096     # when each was last served, for taking turns (beyond: waiting ones only)


@dataclass(frozen=True)
class TenantLimits:
    """What one tenant may hold (the API's ``api.max_running_per_client`` and
    ``api.max_queued_per_client``); None: no cap of its own."""

    max_running: int | None = None      # KV slots held at once
    max_queued: int | None = None       # requests waiting for a slot


@dataclass(frozen=True)
class Tenant:
    """Who a request belongs to. ``client_id`` is never shown (it may hold an address); fair
    share and caps are per ``client_id``; prefix reuse is per :attr:`scope`, which the client's
    ``isolation`` key (a hash, or "") narrows further."""

    client_id: str
    isolation: str = ""
    limits: TenantLimits = field(default_factory=TenantLimits)

    @property
    def scope(self) -> tuple[str, str]:
        """Requests of one scope may reuse each other's cached prefixes; no others may."""
        return (self.client_id, self.isolation)

    @functools.cached_property
    def label(self) -> str:
        """A short opaque name for status pages and logs."""
        return hashlib.sha256(_LABEL_SALT + self.client_id.encode()).hexdigest()[:8]


LOCAL = Tenant("local")     # requests made in this process (notebook, CLI), not through the API


class FairQueue:
    """Requests waiting for a KV slot: one FIFO per tenant, served by :meth:`pop`.

    Items are the scheduling core's requests (:class:`~exo_lab.coordinator.schedule.Request`);
    each has a ``tenant`` (:class:`Tenant`)."""

    def __init__(self):
        self._queues: dict[str, collections.deque] = {}     # client_id -> its waiting requests
        self._served: dict[str, int] = {}                   # client_id -> when last served (a count)
        self._turn = 0
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def __bool__(self) -> bool:
        return self._count > 0

    def __iter__(self) -> Iterator:
        return (request for queue in list(self._queues.values()) for request in list(queue))

    def __contains__(self, request) -> bool:
        return request in self._queues.get(request.tenant.client_id, ())

    def append(self, request) -> None:
        self._queues.setdefault(request.tenant.client_id, collections.deque()).append(request)
        self._count += 1

    def appendleft(self, request) -> None:
        """Back to the head of its tenant's queue (a preempted or replayed request)."""
        self._queues.setdefault(request.tenant.client_id, collections.deque()).appendleft(request)
        self._count += 1

    def remove(self, request) -> None:
        client_id = request.tenant.client_id
        queue = self._queues[client_id]
        queue.remove(request)
        self._count -= 1
        if not queue:
            del self._queues[client_id]

    def clear(self) -> None:
        self._queues.clear()
        self._served.clear()
        self._count = 0

    def waiting(self, client_id: str) -> int:
        """How many requests of this tenant wait."""
        return len(self._queues.get(client_id, ()))

    def tenants(self) -> list[tuple[Tenant, int]]:
        """(tenant, requests waiting) for every tenant with one."""
        return [(queue[0].tenant, len(queue)) for queue in self._queues.values()]

    def next_tenant(self, running: Mapping[str, int]) -> str | None:
        """The tenant to serve next: of those below their running cap, the one holding the
        fewest slots (``running``: client_id -> slots held), ties to the least recently served."""
        eligible = [client_id for client_id, queue in self._queues.items()
                    if _below(queue[0].tenant.limits.max_running, running.get(client_id, 0))]
        return min(eligible, key=lambda client_id: (running.get(client_id, 0), self._served.get(client_id, -1)),
                   default=None)

    def pop(self, running: Mapping[str, int]):
        """The next request to admit (see :meth:`next_tenant`), or None when no tenant may run one."""
        client_id = self.next_tenant(running)
        if client_id is None:
            return None
        queue = self._queues[client_id]
        request = queue.popleft()
        self._count -= 1
        if not queue:
            del self._queues[client_id]
        self._note_served(client_id)
        return request

    def _note_served(self, client_id: str) -> None:
        self._turn += 1
        self._served[client_id] = self._turn
        if len(self._served) > REMEMBERED_TENANTS:
            self._served = {c: turn for c, turn in self._served.items() if c in self._queues}


def _below(cap: int | None, held: int) -> bool:
    return cap is None or held < cap
