"""exo-lab: the PCs a team already owns as one cluster for large language models.

>>> import exo_lab
>>> with exo_lab.Cluster.local(engines=2) as cluster:
...     cluster.load("demo")
...     print(cluster.generate("Hello", max_new_tokens=8).text)
"""
from __future__ import annotations

__version__ = "0.1.0"

from .errors import ClusterError, ConfigError, ExoLabError, ModelError, PlanError, RequestError

__all__ = [
    "Cluster", "load_config", "plan_layers", "SamplingParams", "GenerationResult",
    "ExoLabError", "ConfigError", "ModelError", "PlanError", "ClusterError", "RequestError",
    "load_ipython_extension", "__version__",
]


def __getattr__(name: str):
    # Heavy imports (torch, ipyparallel) only when used: `exo-lab check-config` stays fast.
    if name == "Cluster":
        from .cluster import Cluster
        return Cluster
    if name == "load_config":
        from .config import load_config
        return load_config
    if name == "plan_layers":
        from .planning.planner import plan_layers
        return plan_layers
    if name in ("SamplingParams", "GenerationResult"):
        from . import sampling
        return getattr(sampling, name)
    raise AttributeError(f"module 'exo_lab' has no attribute {name!r}")


def load_ipython_extension(ipython) -> None:
    """`%load_ext exo_lab`: registers the %exo and %%chat magics."""
    from .notebook.magics import load_ipython_extension as load

    load(ipython)
