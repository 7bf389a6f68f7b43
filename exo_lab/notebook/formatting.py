"""The cluster's status as rows, plain text and HTML: what the dashboard, ``%exo status`` and
``repr`` show. Pure functions of the dict :meth:`exo_lab.Cluster.status` returns (no ipywidgets),
so a frontend without widgets, a log and a screenshot all show the same thing.

Layer ranges are shown inclusive ("0-2" is ``[0, 3)``), as ``exo_lab.planning.planner.format_plan`` does.
"""
from __future__ import annotations

import html
from dataclasses import dataclass

from ..control_types import EngineState
from ..units import format_bytes

# Every state an engine row shows (exo_lab.control_types.EngineState says what each means).
STATES = tuple(state.value for state in EngineState)


@dataclass(frozen=True)
class EngineView:
    """One engine as the dashboard shows it (derived from one row of ``status["engines"]``)."""

    engine_id: int
    node: str                       # the plan's name for it ("engine-0", "gpu-box"); "-" with no stage
    hostname: str
    device: str                     # "CPU", "NVIDIA H200 (cuda:0)", "CPU (gpu: true but torch has no CUDA)", "-"
    roles: str                      # what its stage holds: "embeddings + layers", "layers + head", ...
    layers: str                     # inclusive "0-2", "-" with no stage
    start_layer: int | None         # half-open [start_layer, stop_layer)
    stop_layer: int | None
    memory_used_bytes: int | None   # process RSS (CPU), or the stage's tensors (GPU)
    memory_budget_bytes: int | None # the planner's budget for the engine; None with no stage
    memory_what: str                # what memory_used_bytes measures: "RSS" or "tensors"
    state: str                      # one of STATES
    error: str | None
    speed: str = "-"                # its stage's ms per token, the plan's / measured: "27.4 / 30.1"

    @property
    def memory_fraction(self) -> float | None:
        """Used / budget, or None when either is unknown."""
        if not self.memory_used_bytes or not self.memory_budget_bytes:
            return None
        return self.memory_used_bytes / self.memory_budget_bytes

    @property
    def memory_text(self) -> str:
        if self.memory_used_bytes is None:
            return "-"
        used = f"{format_bytes(self.memory_used_bytes)} {self.memory_what}"
        if self.memory_budget_bytes is None:
            return used
        return f"{used} / {format_bytes(self.memory_budget_bytes)} ({self.memory_fraction:.0%})"


def engine_views(status: dict) -> list[EngineView]:
    """One :class:`EngineView` per engine row of ``status``, in engine id order."""
    plan = status.get("plan") or {}
    stages = plan.get("stages") or []
    num_layers = stages[-1]["stop_layer"] if stages else None
    return [_engine_view(row, num_layers, model_loaded=status.get("model") is not None)
            for row in status.get("engines") or []]


def _engine_view(row: dict, num_layers: int | None, *, model_loaded: bool) -> EngineView:
    start, stop = row.get("start_layer"), row.get("stop_layer")
    has_stage = start is not None and stop is not None
    used, what = _memory_used(row)
    return EngineView(
        engine_id=int(row["engine_id"]), node=row.get("node") or "-", hostname=row.get("hostname") or "-",
        device=device_label(row), roles=_roles(start, stop, num_layers, model_loaded),
        layers=f"{start}-{stop - 1}" if has_stage else "-", start_layer=start, stop_layer=stop,
        memory_used_bytes=used, memory_budget_bytes=row.get("budget_bytes"), memory_what=what,
        state=display_state(row), error=row.get("error"), speed=_speed(row))


def _speed(row: dict) -> str:
    """"27.4 / 30.1": the planner's ms per token for the stage, then the stages' measured mean
    step ("-" before the first token)."""
    planned, measured = row.get("planned_ms"), row.get("measured_ms")
    if planned is None:
        return "-"
    return f"{planned:.1f} / {measured:.1f}" if measured is not None else f"{planned:.1f} / -"


