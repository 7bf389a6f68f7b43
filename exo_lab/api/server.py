"""The tornado application, its routes, and :class:`ApiServer` (the handle ``Cluster.serve`` returns)."""
from __future__ import annotations

import asyncio
import logging
import socket
import time

import tornado.httpserver
import tornado.web

from ..errors import ConfigError
from ..httpguard import GuardedHTTPServer, HostCheck, bind_sockets
from .base import MAX_BODY_BYTES, NotFoundHandler
from .embeddings import EmbeddingsHandler
from .generation import ChatCompletionsHandler, CompletionsHandler
from .guard import ApiLimits
from .handlers import HealthHandler, MetricsHandler, ModelHandler, ModelsHandler
from .pages import page_routes
from .responses import ResponsesHandler
from .tenants import ConnectionCounter

logger = logging.getLogger(__name__)

STOP_TIMEOUT_S = 10.0
DRAIN_TIMEOUT_S = 3.0       # on stop, how long open generations get to send their closing event
WILDCARD_HOSTS = ("", "0.0.0.0", "::")


class ApiServer:
    """A running API server. ``url`` is where clients reach it (the real port when 0 was asked for);
    :meth:`stop` may be called from any thread but the loop's own. ``limits``: connection caps
    (in all and per client), timeouts and the Host allow-list (:class:`~exo_lab.api.guard.ApiLimits`).
    ``served_model_names``: the names clients call the model by (see :meth:`model_names`)."""

    def __init__(self, cluster, *, host: str, api_key: str | None, limits: ApiLimits | None = None,
                 served_model_names: tuple[str, ...] = ()):
        self.cluster = cluster
        self.host = host
        self.api_key = api_key
        self.limits = limits or ApiLimits()
        per_client = self.limits.max_connections_per_client
        self.connections = ConnectionCounter(per_client) if per_client else None   # per client
        self.served_model_names = check_served_model_names(served_model_names)
        self.port: int | None = None
        self.started = int(time.time())
        self._http: tornado.httpserver.HTTPServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._responses: dict[int, int] = {}        # HTTP status -> count
        self.generations: set = set()               # GenerationHandlers answering now
        self.registry = self.metrics_registry()

    def __repr__(self) -> str:
        return f"<exo_lab ApiServer {self.url} key={'set' if self.api_key else 'none'}>"

    @property
    def url(self) -> str:
        host = socket.gethostname() if self.host in WILDCARD_HOSTS else self.host
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}"

    async def astart(self, port: int) -> None:
        sockets = bind_sockets(port, self.host)
        self.port = sockets[0].getsockname()[1]
        self._loop = asyncio.get_running_loop()
        self._http = GuardedHTTPServer(make_app(self), max_body_size=MAX_BODY_BYTES, limits=self.limits,
                                       host_check=HostCheck(self.host, self.limits.allowed_hosts),
                                       count_response=self.count_response, name="the API",
                                       per_client=self.connections)
        self._http.add_sockets(sockets)
        logger.info("serving the OpenAI-compatible API at %s/v1 (API key %s)", self.url,
                    "required" if self.api_key else "not required")

    async def astop(self) -> None:
        """Stop listening, end every generation in flight (a stream gets an error event and
        ``[DONE]``, a whole completion a 503) and close every connection."""
        if self._http is None:
            return
        http, self._http = self._http, None
        http.stop()
        endings = [handler.shut_down() for handler in list(self.generations)]
        if endings:
            await asyncio.wait([asyncio.ensure_future(ending) for ending in endings], timeout=DRAIN_TIMEOUT_S)
        await asyncio.wait_for(http.close_all_connections(), STOP_TIMEOUT_S)
        logger.info("stopped serving %s", self.url)

    def stop(self) -> None:
        """Stop the server and wait until it has (from any thread; from the loop itself, it is scheduled)."""
        loop = self._loop
        if self._http is None or loop is None or not loop.is_running():
            return
        future = asyncio.run_coroutine_threadsafe(self.astop(), loop)
        if _running_in(loop):
            return
        future.result(STOP_TIMEOUT_S + 1)

    # ------------------------------------------------------------------ shared with handlers
    def model_names(self) -> tuple[str, ...]:
        """The names ``model`` may take in a request, the primary first: the served names when
        given (as vLLM, the model id is then not one of them), else the loaded model's id; then
        the LoRA adapters served (``cluster.add_adapter``, a fine-tuning job's)."""
        base = self.served_model_names or (self.cluster.model_id,)
        return base + tuple(name for name in self.cluster.adapters.names() if name not in base)

    def model_card(self, name: str) -> dict:
        """/v1/models' entry for ``name``; ``root`` is what it serves (vLLM's field)."""
        card = {"id": name, "object": "model", "created": self.started, "owned_by": "exo-lab",
                "root": self.cluster.model_id}
        adapter = self.cluster.adapters.get(name)
        if adapter is not None and name not in (self.served_model_names or (self.cluster.model_id,)):
            card.update(root=name, parent=self.cluster.model_id)     # vLLM's fields for a LoRA adapter
        return card

    def count_response(self, status: int) -> None:
        self._responses[status] = self._responses.get(status, 0) + 1

    def private_names(self) -> set[str]:
        """Host names and addresses of the cluster's PCs: never shown in an error body."""
        names = {socket.gethostname(), socket.getfqdn()}
        for device in getattr(getattr(self.cluster, "config", None), "devices", ()):
            names.update(name for name in (device.hostname, device.address) if name)
        for info in getattr(getattr(self.cluster, "control", None), "infos", {}).values():
            names.update((info.hostname, info.device_name))
        return {name for name in names if len(name) > 3 and name != "localhost"}

    def metrics_registry(self):
        """A prometheus_client registry with the model's counters and the HTTP responses."""
        from prometheus_client import CollectorRegistry
        from prometheus_client.core import CounterMetricFamily

        from ..coordinator.metrics import MetricsCollector

        def http_responses():
            family = CounterMetricFamily("exo_lab_http_responses", "HTTP responses sent by the API, by status code.",
                                         labels=["code"])
            for code, count in sorted(self._responses.items()):
                family.add_metric([str(code)], count)
            yield family

        registry = CollectorRegistry(auto_describe=False)
        registry.register(MetricsCollector(self.cluster.metrics_source))
        registry.register(_Collect(http_responses))
        return registry


