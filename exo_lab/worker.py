"""`python -m exo_lab.worker --config config.yaml`: a compute PC's service.

Starts this PC's engines (``engines`` of its device entry, default 1) and joins them to the
coordinator's controller. The engines connect with the coordinator's engine connection file:
on the coordinator it is ``<profile>/security/ipcontroller-*-engine.json`` (the server prints
the profile folder); on another PC pass a copy with --connection-file (or share the folder).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from .config import load_config
from .errors import ConfigError, ExoLabError
from .coordinator.launch import default_profile_dir, engine_connection_file, engine_environment, read_connection_info

logger = logging.getLogger(__name__)


def find_device(config, name: str | None):
    """This PC's device entry: --device, else the one whose hostname matches this machine."""
    from .config import is_this_machine, same_host

    matches = [d for d in config.compute_devices
               if (same_host(d.hostname, name) if name else is_this_machine(d.hostname))]
    if not matches:
        names = ", ".join(d.hostname for d in config.compute_devices)
        raise ConfigError(f"{config.source}: no compute device matches "
                          f"{name or socket.gethostname()!r}; pass --device with one of: {names}")
    return matches[0]


def start_engines(config, device, connection_file: Path | None, profile_dir: Path) -> list[subprocess.Popen]:
    coordinator = config.coordinator
    path = connection_file or _wait_for_connection_file(profile_dir)
    info = read_connection_info(path, coordinator.address or coordinator.hostname)
    threads = device.max_cores or os.cpu_count()
    env = {**os.environ, **engine_environment(threads=threads, device_name=device.hostname),
           "IPP_CONNECTION_INFO": json.dumps(info)}
    command = [sys.executable, "-m", "ipyparallel.engine", f"--profile-dir={profile_dir}", "--log-level=WARN"]
    return [subprocess.Popen(command, env=env) for _ in range(device.engines)]


def _wait_for_connection_file(profile_dir: Path, timeout_s: float = 60.0) -> Path:
    """The coordinator writes its connection file on start; a worker started first waits for it."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return engine_connection_file(profile_dir)
        except ExoLabError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def run_worker(config_path, device_name=None, connection_file=None, profile_dir=None) -> int:
    config = load_config(config_path)
    device = find_device(config, device_name)
    profile = Path(profile_dir) if profile_dir else default_profile_dir(config.cluster_name)
    profile.mkdir(parents=True, exist_ok=True)
    processes = start_engines(config, device, Path(connection_file) if connection_file else None, profile)
    print(f"{device.hostname}: {len(processes)} engine(s) joining {config.coordinator.hostname} "
          f"(pids {[p.pid for p in processes]}); Ctrl-C stops", flush=True)
    stopping = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stopping.append(True))
    try:
        while not stopping and any(p.poll() is None for p in processes):
            time.sleep(0.2)
    finally:
        for p in processes:
            if p.poll() is None:
                p.terminate()
        for p in processes:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
    return 0 if stopping else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m exo_lab.worker", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--device", default=None, help="this PC's hostname in the config (default: match)")
    parser.add_argument("--connection-file", default=None,
                        help="a copy of the coordinator's ipcontroller-*-engine.json")
    parser.add_argument("--profile-dir", default=None, help="the cluster's ipyparallel profile folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        return run_worker(args.config, args.device, args.connection_file, args.profile_dir)
    except ExoLabError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
