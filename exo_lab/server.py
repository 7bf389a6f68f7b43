"""`python -m exo_lab.server --config config.yaml`: the coordinator PC's service.

Starts the ipyparallel controller (and this PC's engines when it also has the compute role),
waits for the compute PCs' workers to join, loads the model and serves the OpenAI-compatible
API until Ctrl-C / SIGTERM. `exo-lab serve` is the same with --engines for a local cluster.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from .errors import ConfigError, ExoLabError

logger = logging.getLogger(__name__)

API_KEY_ENV = "EXO_LAB_API_KEY"


def resolve_api_key(flag: str | None, config) -> str | None:
    """--api-key, else the config's api_key_env / api_key_file, else $EXO_LAB_API_KEY, else None."""
    if flag:
        return flag
    api = config.api if config is not None else None
    if api is not None and api.api_key_env:
        key = os.environ.get(api.api_key_env)
        if not key:
            raise ConfigError(f"{config.source}: api.api_key_env names ${api.api_key_env}, which is not set; "
                              f"export it or remove api_key_env")
        return key
    if api is not None and api.api_key_file:
        try:
            return Path(api.api_key_file).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"{config.source}: cannot read api.api_key_file {api.api_key_file}: {exc}") from exc
    return os.environ.get(API_KEY_ENV) or None


def run_server(*, config_path=None, engines=None, max_cores=None, load_args: dict | None = None,
               host=None, port=None, api_key=None) -> int:
    """Start the cluster, load the model, serve until interrupted. Returns the exit code.
    ``load_args``: model, dtype, max_context, ... as flags give them (None: config, then default)."""
    from .cluster import Cluster
    from .planning.options import resolve_load_options
    from .planning.planner import format_plan

    if config_path:
        cluster = Cluster.from_config(config_path)
    else:
        cluster = Cluster.local(engines=engines or 2, max_cores=max_cores)
    config = cluster.config if config_path else None
    options = resolve_load_options(config, **(load_args or {}))   # bad flags fail before anything starts
    key = resolve_api_key(api_key, config)
    host = host or (config.api.host if config else "127.0.0.1")
    port = port if port is not None else (config.api.port if config else 8000)
    stop = threading.Event()
    # while starting (other PCs' workers too, with launcher: ssh | slurm), Ctrl-C or SIGTERM
    # interrupts the start, which stops whatever was started; once up, they end the serving
    signal.signal(signal.SIGTERM, _interrupt)
    with cluster:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: stop.set())
        print(f"cluster {cluster.config.cluster_name}: {len(cluster.control.ids)} engine(s) up; "
              f"ipyparallel profile {cluster.profile_dir}", flush=True)
        plan = cluster.load(options.model, dtype=options.dtype, max_context=options.max_context,
                            max_batch=options.max_batch, objective=options.objective,
                            min_stages=options.min_stages)
        print(format_plan(plan), flush=True)
        server = cluster.serve(host=host, port=port, api_key=key)
        print(f"serving {cluster.model_id} at {server.url}/v1 (OpenAI-compatible"
              f"{', API key required' if key else ''}); Ctrl-C stops", flush=True)
        stop.wait()
        print("stopping ...", flush=True)
    return 0


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m exo_lab.server", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="config.yaml describing the cluster")
    parser.add_argument("--model", default=None, help="model to load (default: the config's model, else demo)")
    parser.add_argument("--min-stages", type=int, default=None, help="spread over at least this many engines")
    parser.add_argument("--host", default=None)
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument("--api-key", default=None)
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    try:
        return run_server(config_path=args.config, load_args={"model": args.model, "min_stages": args.min_stages},
                          host=args.host, port=args.port, api_key=args.api_key)
    except ExoLabError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted while starting; everything it started is stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
