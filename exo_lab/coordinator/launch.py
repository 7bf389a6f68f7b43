"""Starting and joining the ipyparallel control plane: controller, engines, their environment.

The settings here are the same as in the repository's ``profiles/profile_exo_lab`` (a test
checks that they agree), so a data scientist's own ``ipcluster`` matches what exo-lab starts.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

from ..errors import ClusterError

logger = logging.getLogger(__name__)

# A dead engine is noticed after HEARTBEAT_PERIOD_MS x (HEARTBEAT_MISSES + 1) at most.
HEARTBEAT_PERIOD_MS = 1000
HEARTBEAT_MISSES = 4
CONTROLLER_PORT_SPAN = 30   # the controller uses ports [controller_port, controller_port + span)


def controller_args(port: int | None = None) -> list[str]:
    args = [f"--HeartMonitor.period={HEARTBEAT_PERIOD_MS}",
            f"--HeartMonitor.max_heartmonitor_misses={HEARTBEAT_MISSES}",
            "--IPController.db_class=NoDB"]
    if port:
        args.append(f"--ports={port}-{port + CONTROLLER_PORT_SPAN - 1}")
    return args


def engine_environment(*, threads: int | None, device_name: str | None = None) -> dict[str, str]:
    """Environment for an engine process, set before torch is imported there.

    OMP_WAIT_POLICY=PASSIVE keeps a stage that waits for its next message from spinning on
    cores the neighbouring stage on the same machine is computing with.
    """
    env = {"OMP_WAIT_POLICY": "PASSIVE", "TOKENIZERS_PARALLELISM": "false", "PYTHONFAULTHANDLER": "1",
           "PYTHONUNBUFFERED": "1"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
        env["MKL_NUM_THREADS"] = str(threads)
    if device_name:
        env["EXO_LAB_DEVICE"] = device_name
    return env


def default_profile_dir(cluster_name: str) -> Path:
    """Where a named cluster keeps its ipyparallel profile (connection files, logs)."""
    base = Path(os.environ.get("EXO_LAB_HOME", Path.home() / ".exo_lab"))
    return base / "profiles" / f"profile_{cluster_name}"


def temporary_profile_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="exo-lab-profile-"))


def make_ipp_cluster(*, profile_dir: Path, controller_ip: str, controller_location: str | None,
                     port: int | None):
    """An ipyparallel.Cluster configured as exo-lab runs it (not yet started). Start engines
    with ``start_engines(n, environment=engine_environment(...))``."""
    import ipyparallel as ipp

    # ipyparallel logs to stdout inside IPython (every engine's exit lands in the notebook cell):
    # route it into exo-lab's logging instead, quiet unless something fails.
    log = logging.getLogger("exo_lab.ipyparallel")
    if log.level == logging.NOTSET:
        log.setLevel(logging.ERROR)
    cluster = ipp.Cluster(
        log=log,
        profile_dir=str(profile_dir),
        controller_ip=controller_ip,
        controller_location=controller_location or "",
        controller_args=controller_args(port),
        log_level=logging.WARNING,
        shutdown_atexit=True,
    )
    return cluster


def engine_connection_file(profile_dir: Path) -> Path:
    """The newest engine connection file the controller wrote in a profile."""
    security = Path(profile_dir) / "security"
    files = sorted(security.glob("ipcontroller-*engine.json"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise ClusterError(
            f"no engine connection file in {security}: start the coordinator first "
            f"(`python -m exo_lab.server --config config.yaml`), or copy its "
            f"security/ipcontroller-*-engine.json to this PC and pass --connection-file")
    return files[-1]


def read_connection_info(path: Path, coordinator_address: str | None) -> dict:
    """Load an engine connection file, pointing it at the coordinator's reachable address."""
    try:
        info = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ClusterError(f"cannot read the engine connection file {path}: {exc}") from exc
    if coordinator_address:
        info["interface"] = f"tcp://{coordinator_address}"
        info["location"] = coordinator_address
    return info