class _Collect:
    def __init__(self, collect):
        self.collect = collect


def make_app(server: ApiServer) -> tornado.web.Application:
    routes = [
        (r"/v1/models", ModelsHandler),
        (r"/v1/models/(.+)", ModelHandler),
        (r"/v1/chat/completions", ChatCompletionsHandler),
        (r"/v1/completions", CompletionsHandler),
        (r"/v1/embeddings", EmbeddingsHandler),
        (r"/v1/responses", ResponsesHandler),
        (r"/health", HealthHandler),
        (r"/metrics", MetricsHandler),
    ]
    return tornado.web.Application(
        [(pattern, handler, {"server": server}) for pattern, handler in routes] + page_routes(server),
        default_handler_class=NotFoundHandler, default_handler_args={"server": server})


async def start_server(cluster, *, host: str = "127.0.0.1", port: int = 8000,
                       api_key: str | None = None, limits: ApiLimits | None = None,
                       served_model_names: tuple[str, ...] = ()) -> ApiServer:
    """Start serving ``cluster`` on the running loop (the cluster's loop thread); returns at once.

    port 0 lets the OS pick (``server.port`` tells which). With ``api_key`` set, every route but
    /health needs ``Authorization: Bearer <api_key>``. ``limits``: connections, timeouts, Host
    names (:class:`~exo_lab.api.guard.ApiLimits`; default ApiLimits()). ``served_model_names``:
    the names /v1/models lists and requests may use, the first the primary (default: the model
    id). Raises ConfigError for an empty or unsendable key or a bad name, OSError when the port
    is taken.
    """
    check_api_key(api_key)
    server = ApiServer(cluster, host=host, api_key=api_key, limits=limits, served_model_names=served_model_names)
    await server.astart(port)
    return server


def check_api_key(api_key: str | None) -> None:
    """Refuse a key no client could send: an empty one would quietly turn authentication off."""
    if api_key is None:
        return
    sendable = isinstance(api_key, str) and api_key.isascii() and api_key.isprintable() and " " not in api_key
    if not api_key or not sendable:
        raise ConfigError("the API key must be a non-empty string of printable ASCII characters without "
                          "spaces (it travels in the header 'Authorization: Bearer <key>'); pass "
                          "api_key=None to serve without a key")


def check_served_model_names(names) -> tuple[str, ...]:
    """``names`` (one string is one name) as a tuple; ConfigError unless each is a word a client
    can send (printable, no spaces) and none repeats."""
    names = (names,) if isinstance(names, str) else tuple(names or ())
    for name in names:
        if not isinstance(name, str) or not name or not name.isprintable() or any(c.isspace() for c in name):
            raise ConfigError(f"served model name {name!r} is not a word a client can send: use a non-empty "
                              "name without spaces, like llama-70b")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ConfigError(f"served model name {repeated[0]!r} is given twice; list each name once")
    return names


def _running_in(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False
