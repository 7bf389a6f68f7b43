"""ClusterWidget: a live ipywidgets dashboard of one cluster (``cluster.widget()``).

One row per engine (host, device, roles, layer range, memory against its budget, state) under a
line with the model and the cluster-wide tokens/s and requests in flight. A daemon thread keeps
it current without blocking the kernel: ``cluster.status()`` (one ipyparallel round trip per
engine, ~5 ms each) every ``interval_s``, the in-process metrics every ``metrics_interval_s``.
ipywidgets state set from that thread reaches the frontend through the kernel's comm.

The thread ends on :meth:`ClusterWidget.close`, on :meth:`ClusterWidget.stop`, and by itself
once the cluster is stopped (``not cluster.control.started``); ``close`` and ``stop`` join it.
"""
from __future__ import annotations

import logging
import threading
import time

import ipywidgets as widgets

from ..control_types import EngineState, Probe, received
from ..engine import probe as engine_probe
from . import remote
from ..errors import ExoLabError
from .formatting import (STATE_COLORS, EngineView, engine_views, format_status, memory_bar_color,
                         model_line, status_html, title_line)

logger = logging.getLogger(__name__)

REFRESH_INTERVAL_S = 1.0      # cluster.status(): one ipyparallel round trip per engine
METRICS_INTERVAL_S = 0.25     # metrics live in this process: cheap to read often
JOIN_TIMEOUT_S = 10.0         # a status call in flight gives up after 3 s (exo_lab.status)
PROBE_TIMEOUT_S = 10.0   # the first probe of a fresh engine imports torch: seconds on a busy PC

# Column widths, shared by the header and the rows so they line up.
_WIDTHS = {"engine": "55px", "node": "90px", "host": "110px", "device": "170px", "roles": "190px",
           "layers": "60px", "speed": "120px", "bar": "120px", "memory": "230px", "state": "90px"}


def _label(value: str = "", width: str = "auto", bold: bool = False) -> widgets.Label:
    style = {"font_weight": "bold"} if bold else {}
    return widgets.Label(value=value, layout=widgets.Layout(width=width, overflow="hidden"), style=style)


class EngineRow(widgets.HBox):
    """One engine's row. Its parts are widgets whose ``value`` tests and code can read:
    ``node``, ``host``, ``device``, ``roles``, ``layers``, ``speed`` (ms per token: planned / measured), ``memory`` (a FloatProgress of used /
    budget, 0..1), ``memory_label``, ``state``. ``view`` is the :class:`EngineView` shown."""

    def __init__(self, engine_id: int):
        self.engine_id = engine_id
        self.view: EngineView | None = None
        self.engine = _label(str(engine_id), _WIDTHS["engine"])
        self.node = _label("-", _WIDTHS["node"])
        self.host = _label("-", _WIDTHS["host"])
        self.device = _label("-", _WIDTHS["device"])
        self.roles = _label("-", _WIDTHS["roles"])
        self.layers = _label("-", _WIDTHS["layers"])
        self.speed = _label("-", _WIDTHS["speed"])
        self.memory = widgets.FloatProgress(value=0.0, min=0.0, max=1.0,
                                            layout=widgets.Layout(width=_WIDTHS["bar"]))
        self.memory_label = _label("-", _WIDTHS["memory"])
        self.state = _label("-", _WIDTHS["state"], bold=True)
        super().__init__([self.engine, self.node, self.host, self.device, self.roles, self.layers, self.speed,
                          self.memory, self.memory_label, self.state])

    def show(self, view: EngineView) -> None:
        """Put ``view``'s values in the row (ipywidgets sends only the ones that changed)."""
        self.view = view
        self.node.value, self.host.value, self.device.value = view.node, view.hostname, view.device
        self.roles.value, self.layers.value, self.speed.value = view.roles, view.layers, view.speed
        fraction = view.memory_fraction
        self.memory.value = min(1.0, fraction) if fraction is not None else 0.0
        self.memory.style.bar_color = memory_bar_color(fraction)
        self.memory_label.value = view.memory_text
        self.state.value = view.state
        self.state.style.text_color = STATE_COLORS.get(view.state, "black")
        self.state.tooltip = view.error or None

    def show_state(self, state: str, error: str | None = None) -> None:
        self.state.value = state
        self.state.style.text_color = STATE_COLORS.get(state, "black")
        self.state.tooltip = error


