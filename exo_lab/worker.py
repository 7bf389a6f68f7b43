"""`python -m exo_lab.worker --config config.yaml`: a compute PC's service.

Starts this PC's engines (``engines`` of its device entry, default 1) and joins them to the
coordinator. With a cluster secret (``network.secret_file`` or ``$EXO_LAB_SECRET``) it needs
nothing else: with ``discovery: auto`` it finds the coordinator of its cluster name on the LAN
(mDNS), with ``manual`` it uses the coordinator's ``address`` (or hostname) from the config;
then it joins (both sides prove they hold the secret), builds the engines' connection info
itself (the ipyparallel key is derived from the secret) and starts them. A PC whose secret
differs is refused: the worker exits with status 2 and says so.

Without a secret (one PC, loopback only) the engines use the coordinator's connection file:
``<profile>/security/ipcontroller-*-engine.json``, or a copy passed with --connection-file.
A storage PC that is not the coordinator also serves the model files from here.
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

from . import envvars, lifeline
from .config import DeviceConfig, load_config
from .errors import ClusterError, ConfigError, ExoLabError
from .limits import bound_logging, raise_descriptor_limit
from .membership.launch import (default_profile_dir, engine_environment, joined_connection_info,
                                 read_connection_info, session_key, wait_for_connection_file)

logger = logging.getLogger(__name__)

DEFAULT_JOIN_TIMEOUT_S = 120.0
ENGINE_STOP_S = 2.0         # on stop: SIGTERM to SIGKILL for an engine that does not exit
LEFTOVER_GRACE_S = 0.5      # on stop: an engine's child left behind, SIGTERM to SIGKILL


def find_device(config, name: str | None):
    """This PC's device entry: --device, else the one whose hostname matches this machine.
    With ``discovery: auto`` a PC not listed joins as a one-engine compute device."""
    from .config import is_this_machine, same_host

    matches = [d for d in config.compute_devices
               if (same_host(d.hostname, name) if name else is_this_machine(d.hostname))]
    if matches:
        return matches[0]
    if config.network.discovery == "auto":
        return DeviceConfig(hostname=name or socket.gethostname(), roles=("compute",), max_memory_bytes=None,
                            max_cores=None, gpu=False, memory_bandwidth_bytes_per_s=None)
    names = ", ".join(d.hostname for d in config.compute_devices)
    raise ConfigError(f"{config.source}: no compute device matches "
                      f"{name or socket.gethostname()!r}; pass --device with one of: {names}")


def join_cluster(config, device, secret: bytes, timeout_s: float = DEFAULT_JOIN_TIMEOUT_S):
    """Find the coordinator (mDNS or the config's address) and join it. Returns (connection info
    for the engines, extra engine environment, seconds it took)."""
    from .membership.discovery import discover, join
    from .security import secret_environment

    started = time.monotonic()
    deadline = started + timeout_s
    while True:
        try:
            if config.network.discovery == "auto":
                found = discover(config.cluster_name, secret, timeout_s=max(1.0, deadline - time.monotonic()))
                hosts, port = found.addresses, found.join_port
            else:
                coordinator = config.coordinator
                hosts, port = (coordinator.address or coordinator.hostname,), config.network.service_port
            welcome = _join_first(hosts, port, config, device, secret, join)
            break
        except ClusterError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)       # the coordinator is not up yet
    info = joined_connection_info(welcome.connection, welcome.coordinator, session_key(secret))
    env = {**secret_environment(secret), envvars.ADVERTISE_HOST: welcome.your_address}
    if welcome.storage_url:
        env[envvars.STORAGE_URL] = welcome.storage_url
    return info, env, time.monotonic() - started


def _join_first(hosts, port, config, device, secret, join):
    errors = []
    for host in hosts:
        try:
            return join(host, port, config.cluster_name, device.hostname, secret)
        except ClusterError as exc:   # SecretRefused is not a ClusterError: it ends the worker
            errors.append(exc)
    raise errors[-1] if errors else ClusterError("the coordinator's advert names no address")


def start_engines(device, info: dict, profile_dir: Path, extra_env: dict | None = None) -> list[subprocess.Popen]:
    threads = device.max_cores or os.cpu_count()
    env = {**os.environ, **engine_environment(threads=threads, device_name=device.hostname),
           **(extra_env or {}), "IPP_CONNECTION_INFO": json.dumps(info)}
    # engines end with this worker, even when it is killed (exo_lab.lifeline)
    command = [*lifeline.command("ipyparallel.engine"), f"--profile-dir={profile_dir}", "--log-level=WARN"]
    return [subprocess.Popen(command, env=env) for _ in range(device.engines)]


def _start_storage(config, secret: bytes):
    """A storage PC that is not the coordinator serves the model files from its worker."""
    from .coordinator.loop import LoopThread
    from .membership.service import PeerService

    loop = LoopThread(name="exo-lab-storage")
    try:
        loop.run(PeerService(config, secret, join=None, storage=True).start())
    except BaseException:
        loop.stop()
        raise
    return loop


def run_worker(config_path, device_name=None, connection_file=None, profile_dir=None) -> int:
    from .membership.launch import read_local_secret
    from .security import require_shared_secret, secret_environment

    config = load_config(config_path)
    secret = require_shared_secret(config)     # other PCs and no secret: refused at once
    device = find_device(config, device_name)
    profile = Path(profile_dir) if profile_dir else default_profile_dir(config.cluster_name)
    profile.mkdir(parents=True, exist_ok=True)
    storage_loop = _start_storage(config, secret) if secret and device.is_storage and not device.is_coordinator else None
    if connection_file or secret is None:
        coordinator = config.coordinator
        path = Path(connection_file) if connection_file else wait_for_connection_file(profile)
        # without a shared secret the coordinator runs on this PC and left its own in the profile
        known = secret or read_local_secret(profile)
        info = read_connection_info(path, coordinator.address or coordinator.hostname)
        env = secret_environment(known) if known else {}
        how = f"with {path}"
    else:
        info, env, took_s = join_cluster(config, device, secret)
        how = f"joined at {info['location']} in {took_s:.2f} s ({config.network.discovery} discovery)"
    processes = start_engines(device, info, profile, env)
    print(f"{device.hostname}: {len(processes)} engine(s) joining cluster {config.cluster_name} {how} "
          f"(pids {[p.pid for p in processes]}); Ctrl-C stops", flush=True)
    stopping = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stopping.append(True))
    try:
        while not stopping and any(p.poll() is None for p in processes):
            time.sleep(0.2)
    finally:
        stop_engines(processes)
        if storage_loop is not None:
            storage_loop.stop()
    return 0 if stopping else 1


def stop_engines(processes: list[subprocess.Popen]) -> None:
    """SIGTERM every engine (each ends in well under a second, its nanny with it: see
    exo_lab.lifeline), SIGKILL those left after ENGINE_STOP_S, then end whatever of their
    children is left (a killed engine's nanny)."""
    import psutil

    engines, children = [], []
    for process in processes:
        if process.poll() is not None:
            continue        # ended and reaped: its pid may be another process's by now
        try:
            engine = psutil.Process(process.pid)
            engines.append(engine)
            children += engine.children(recursive=True)
        except psutil.NoSuchProcess:
            pass
    lifeline.end_processes(engines, ENGINE_STOP_S)
    lifeline.end_processes([child for child in children if child.is_running()], LEFTOVER_GRACE_S)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m exo_lab.worker", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="config.yaml describing the cluster (the same on every PC)")
    parser.add_argument("--device", default=None, help="this PC's hostname in the config (default: match)")
    parser.add_argument("--connection-file", default=None,
                        help="a copy of the coordinator's ipcontroller-*-engine.json (only without a secret)")
    parser.add_argument("--profile-dir", default=None, help="the cluster's ipyparallel profile folder")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    bound_logging()
    raise_descriptor_limit()      # the engines inherit it
    try:
        return run_worker(args.config, args.device, args.connection_file, args.profile_dir)
    except ExoLabError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
