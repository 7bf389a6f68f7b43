"""Shared fixtures. Keep this file small: one fixture per need, documented where it is defined."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A function ``make(architecture="llama", tie_word_embeddings=False, num_layers=4, **kw)``
    that builds a tiny random model (see ``exo_lab.model.demo.build_random_model``) and returns its
    folder. Each argument set is built once per session."""
    from exo_lab.model.demo import build_random_model

    built = {}

    def make(architecture="llama", tie_word_embeddings=False, num_layers=4, **kw):
        key = (architecture, tie_word_embeddings, num_layers, tuple(sorted(kw.items())))
        if key not in built:
            folder = tmp_path_factory.mktemp(f"model-{architecture}-{num_layers}l")
            built[key] = build_random_model(
                folder / "model", architecture=architecture,
                tie_word_embeddings=tie_word_embeddings, num_layers=num_layers, **kw,
            )
        return built[key]

    return make


@pytest.fixture(scope="module")
def cluster():
    """A started 2-engine local cluster with "demo" loaded over both (one per test module; a
    module may define its own ``cluster`` instead). One torch thread per engine: the suite
    shares 2 cores."""
    import exo_lab

    with exo_lab.Cluster.local(engines=2, max_cores=1) as started:
        started.load("demo", min_stages=2, progress=False)
        yield started
