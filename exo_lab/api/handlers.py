"""The small routes: models, health, metrics."""
from __future__ import annotations

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
    model's primary served name (its id when none is given) and, when unhealthy, the reason.
    """

    requires_key = False

    async def get(self) -> None:
        ok, reason = await self.cluster.ahealth()
        if ok:
            self.write_json({"status": "ok", "model": self.server.model_names()[0]})
        else:
            self.write_json({"status": "unavailable", "reason": redact(reason, self.server.private_names())},
                            status=503)


class MetricsHandler(ApiHandler):
    """GET /metrics in the Prometheus text format (needs the API key when one is set)."""

    def get(self) -> None:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.finish(generate_latest(self.server.registry))