def device_label(row: dict) -> str:
    """"CPU", "NVIDIA H200 (cuda:0)" (``gpu_name``), "GPU (cuda:0)", "MPS"; with the row's
    ``device_note`` after it: "CPU (gpu: true but torch has no CUDA)"."""
    label = _device_name(row.get("device"), row.get("gpu_name"))
    return f"{label} ({row['device_note']})" if row.get("device_note") else label


def _device_name(device: str | None, gpu_name: str | None) -> str:
    if not device:
        return "-"
    if device == "cpu":
        return "CPU"
    if device.startswith("cuda"):
        return f"{gpu_name or 'GPU'} ({device})"
    return device.upper()


def display_state(row: dict) -> str:
    """One of STATES: the row's state, except that an idle stage holding a live request shows
    as generating. A stage counts as generating while it holds a live request's KV cache, not
    only during the few milliseconds of each forward: a status poll would almost never catch those.
    A row without a state is idle; one whose state is unknown is shown as it is."""
    state = row.get("state") or EngineState.IDLE
    if state == EngineState.IDLE and (row.get("active_requests") or 0) > 0:
        return EngineState.GENERATING.value
    return str(state)


def _memory_used(row: dict) -> tuple[int | None, str]:
    # A GPU stage's budget is GPU memory, which the process RSS does not measure.
    if row.get("kind") == "cuda":
        tensors = (row.get("parameter_bytes") or 0) + (row.get("kv_cache_bytes") or 0)
        return (tensors or None), "tensors"
    return row.get("rss_bytes"), "RSS"


def _roles(start: int | None, stop: int | None, num_layers: int | None, model_loaded: bool) -> str:
    if start is None or stop is None:
        return "unused" if model_loaded else "-"
    parts = ["layers"]
    if start == 0:
        parts.insert(0, "embeddings")
    if num_layers is not None and stop == num_layers:
        parts.append("head")
    return " + ".join(parts)


def metrics_line(metrics: dict | None) -> str:
    """"12.5 tokens/s, 1 request in flight (340 tokens, 4 requests, 0 errors so far)"."""
    if not metrics:
        return "no model loaded: no requests yet"
    in_flight = metrics.get("requests_in_flight", 0)
    slots = (f"; {metrics['running']}/{metrics['kv_slots']} KV slots, {metrics['queued']} queued"
             if "kv_slots" in metrics else "")
    if metrics.get("failovers_total"):
        slots += (f"; {metrics['failovers_total']} failover(s), {metrics['replayed_requests_total']} replayed, "
                  f"last pause {metrics['last_failover_pause_s'] or 0:.1f} s")
    if metrics.get("refused_steps_total"):
        slots += (f"; short of memory: {_count(metrics['refused_steps_total'], 'step')} refused, "
                  f"KV slots shed {metrics.get('sheds_total', 0)} time(s)")
    if metrics.get("draft_tokens_total"):
        slots += (f"; speculation: {metrics['draft_acceptance_rate']:.0%} of drafts accepted, "
                  f"{metrics['tokens_per_verify_trip']:.1f} tokens per trip")
    return (f"{metrics.get('tokens_per_s', 0.0):.1f} tokens/s, {_count(in_flight, 'request')} in flight "
            f"({_count(metrics.get('tokens_total', 0), 'token')}, "
            f"{_count(metrics.get('requests_total', 0), 'request')}, "
            f"{_count(metrics.get('errors_total', 0), 'error')} so far){slots}")


def title_line(status: dict) -> str:
    """"cluster local: ready, model demo, 2 engines"."""
    engines = len(status.get("engines") or [])
    model = status.get("model")
    state = status.get("state", "?")
    parts = [state] + ([f"model {model}"] if model else [] if state in ("no model", "stopped") else ["no model"])
    text = f"cluster {status.get('cluster_name', '?')}: {', '.join(parts)}, {_count(engines, 'engine')}"
    if status.get("failure"):
        text += f" - {status['failure']}"
    if status.get("memory"):
        text += f" - {status['memory']}"
    return text


