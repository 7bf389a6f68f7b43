"""The small routes: models, health, metrics."""
from __future__ import annotations

from .base import ApiHandler
from .errors import ApiError, redact

class ModelsHandler(ApiHandler):
    """GET /v1/models: the loaded model (an empty list while none is loaded)."""

    def get(self) -> None:
        data = [self.server.model_card()] if self.cluster.loaded else []
        self.write_json({"object": "list", "data": data})


class ModelHandler(ApiHandler):
    """GET /v1/models/{id} (ids may hold slashes: "Qwen/Qwen2.5-0.5B-Instruct")."""

    def get(self, model_id: str) -> None:
        if not self.cluster.loaded or model_id != self.cluster.model_id:
            raise ApiError(404, f"the model '{model_id}' does not exist here; GET /v1/models lists the "
                           "loaded one", param="model", code="model_not_found")
        self.write_json(self.server.model_card())


class HealthHandler(ApiHandler):
    """GET /health: 200 when a model is loaded and every stage answers a ping, else 503 and why.

    Open without the API key, so probes and load balancers need no secret; it tells only the
    model id and, when unhealthy, the reason.
    """

    requires_key = False

    async def get(self) -> None:
        ok, reason = await self.cluster.ahealth()
        if ok:
            self.write_json({"status": "ok", "model": self.cluster.model_id})
        else:
            self.write_json({"status": "unavailable", "reason": redact(reason, self.server.private_names())},
                            status=503)


class MetricsHandler(ApiHandler):
    """GET /metrics in the Prometheus text format (needs the API key when one is set)."""

    def get(self) -> None:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.finish(generate_latest(self.server.registry))
