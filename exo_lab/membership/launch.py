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

from .. import envvars
from ..config import CONTROLLER_PORT_SPAN
from ..errors import ClusterError

logger = logging.getLogger(__name__)

# A dead engine is noticed after HEARTBEAT_PERIOD_MS x (HEARTBEAT_MISSES + 1) at most.
HEARTBEAT_PERIOD_MS = 1000
HEARTBEAT_MISSES = 4
# A SIGTERMed controller or engine exits in well under a second (exo_lab.lifeline); one stuck in
# a long native call (a big matmul, a load) is killed after this instead of ipyparallel's 5 s.
STOP_SECONDS_UNTIL_KILL = 1


def controller_args(port: int | None = None) -> list[str]:
    args = [f"--HeartMonitor.period={HEARTBEAT_PERIOD_MS}",
            f"--HeartMonitor.max_heartmonitor_misses={HEARTBEAT_MISSES}",
            "--IPController.db_class=NoDB"]
    if port:
        args.append(f"--ports={port}-{port + CONTROLLER_PORT_SPAN - 1}")
    return args


def engine_environment(*, threads: int | None, device_name: str | None = None,
                       secret: bytes | None = None) -> dict[str, str]:
    """Environment for an engine process, set before torch is imported there.

    OpenMP keeps its default wait policy: PASSIVE (workers sleep in the kernel between parallel
    regions) made SmolLM2's decode step 2x slower (79 against 43 ms on 2 threads); stages that
    share a PC take turns instead (:func:`~exo_lab.coordinator.pipeline.default_micro_batches`).
    ``secret``: the cluster secret the engine's data plane authenticates with (through the
    environment, never argv).
    The engine also watches this process and ends with it (:mod:`exo_lab.lifeline`).
    """
    from ..lifeline import watch_environment
    from ..security import secret_environment

    env = {"TOKENIZERS_PARALLELISM": "false", "PYTHONFAULTHANDLER": "1",
           "PYTHONUNBUFFERED": "1", **watch_environment()}
    if secret is not None:
        env.update(secret_environment(secret))
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
        env["MKL_NUM_THREADS"] = str(threads)
    if device_name:
        env[envvars.DEVICE] = device_name
    return env


def default_profile_dir(cluster_name: str) -> Path:
    """Where a named cluster keeps its ipyparallel profile (connection files, logs): under
    :func:`exo_lab.paths.state_dir` (``$EXO_LAB_HOME``, else ``~/.exo_lab`` on Linux)."""
    from ..paths import state_dir

    return state_dir() / "profiles" / f"profile_{cluster_name}"


def temporary_profile_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="exo-lab-profile-"))


def make_ipp_cluster(*, profile_dir: Path, controller_ip: str, controller_location: str | None,
                     port: int | None, session_key: str | None = None):
    """An ipyparallel.Cluster configured as exo-lab runs it (not yet started). Start engines
    with ``start_engines(n, environment=engine_environment(...))``.

    ``session_key``: the key every control message is signed with (:func:`session_key`); None
    lets the controller make a random one (written only into its connection files)."""
    import ipyparallel as ipp

    write_controller_key(Path(profile_dir), session_key)

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
        config=lifeline_config(),
    )
    return cluster


def lifeline_config():
    """ipyparallel launcher settings that start the controller and the engines under
    :mod:`exo_lab.lifeline`: they end when this process dies, even by SIGKILL, and soon after a
    SIGTERM (STOP_SECONDS_UNTIL_KILL)."""
    from traitlets.config import Config

    from .. import lifeline

    config = Config()
    config.LocalControllerLauncher.controller_cmd = lifeline.command("ipyparallel.controller")
    config.LocalControllerLauncher.environment = lifeline.watch_environment()
    config.LocalEngineSetLauncher.engine_cmd = lifeline.command("ipyparallel.engine")
    for launcher in ("LocalControllerLauncher", "LocalEngineLauncher", "LocalEngineSetLauncher"):
        config[launcher].stop_seconds_until_kill = STOP_SECONDS_UNTIL_KILL
    return config


def session_key(secret: bytes) -> str:
    """The cluster's ipyparallel Session key, derived from the cluster secret: every PC that
    holds the secret computes it, so no connection file (and no key) is ever copied or sent."""
    from ..security import derive_key

    return derive_key(secret, "ipyparallel").hex()


CONTROLLER_CONFIG = "ipcontroller_config.py"
_KEY_MARK = "# exo-lab: Session key derived from the cluster secret\n"


def write_controller_key(profile_dir: Path, key: str | None) -> None:
    """Put the Session key into the profile's controller config (owner-only, like the
    connection files the controller writes), or remove a key exo-lab wrote there before."""
    path = profile_dir / CONTROLLER_CONFIG
    if key is None:
        if path.is_file() and path.read_text().startswith(_KEY_MARK):
            path.unlink()
        return
    profile_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(f"{_KEY_MARK}c.Session.key = {key.encode('ascii')!r}\n")
    os.chmod(path, 0o600)


def public_connection_info(profile_dir: Path, newer_than: float = 0.0) -> dict:
    """The controller's engine connection info without its key: ports and wire settings a
    joining worker needs, safe to send over the network. Waits for the controller to write a
    connection file after ``newer_than`` (a time.time())."""
    info = json.loads(wait_for_connection_file(profile_dir, newer_than=newer_than).read_text())
    return {name: value for name, value in info.items() if name not in ("key", "interface", "location")}


def joined_connection_info(public: dict, coordinator_address: str, key: str) -> dict:
    """An engine connection file's content built on a compute PC: the coordinator's public
    connection info, where it was found, and the key derived from this PC's own secret."""
    return {**public, "interface": f"tcp://{coordinator_address}", "location": coordinator_address,
            "key": key}


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


def wait_for_connection_file(profile_dir: Path, *, newer_than: float = 0.0, timeout_s: float = 60.0) -> Path:
    """The engine connection file, once the controller has written it (after ``newer_than``)."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            path = engine_connection_file(profile_dir)
            if path.stat().st_mtime >= newer_than:
                return path
        except (ClusterError, OSError):
            pass
        if time.monotonic() > deadline:
            return engine_connection_file(profile_dir)   # raises with what to do when none is there
        time.sleep(0.1)


LOCAL_SECRET_FILE = "exo-lab-secret"


def write_local_secret(profile_dir: Path, secret: bytes) -> Path:
    """Without a shared secret a config cluster binds loopback only and its coordinator makes a
    random secret; it is kept next to the controller's connection files (owner-only, as they
    are) for workers started on this same PC (:func:`read_local_secret`)."""
    from ..security import write_secret_file

    return write_secret_file(Path(profile_dir) / "security" / LOCAL_SECRET_FILE, secret)


def read_local_secret(profile_dir: Path) -> bytes | None:
    """The secret :func:`write_local_secret` left in a profile, or None."""
    from ..security import read_secret_file

    path = Path(profile_dir) / "security" / LOCAL_SECRET_FILE
    return read_secret_file(path) if path.is_file() else None


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
