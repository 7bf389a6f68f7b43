"""The OpenAI-compatible HTTP API, served by tornado on the cluster's event loop.

Routes: ``GET /v1/models``, ``GET /v1/models/{id}``, ``POST /v1/chat/completions``,
``POST /v1/completions`` (both stream as server-sent events with ``"stream": true``),
``POST /v1/embeddings``, ``POST /v1/responses`` (stateless; streams typed events),
``GET /health`` and ``GET /metrics`` (Prometheus text format).

- Model names: ``served_model_names`` (``--served-model-name``, config ``served_model_names``) are
  what /v1/models lists, the first the primary, and what ``model`` may be in a request; as in
  vLLM the model id is then not one of them. Without names, the model id is the one name (for a
  folder, its absolute path). A reply's ``model`` echoes the name the request sent, as vLLM's
  does, so a client that checks it finds its own name.
- API key: optional. When set, every route but /health needs ``Authorization: Bearer <key>``
  (/health stays open for probes; it reveals only the primary model name or why the cluster is unhealthy).
- Request bodies: at most ``MAX_BODY_BYTES`` (1 MiB); larger ones get a 413. POST bodies must be
  ``application/json`` (415 otherwise).
- Limits (:class:`ApiLimits`): connections, header/body timeouts, and on a loopback bind only
  requests for ``localhost`` / ``127.0.0.1`` / ``[::1]`` (DNS rebinding); see exo_lab.httpguard.
  Stop strings, prompt length and token ids are bounded before any work (exo_lab.api.params).
- Errors: OpenAI's body ``{"error": {"message", "type", "param", "code"}}``. A request field this
  server cannot honour is refused with a 400 naming it (see exo_lab.api.params), never ignored.
- A client that disconnects cancels its generation; every stage frees its KV cache at once.
  Stopping the server ends open streams with an error event and ``data: [DONE]``.

Use ``cluster.serve(host="127.0.0.1", port=8000, api_key=None)``; it calls :func:`start_server`.
"""
from __future__ import annotations

from .base import MAX_BODY_BYTES
from .guard import ApiLimits
from .server import ApiServer, start_server

__all__ = ["ApiLimits", "ApiServer", "MAX_BODY_BYTES", "start_server"]
