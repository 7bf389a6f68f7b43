"""The small routes: models, health, metrics."""
from __future__ import annotations

import asyncio
import time
import weakref

from .base import ApiHandler
from .errors import model_not_found, redact


class ModelsHandler(ApiHandler):
    """GET /v1/models: one entry per name the loaded model is served by, the primary first (an
    empty list while none is loaded)."""

    def get(self) -> None:
        names = self.server.model_names() if self.cluster.loaded else ()
        self.write_json({"object": "list", "data": [self.server.model_card(name) for name in names]})


class ModelHandler(ApiHandler):
    """GET /v1/models/{id} (ids may hold slashes: "Qwen/Qwen2.5-0.5B-Instruct")."""

    def get(self, model_id: str) -> None:
        names = self.server.model_names() if self.cluster.loaded else ()
        if model_id not in names:
            raise model_not_found(model_id, names)
        self.write_json(self.server.model_card(model_id))


class HealthHandler(ApiHandler):
    """GET /health: 200 when a model is loaded and every stage answers a ping, else 503 and why.

    Open without the API key, so probes and load balancers need no secret; it tells only the
    model's primary served name (its id when none is given) and, when unhealthy, the reason (about
    the cluster's engines, never a request). Cheap, whatever the rate: :class:`SharedHealth`.
    """

    requires_key = False

    async def get(self) -> None:
        ok, reason = await shared_health(self.server).get()
        state = getattr(self.server.cluster, "state", None)     # the supervisor's: serving, replanning, ...
        if ok:
            answer = {"status": "ok", "state": state, "model": self.server.model_names()[0]}
            note = getattr(self.server.cluster, "memory_note", None)    # fewer KV slots than planned
            if note:
                answer["memory"] = redact(note, self.server.private_names())
            self.write_json(answer)
        else:
            self.write_json({"status": "unavailable", "state": state,
                             "reason": redact(reason, self.server.private_names())}, status=503)


HEALTH_TTL_S = 2.0      # /health sends a ping through the stages at most this often


class SharedHealth:
    """The cluster's health as /health reports it. What the coordinator already knows (no model,
    a failure, a failover under way) is read on every call; the costly check, ``cluster.ahealth()``
    (a ping through every stage), runs at most once per HEALTH_TTL_S and pipeline, one call at a
    time shared by every caller. So a flood of /health never reaches the stages, and how long
    /health takes does not follow what the stages are busy with."""

    def __init__(self, cluster):
        self.cluster = cluster
        self._checked: tuple[object, float, tuple[bool, str]] | None = None   # (pipeline, when, result)
        self._pending: asyncio.Future | None = None

    async def get(self) -> tuple[bool, str]:
        problem = known_problem(self.cluster)
        if problem:
            return False, problem
        pipeline, now = self.cluster.pipeline, time.monotonic()
        if self._checked is not None and self._checked[0] is pipeline and now - self._checked[1] < HEALTH_TTL_S:
            return self._checked[2]
        if self._pending is None or self._pending.done():
            self._pending = asyncio.ensure_future(self._check(pipeline))
        # shield: a caller that hangs up must not cancel the check the others wait for
        return await asyncio.shield(self._pending)

    async def _check(self, pipeline) -> tuple[bool, str]:
        result = await self.cluster.ahealth()
        self._checked = (pipeline, time.monotonic(), result)
        return result


def known_problem(cluster) -> str | None:
    """Why the cluster cannot serve, from what it already knows (no call to any engine), or None."""
    if cluster.failure:
        return cluster.failure
    if not cluster.loaded:
        return "no model is loaded"
    return f"recovering: {cluster.recovering}" if cluster.recovering else None


_HEALTH = weakref.WeakKeyDictionary()     # ApiServer -> its SharedHealth


def shared_health(server) -> SharedHealth:
    """The one SharedHealth of ``server`` (an ApiServer)."""
    health = _HEALTH.get(server)
    if health is None:
        health = _HEALTH[server] = SharedHealth(server.cluster)
    return health


class MetricsHandler(ApiHandler):
    """GET /metrics in the Prometheus text format (needs the API key when one is set)."""

    def get(self) -> None:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.finish(generate_latest(self.server.registry))
