"""Shared fixtures. Keep this file small: one fixture per need, documented where it is defined."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A function ``make(architecture="llama", tie_word_embeddings=False, num_layers=4, **kw)``
    that builds a tiny random model (see ``exo_lab.weights.demo.build_random_model``) and returns its
    folder. Each argument set is built once per session."""
    from exo_lab.weights.demo import build_random_model

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


@pytest.fixture
def netlab_required(request):
    """Fail, rather than skip, a netlab module's test where its ``REASON`` says the lab cannot run
    here, under CI's EXO_LAB_REQUIRE_NETLAB=1 (netlab.skip_unless_required asks for this)."""
    import netlab

    netlab.require(request.module.REASON)


@pytest.fixture(scope="module")
def cluster():
    """A started 2-engine local cluster with "demo" loaded over both (one per test module; a
    module may define its own ``cluster`` instead). One torch thread per engine: the suite
    shares 2 cores."""
    import exo_lab

    with exo_lab.Cluster.local(engines=2, max_cores=1) as started:
        started.load("demo", min_stages=2, progress=False)
        yield started


TWO_PROCESS_CONFIG = """\
cluster_name: services_test
devices:
  - hostname: coordinator.test
    roles: [coordinator]
    address: 127.0.0.1
  - hostname: worker-a.test
    roles: [compute]
    max_memory: 4GB
    max_cores: 1
    engines: 2
network:
  discovery: manual
  port_range: {first_port}-{last_port}
  secret_file: secret.txt
api:
  port: {api_port}
"""


@pytest.fixture
def two_process_config(tmp_path):
    """A config.yaml (and its secret.txt beside it) for `python -m exo_lab.server` and one
    `python -m exo_lab.worker` on this machine: a coordinator and a compute PC of 2 engines,
    manual discovery at 127.0.0.1, free ports. Returns its path."""
    from exo_lab.security import new_secret, write_secret_file
    from ports import free_port, free_port_range

    first = free_port_range()
    path = tmp_path / "config.yaml"
    path.write_text(TWO_PROCESS_CONFIG.format(first_port=first, last_port=first + 99, api_port=free_port()))
    write_secret_file(tmp_path / "secret.txt", new_secret())
    return path
