"""Matplotlib figures of a plan, the cluster's throughput and per-stage activations.

matplotlib is imported when a function is called (the core never imports it). Every function
returns its ``Figure``, already detached from pyplot: it shows once as a cell's value in Jupyter
and can be saved with ``fig.savefig(...)``; nothing piles up in pyplot's figure list.
"""
from __future__ import annotations

import contextlib
import copy
import threading
from collections.abc import Iterable, Iterator

from ..units import format_bytes

# Stacked memory parts of a stage, bottom to top, with their colours.
MEMORY_PARTS = (("weights_bytes", "weights", "#2563eb"), ("kv_cache_bytes", "KV cache", "#f59e0b"),
                ("workspace_bytes", "workspace", "#a855f7"), ("overhead_bytes", "runtime overhead", "#64748b"))
FREE_COLOR = "#e5e7eb"
STAGE_COLORS = ("#2563eb", "#16a34a", "#dc2626", "#9333ea", "#ea580c", "#0891b2", "#ca8a04", "#db2777")


def _new_figure(**kwargs):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(**kwargs)
    plt.close(fig)   # returned, not left in pyplot: shown once, and no leak across calls
    return fig, axes


# ----------------------------------------------------------------------------- placement

def plot_placement(plan, *, title: str | None = None):
    """Layers against nodes, and each node's memory: weights, KV cache, workspace, runtime
    overhead and what is left of its budget, as stacked bars.

    ``plan``: an :class:`exo_lab.planning.planner.Plan` (``cluster.plan``) or its JSON form
    (``plan.to_json()``, ``cluster.status()["plan"]``; there workspace and overhead are one part).
    Nodes the plan leaves unused are listed with the planner's reason. Returns the Figure.
    """
    plan = _plan_dict(plan)
    stages = plan["stages"]
    unused = plan.get("unused_nodes") or []
    names = [s["node"] for s in stages] + [u["node"] for u in unused]
    height_in = 2.0 + 0.5 * len(names)
    fig, (ax_layers, ax_memory) = _new_figure(
        ncols=2, figsize=(12, height_in), gridspec_kw={"width_ratios": [1, 1.25]})
    y = list(range(len(names)))[::-1]           # first stage at the top, like the pipeline reads
    _draw_layers(ax_layers, stages, unused, y)
    _draw_memory(ax_memory, stages, y)
    for ax in (ax_layers, ax_memory):
        ax.set_yticks(y, names)
        ax.set_ylim(-0.6, len(names) - 0.4)
    ax_memory.tick_params(labelleft=False)
    fig.suptitle(title or f"{plan['model']} ({plan['dtype']}): {len(stages)} stage(s), predicted "
                 f"{plan['predicted_ms_per_token']:.2f} ms/token, max_context {plan['max_context']}"
                 f" x max_batch {plan['max_batch']}", fontsize=11)
    handles, labels = ax_memory.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    fig.legend(unique.values(), unique.keys(), loc="lower center", ncol=len(unique), fontsize=8, frameon=False)
    legend_in = 0.35
    fig.tight_layout(rect=(0, legend_in / height_in, 1, 1))
    return fig


def _plan_dict(plan) -> dict:
    if isinstance(plan, dict):
        return copy.deepcopy(plan)     # parts are added to its stages below; the caller's stays as it was
    data = plan.to_json()
    for stage_json, stage in zip(data["stages"], plan.stages):
        stage_json.update(workspace_bytes=stage.workspace_bytes, overhead_bytes=stage.overhead_bytes,
                          has_embeddings=stage.has_embeddings, has_head=stage.has_head)
    return data


def _draw_layers(ax, stages: list[dict], unused: list[dict], y: list[int]) -> None:
    num_layers = stages[-1]["stop_layer"]
    for index, (stage, row) in enumerate(zip(stages, y)):
        start, stop = stage["start_layer"], stage["stop_layer"]
        color = STAGE_COLORS[index % len(STAGE_COLORS)]
        ax.barh(row, stop - start, left=start, height=0.6, color=color)
        roles = (["embed"] if start == 0 else []) + (["head"] if stop == num_layers else [])
        label = f"{start}-{stop - 1}" + (f" + {', '.join(roles)}" if roles else "")
        if (stop - start) / num_layers >= 0.3:
            ax.text(start + (stop - start) / 2, row, label, ha="center", va="center", color="white", fontsize=9)
        elif stop / num_layers <= 0.7:     # too narrow to hold its label: write it beside the bar
            ax.text(stop + num_layers * 0.01, row, label, ha="left", va="center", fontsize=9)
        else:
            ax.text(start - num_layers * 0.01, row, label, ha="right", va="center", fontsize=9)
    for entry, row in zip(unused, y[len(stages):]):
        ax.text(0, row, f"unused: {_shorten(entry['reason'], 70)}", va="center", fontsize=8, color="#6b7280")
    ax.set_xlim(0, num_layers)
    ax.set_xlabel(f"decoder layer (of {num_layers})")
    ax.set_title("layers per node", fontsize=10)


def _draw_memory(ax, stages: list[dict], y: list[int]) -> None:
    scale, unit = _byte_unit(max(max(s["budget_bytes"], s["total_bytes"]) for s in stages))
    for stage, row in zip(stages, y):
        left = 0.0
        for key, label, color in _memory_parts(stage):
            width = stage[key] / scale
            ax.barh(row, width, left=left, height=0.6, color=color, label=label)
            left += width
        free = max(0, stage["budget_bytes"] - stage["total_bytes"]) / scale
        ax.barh(row, free, left=left, height=0.6, color=FREE_COLOR, edgecolor="#9ca3af",
                hatch="//", label="free of budget")
        ax.text(left + free, row, f" {format_bytes(stage['total_bytes'])} / {format_bytes(stage['budget_bytes'])}",
                va="center", fontsize=8)
    ax.set_xlim(0, ax.get_xlim()[1] * 1.25)      # room for the totals written after the bars
    ax.set_xlabel(f"memory ({unit})")
    ax.set_title("memory per node (planned) against its budget", fontsize=10)