class ClusterWidget(widgets.VBox):
    """A live dashboard of ``cluster``; display it in a notebook (``cluster.widget()``).

    Parameters: ``interval_s`` between status polls (each costs one ipyparallel round trip per
    engine), ``metrics_interval_s`` between reads of tokens/s and requests in flight (each read
    also appends a point to ``cluster.metrics.history``, which :func:`plot_throughput` draws),
    ``autostart``: start the refresh thread now (else call :meth:`start` or :meth:`refresh`).

    Readable state: ``rows`` (an :class:`EngineRow` per engine, in engine id order), ``title``,
    ``model``, ``throughput`` (a FloatProgress whose value is tokens/s), ``throughput_label``,
    ``in_flight`` (a Label), ``status`` (the last ``cluster.status()`` dict). ``repr`` is the
    status as a text table, for frontends without widgets.
    """

    def __init__(self, cluster, *, interval_s: float = REFRESH_INTERVAL_S,
                 metrics_interval_s: float = METRICS_INTERVAL_S, autostart: bool = True):
        if not (interval_s > 0 and metrics_interval_s > 0):
            raise ValueError(f"interval_s and metrics_interval_s must be > 0 seconds, got {interval_s!r} and "
                             f"{metrics_interval_s!r}; the defaults are {REFRESH_INTERVAL_S} and {METRICS_INTERVAL_S}")
        self.cluster = cluster
        self.interval_s = float(interval_s)
        self.metrics_interval_s = float(metrics_interval_s)
        self.status: dict = {"cluster_name": cluster.config.cluster_name, "state": "starting", "engines": []}
        self.rows: list[EngineRow] = []
        self._rows_by_id: dict[int, EngineRow] = {}
        self._engine_info: dict[tuple[int, str | None], dict] = {}   # probe cache: (engine id, device)
        self._peak_tokens_per_s = 1.0
        self._stop_event = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()          # one refresh at a time (thread and refresh() callers)
        self.title = widgets.HTML()
        self.model = _label("", "auto")
        self.throughput = widgets.FloatProgress(value=0.0, min=0.0, max=1.0, description="tokens/s",
                                                layout=widgets.Layout(width="320px"))
        self.throughput_label = _label("0.0 tokens/s", "110px")
        self.in_flight = _label("0 requests in flight", "330px")
        self._throughput_box = widgets.HBox([self.throughput, self.throughput_label, self.in_flight])
        self._table = widgets.VBox([self._header()])
        super().__init__([self.title, self.model, self._throughput_box, self._table])
        self.refresh()
        if autostart:
            self.start()

    # ------------------------------------------------------------------ lifecycle
    @property
    def running(self) -> bool:
        """Whether the refresh thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> "ClusterWidget":
        """Start the refresh thread (no-op when it runs or the cluster is stopped)."""
        if self.running or not self.cluster.control.started:
            return self
        self._stop_event.clear()
        self._thread = threading.Thread(target=self._run, name=f"exo-lab-widget-{id(self):x}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop refreshing and wait for the thread to end; the widget stays on screen."""
        self._stop_event.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(JOIN_TIMEOUT_S)
            if thread.is_alive():
                logger.warning("the dashboard's refresh thread did not end within %.0f s", JOIN_TIMEOUT_S)

    def close(self) -> None:
        """Stop refreshing (joining the thread) and remove the widget and its parts."""
        self.stop()
        parts = [self.title, self.model, self.throughput, self.throughput_label, self.in_flight,
                 self._throughput_box, self._table, *self._table.children[0].children, self._table.children[0]]
        for row in self.rows:
            parts += [*row.children, row]
        for part in parts:
            part.close()
        super().close()

    def _run(self) -> None:
        next_status_s = time.monotonic() + self.interval_s
        while not self._stop_event.wait(self.metrics_interval_s):
            if not self.cluster.control.started:
                self._show_stopped()
                return
            try:
                if time.monotonic() >= next_status_s:
                    next_status_s = time.monotonic() + self.interval_s
                    self.refresh()
                else:
                    self._refresh_metrics()
            except Exception as exc:  # the dashboard must outlive a failed poll (e.g. during stop())
                if not self.cluster.control.started:
                    self._show_stopped()
                    return
                logger.debug("dashboard refresh failed: %s", exc)
                self.title.value = (f"<b>exo-lab</b> &middot; {title_line(self.status)} "
                                    f"<span style='color: #b91c1c'>(refresh failed: {exc})</span>")

    # ------------------------------------------------------------------ refresh
    def refresh(self) -> dict:
        """Poll ``cluster.status()`` once and show it; returns the status dict."""
        with self._lock:
            if not self.cluster.control.started:
                self._show_stopped()
                return self.status
            status = self._with_engine_info(self.cluster.status())
            status = self._mark_busy_or_gone(status)
            self.status = status
            self._show(status)
            self._refresh_metrics()
            return status

    def _show(self, status: dict) -> None:
        self.title.value = f"<b>exo-lab</b> &middot; {title_line(status)}"
        self.model.value = model_line(status)
        views = engine_views(status)
        self._ensure_rows([view.engine_id for view in views])
        for view in views:
            self._rows_by_id[view.engine_id].show(view)

    def _refresh_metrics(self) -> None:
        try:
            metrics = self.cluster.metrics
        except ExoLabError:       # no model loaded, or the pipeline failed: nothing to count
            self.throughput.value, self.throughput_label.value = 0.0, "-"
            self.in_flight.value = "no model loaded"
            return
        _, tokens_per_s, in_flight = metrics.sample()
        self._peak_tokens_per_s = max(self._peak_tokens_per_s, tokens_per_s)
        self.throughput.max = self._peak_tokens_per_s
        self.throughput.value = tokens_per_s
        self.throughput_label.value = f"{tokens_per_s:.1f} tokens/s"
        failovers = (f"; {metrics.failovers_total} failover(s), {metrics.replayed_total} replayed, last pause "
                     f"{metrics.last_pause_s or 0:.1f} s" if metrics.failovers_total else "")
        self.in_flight.value = (f"{in_flight} request{'' if in_flight == 1 else 's'} in flight; "
                                f"{metrics.running}/{metrics.kv_slots} KV slots, {metrics.queued} queued{failovers}")

    def _ensure_rows(self, engine_ids: list[int]) -> None:
        missing = [eid for eid in engine_ids if eid not in self._rows_by_id]
        if not missing:
            return
        for engine_id in missing:
            self._rows_by_id[engine_id] = EngineRow(engine_id)
        self.rows = [self._rows_by_id[eid] for eid in sorted(self._rows_by_id)]
        self._table.children = [self._table.children[0], *self.rows]

    def _show_stopped(self) -> None:
        engines = [{**row, "state": EngineState.STOPPED.value, "error": None} for row in self.status.get("engines", [])]
        self.status = {**self.status, "state": "stopped", "engines": engines, "metrics": None}
        self.title.value = f"<b>exo-lab</b> &middot; cluster {self.status.get('cluster_name', '?')}: stopped"
        self.throughput.value, self.throughput_label.value = 0.0, "-"
        self.in_flight.value = "cluster stopped"
        for row in self.rows:
            row.show_state(EngineState.STOPPED.value)

    # ------------------------------------------------------------------ enrichment
    def _with_engine_info(self, status: dict) -> dict:
        """Fill hostname and a readable device name into rows that lack them (an engine with no
        stage reports neither; a GPU's name is not in the status). Probed once per engine and
        device, so polling stays one round trip per engine."""
        rows = []
        for row in status.get("engines", []):
            info = self._engine_info.get((row["engine_id"], row.get("device")))
            if info is None:
                info = self._probe(row)
            rows.append({**info, **{k: v for k, v in row.items() if v is not None}})
        return {**status, "engines": rows}

    def _probe(self, row: dict) -> dict:
        engine_id, device = row["engine_id"], row.get("device")
        try:
            call = self.cluster.control.call
            if device is None:
                probe = call(engine_id, engine_probe.probe_resources, False, timeout_s=PROBE_TIMEOUT_S,
                             what="probing")
                info = {"hostname": received(probe, Probe, f"engine {engine_id}").hostname}
            else:
                info = {"device_name": call(engine_id, remote.describe_device, device,
                                            timeout_s=PROBE_TIMEOUT_S, what="describing its device")}
        except Exception as exc:  # a busy or dead engine: show what the status has, try again later
            logger.debug("probing engine %d failed: %s", engine_id, exc)
            return {}
        self._engine_info[(engine_id, device)] = info
        return info

    def _mark_busy_or_gone(self, status: dict) -> dict:
        """An engine that missed the status call while ipyparallel has work queued for it is
        busy (a long %%px cell), not failed; an engine that left keeps its row, as failed."""
        rows = list(status.get("engines", []))
        if any(row.get("state") == EngineState.FAILED for row in rows):
            queues = self._queue_status()
            for index, row in enumerate(rows):
                if row.get("state") == EngineState.FAILED and queues.get(row["engine_id"], {}).get("queue", 0) > 0:
                    rows[index] = {**row, "state": EngineState.BUSY.value}
        present = {row["engine_id"] for row in rows}
        for engine_id, old in self._rows_by_id.items():
            if engine_id not in present and old.view is not None:
                gone = {"engine_id": engine_id, "node": old.view.node, "hostname": old.view.hostname,
                        "state": EngineState.FAILED.value,
                        "error": "this engine is no longer registered with the controller"}
                rows.append(gone)
        return {**status, "engines": sorted(rows, key=lambda row: row["engine_id"])}

    def _queue_status(self) -> dict:
        try:
            return self.cluster.control.queue_status()
        except Exception as exc:
            logger.debug("queue_status failed: %s", exc)
            return {}

    # ------------------------------------------------------------------ display
    @staticmethod
    def _header() -> widgets.HBox:
        names = [("engine", "engine"), ("node", "node"), ("host", "host"), ("device", "device"),
                 ("roles", "roles"), ("layers", "layers"), ("speed", "ms/token plan / real"), ("bar", "memory"),
                 ("memory", "used / budget"),
                 ("state", "state")]
        return widgets.HBox([_label(text, _WIDTHS[key], bold=True) for key, text in names])

    def __repr__(self) -> str:
        return format_status(self.status)

    def _repr_html_(self) -> str:
        return status_html(self.status)

    def _repr_mimebundle_(self, **kwargs):
        # Frontends without the widget manager (nbconvert, a terminal) fall back to these.
        data = super()._repr_mimebundle_(**kwargs)
        if data is not None:
            data["text/plain"] = repr(self)
            data["text/html"] = self._repr_html_()
        return data
