"""The browser face of the API server: the chat page at ``/``, the dashboard at ``/dashboard``, and
``GET /v1/cluster/status`` that the dashboard polls.

The pages are plain HTML, CSS and JavaScript modules under ``exo_lab/api/static`` (no build
step). They hold no secret: they are served without the API key, and every call they make to
``/v1`` carries the key the user typed (kept in the tab's sessionStorage) when the server has one.

``/v1/cluster/status`` is ``cluster.status()`` - the very dict the notebook widget shows - plus
``display``: the same title, model and metrics lines and engine rows the widget derives from it
(exo_lab.notebook.formatting), so the dashboard and the widget cannot drift apart; and
``served_model_names``: the names an API client may send as ``model`` (the dashboard shows them).
"""
from __future__ import annotations

import asyncio
import dataclasses
import re
from pathlib import Path

import tornado.web

from ..notebook.formatting import engine_views, metrics_line, model_line, title_line
from .base import ApiHandler

STATIC_DIR = Path(__file__).resolve().parent / "static"
STATIC_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}")      # the files under STATIC_DIR
PAGES = {"chat": "chat.html", "dashboard": "dashboard.html"}
# Everything a page loads comes from this server; nothing may reach any other address.
CONTENT_SECURITY_POLICY = ("default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
                           "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'")


def page_routes(server) -> list[tuple]:
    """The routes of the pages and the status endpoint, for make_app."""
    status = SharedStatus(server.cluster)
    return [
        (r"/", PageHandler, {"server": server, "page": PAGES["chat"]}),
        (r"/dashboard/?", PageHandler, {"server": server, "page": PAGES["dashboard"]}),
        (r"/static/(.+)", StaticHandler, {"path": str(STATIC_DIR)}),
        (r"/v1/cluster/status", ClusterStatusHandler, {"server": server, "status": status}),
    ]


class PageHandler(ApiHandler):
    """GET / and /dashboard: one HTML file from the package (open: the page holds no secret)."""

    requires_key = False

    def initialize(self, server, page: str) -> None:
        super().initialize(server)
        self.page = page

    def get(self) -> None:
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.set_header("Content-Security-Policy", CONTENT_SECURITY_POLICY)
        self.set_header("Cache-Control", "no-cache")
        self.finish((STATIC_DIR / self.page).read_bytes())


class StaticHandler(tornado.web.StaticFileHandler):
    """The pages' scripts and styles; revalidated on every load so an upgrade shows at once.
    A name that is not a plain file name (``..``, a NUL byte, a dot file) is a 404 before any
    file-system call: ``/static/a%00`` made os.stat raise, a 500 with a traceback in the log."""

    def parse_url_path(self, url_path: str) -> str:
        if not STATIC_NAME.fullmatch(url_path):
            raise tornado.web.HTTPError(404)
        return super().parse_url_path(url_path)

    def set_extra_headers(self, path: str) -> None:
        self.set_header("Cache-Control", "no-cache")
        self.set_header("X-Content-Type-Options", "nosniff")


class SharedStatus:
    """``cluster.status()`` run off the event loop (it blocks on ipyparallel for up to ~3 s), at
    most one call at a time: dashboards polling together share the call in flight."""

    def __init__(self, cluster):
        self.cluster = cluster
        self._pending: asyncio.Future | None = None

    async def get(self) -> dict:
        if self._pending is None or self._pending.done():
            self._pending = asyncio.get_running_loop().run_in_executor(None, self.cluster.status)
        # shield: a client that hangs up must not cancel the call the others wait for
        return await asyncio.shield(self._pending)


class ClusterStatusHandler(ApiHandler):
    """GET /v1/cluster/status: ``cluster.status()`` plus ``display`` and ``served_model_names``
    (needs the API key when set)."""

    def initialize(self, server, status: SharedStatus) -> None:
        super().initialize(server)
        self.shared_status = status

    async def get(self) -> None:
        status = await self.shared_status.get()
        names = list(self.server.model_names()) if self.cluster.loaded else []
        self.write_json({**status, "display": status_display(status), "served_model_names": names})


def status_display(status: dict) -> dict:
    """What the widget shows for ``status``, as JSON: its three lines and one row per engine."""
    return {
        "title": title_line(status),
        "model": model_line(status),
        "metrics": metrics_line(status.get("metrics")),
        "engines": [{**dataclasses.asdict(view), "memory_fraction": view.memory_fraction,
                     "memory_text": view.memory_text} for view in engine_views(status)],
    }
