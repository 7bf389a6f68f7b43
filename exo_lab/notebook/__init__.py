"""exo-lab in JupyterLab: the dashboard widget, magics, plots and experiments on the live shards.

>>> cluster.widget()                                   # live dashboard (ClusterWidget)
>>> print(format_status(cluster.status()))             # the same as a text table
>>> plot_placement(cluster.plan)                       # layers and memory per node
>>> with record_throughput(cluster):
...     cluster.generate("Hello", max_new_tokens=64)
>>> plot_throughput(cluster.metrics)
>>> plot_activations(stage_activations(cluster, "Hello"))   # hidden states stage by stage
>>> %load_ext exo_lab                                  # %exo status | plan | widget | px | use, %%chat

Names are imported on first use, so ``import exo_lab.notebook`` stays light (no ipywidgets,
matplotlib or torch until a function needs them).
"""
from __future__ import annotations

__all__ = [
    "ClusterWidget", "EngineRow", "format_status", "status_html", "engine_views", "EngineView",
    "plot_placement", "plot_throughput", "plot_activations", "record_throughput",
    "stage_activations", "stage_engines", "stage_view", "load_ipython_extension",
]

_HOMES = {
    "ClusterWidget": "widget", "EngineRow": "widget",
    "format_status": "formatting", "status_html": "formatting", "engine_views": "formatting",
    "EngineView": "formatting",
    "plot_placement": "plots", "plot_throughput": "plots", "plot_activations": "plots",
    "record_throughput": "plots",
    "stage_activations": "experiments", "stage_engines": "experiments", "stage_view": "experiments",
    "load_ipython_extension": "magics",
}


def __getattr__(name: str):
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'exo_lab.notebook' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"{__name__}.{home}"), name)


def __dir__() -> list[str]:
    return sorted(__all__)