def model_line(status: dict) -> str:
    """"demo: float32, 2 stage(s), predicted 0.77 ms/token", or how to load a model."""
    plan = status.get("plan")
    if not plan:
        return "no model loaded: cluster.load('demo') (or a model folder / hub id)"
    text = f"{status.get('model')}: {plan.get('dtype', '?')}, {len(plan.get('stages') or [])} stage(s)"
    if plan.get("predicted_ms_per_token") is not None:
        text += f", predicted {plan['predicted_ms_per_token']:.2f} ms/token"
    return text


COLUMNS = ("engine", "node", "host", "device", "roles", "layers", "ms/token (planned / measured)",
           "memory (used / budget)", "state")


def _cells(view: EngineView) -> tuple[str, ...]:
    return (str(view.engine_id), view.node, view.hostname, view.device, view.roles, view.layers, view.speed,
            view.memory_text, view.state)


def format_status(status: dict) -> str:
    """``cluster.status()`` as a plain-text table (``%exo status``, ``repr`` of the dashboard)."""
    rows = [COLUMNS, *(_cells(view) for view in engine_views(status))]
    widths = [max(len(row[col]) for row in rows) for col in range(len(COLUMNS))]
    lines = [title_line(status)]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines.append(metrics_line(status.get("metrics")))
    lines += [f"engine {view.engine_id}: {view.error}" for view in engine_views(status) if view.error]
    return "\n".join(lines)


STATE_COLORS = {EngineState.IDLE: "#6b7280", EngineState.LOADING: "#b45309", EngineState.GENERATING: "#15803d",
                EngineState.BUSY: "#1d4ed8", EngineState.FAILED: "#b91c1c", EngineState.STOPPED: "#6b7280",
                EngineState.SPARE: "#7c3aed"}


def memory_bar_color(fraction: float | None) -> str:
    """Green below 70 % of the budget, amber below 90 %, red above."""
    if fraction is None or fraction < 0.7:
        return "#16a34a"
    return "#d97706" if fraction < 0.9 else "#dc2626"


def status_html(status: dict) -> str:
    """``cluster.status()`` as a self-contained HTML table with memory bars (no scripts)."""
    head = "".join(f'<th style="padding: 2px 10px 2px 0">{html.escape(c)}</th>' for c in COLUMNS)
    body = "".join(_html_row(view) for view in engine_views(status))
    return (f'<div class="exo-lab-status" style="font-family: sans-serif; font-size: 13px">'
            f'<div style="font-weight: bold; margin-bottom: 4px">{html.escape(title_line(status))}</div>'
            f'<div style="margin-bottom: 4px">{html.escape(model_line(status))}</div>'
            f'<table style="border-collapse: collapse; text-align: left">'
            f'<thead><tr style="border-bottom: 1px solid #999">{head}</tr></thead><tbody>{body}</tbody>'
            f'</table><div style="margin-top: 4px">{html.escape(metrics_line(status.get("metrics")))}</div></div>')


def _html_row(view: EngineView) -> str:
    cells = [html.escape(c) for c in _cells(view)]
    cells[7] = _html_bar(view) + cells[7]
    color = STATE_COLORS.get(view.state, "#000")
    cells[8] = f'<span style="color: {color}; font-weight: bold">{cells[8]}</span>'
    title = f' title="{html.escape(view.error)}"' if view.error else ""
    return (f"<tr{title}>" + "".join(f'<td style="padding: 2px 10px 2px 0">{c}</td>' for c in cells)
            + "</tr>")


def _html_bar(view: EngineView) -> str:
    fraction = view.memory_fraction
    if fraction is None:
        return ""
    width = max(1.0, min(100.0, fraction * 100))
    return (f'<div style="display: inline-block; width: 120px; height: 10px; background: #e5e7eb; '
            f'margin-right: 6px; vertical-align: middle"><div style="width: {width:.1f}%; height: 100%; '
            f'background: {memory_bar_color(fraction)}"></div></div>')


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"