def _memory_parts(stage: dict):
    if "workspace_bytes" in stage:
        return MEMORY_PARTS
    # The JSON form has no workspace / overhead split: show what is left of the total as one part.
    stage["other_bytes"] = stage["total_bytes"] - stage["weights_bytes"] - stage["kv_cache_bytes"]
    return MEMORY_PARTS[:2] + (("other_bytes", "workspace + overhead", "#64748b"),)


def _byte_unit(largest: int) -> tuple[float, str]:
    for scale, unit in ((1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "KB")):
        if largest >= scale:
            return scale, unit
    return 1.0, "B"


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ----------------------------------------------------------------------------- throughput

def plot_throughput(metrics, *, title: str = "cluster throughput"):
    """Tokens/s (left axis) and requests in flight (right axis) over time.

    ``metrics``: ``cluster.metrics`` (its ``history``, which the dashboard and
    :func:`record_throughput` fill) or a sequence of ``(time, tokens/s, in_flight)`` points.
    Returns the Figure (with a note instead of lines when there are no points yet).
    """
    points = list(getattr(metrics, "history", metrics))
    fig, ax = _new_figure(figsize=(9, 3.2))
    ax.set_title(title, fontsize=11)
    ax.set_xlabel("seconds")
    if not points:
        ax.text(0.5, 0.5, "no samples yet: display cluster.widget() or wrap the work in "
                "record_throughput(cluster)", ha="center", va="center", transform=ax.transAxes)
        return fig
    start = points[0][0]
    seconds = [t - start for t, _, _ in points]
    ax.plot(seconds, [tps for _, tps, _ in points], color="#2563eb", label="tokens/s")
    ax.set_ylabel("tokens/s", color="#2563eb")
    ax.set_ylim(bottom=0)
    flight = ax.twinx()
    flight.step(seconds, [n for _, _, n in points], where="post", color="#f59e0b", label="requests in flight")
    flight.set_ylabel("requests in flight", color="#f59e0b")
    flight.set_ylim(0, max(1, max(n for _, _, n in points)) * 1.2)
    flight.yaxis.get_major_locator().set_params(integer=True)
    fig.tight_layout()
    return fig


@contextlib.contextmanager
def record_throughput(source, interval_s: float = 0.2) -> Iterator[object]:
    """Sample tokens/s and requests in flight into ``metrics.history`` every ``interval_s`` while
    the block runs (a thread, joined on exit); yields the Metrics. ``source``: a Cluster with a
    model loaded, or its ``metrics``.

    >>> with record_throughput(cluster) as metrics:
    ...     cluster.generate("Hello", max_new_tokens=64)
    >>> plot_throughput(metrics)
    """
    metrics = source.metrics if hasattr(source, "control") else source
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            metrics.sample()
            stop.wait(interval_s)

    thread = threading.Thread(target=sample, name="exo-lab-throughput-sampler", daemon=True)
    thread.start()
    try:
        yield metrics
    finally:
        stop.set()
        thread.join()
        metrics.sample()    # the point after the work, so the plot shows the drop back to idle


# ----------------------------------------------------------------------------- activations

def plot_activations(activations: Iterable[dict], *, title: str = "hidden states through the pipeline"):
    """Each decoder layer's output RMS (coloured by stage) and each stage's forward time, from
    :func:`exo_lab.notebook.stage_activations` (run with ``layer_stats=True``). Returns the Figure."""
    activations = list(activations)
    fig, (ax_rms, ax_ms) = _new_figure(ncols=2, figsize=(12, 3.4), gridspec_kw={"width_ratios": [2.2, 1]})
    for stage in activations:
        color = STAGE_COLORS[stage["stage_index"] % len(STAGE_COLORS)]
        layers = stage.get("layers") or []
        ax_rms.plot([entry["layer"] for entry in layers], [entry["rms"] for entry in layers], "o-",
                    color=color, label=f"stage {stage['stage_index']} ({stage['node']})")
        ax_rms.axvspan(stage["start_layer"] - 0.5, stage["stop_layer"] - 0.5, color=color, alpha=0.07)
    ax_rms.set_xlabel("decoder layer")
    ax_rms.set_ylabel("output RMS")
    ax_rms.legend(fontsize=8)
    ax_rms.set_title("layer outputs", fontsize=10)
    labels = [f"{s['stage_index']}: {s['start_layer']}-{s['stop_layer'] - 1}" for s in activations]
    ax_ms.bar(labels, [s["forward_ms"] for s in activations],
              color=[STAGE_COLORS[s["stage_index"] % len(STAGE_COLORS)] for s in activations])
    ax_ms.set_xlabel("stage: layers")
    ax_ms.set_ylabel("forward ms (prefill)")
    ax_ms.set_title("forward time per stage", fontsize=10)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- fine-tuning

def loss_plot(job, ax=None):
    """A fine-tuning job's loss per optimizer step (``job.plot()``); returns the Figure."""
    if ax is None:
        fig, ax = _new_figure(figsize=(6, 3))
    else:
        fig = ax.figure
    steps = [h["step"] for h in job.history]
    ax.plot(steps, [h["loss"] for h in job.history], color=STAGE_COLORS[0], marker="." if len(steps) < 50 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (assistant tokens)")
    ax.set_title(f"fine-tuning {job.name}: step {job.step} of {job.total_steps} ({job.status})")
    ax.set_xlim(0, max(job.total_steps, 1))
    ax.grid(alpha=0.3)
    return fig
