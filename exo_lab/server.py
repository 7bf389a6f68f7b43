"""`python -m exo_lab.server --config config.yaml`: the coordinator PC's service.

Starts the ipyparallel controller (and this PC's engines when it also has the compute role),
waits for the compute PCs' workers to join, loads the model and serves the OpenAI-compatible
API until Ctrl-C / SIGTERM. `exo-lab serve` is the same with --engines for a local cluster.

Both take the same flags: :func:`add_server_arguments` declares them from the settings schema
(exo_lab.settings: the load options, host, port, key, served model names; help and defaults
from there); `exo-lab serve` adds only --engines / --max-cores for a local cluster.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from . import envvars, lifeline
from .errors import ConfigError, ExoLabError
from .limits import bound_logging, raise_descriptor_limit
from .settings import LOAD_KEYS, add_flags, read_flags
from .settings_values import port_number, positive_int  # noqa: F401 - argparse types, here since before

logger = logging.getLogger(__name__)

API_KEY_ENV = envvars.API_KEY


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
               host=None, port=None, api_key=None, served_model_names=None) -> int:
    """Start the cluster, load the model, serve until interrupted (Ctrl-C, SIGTERM); then stop
    everything it started and end this process (status 0) at once, without the interpreter's
    teardown, which takes about a second once torch is loaded: so it does not return then.
    ``load_args``: model, dtype, max_context, ... as flags give them (None: config, then default).
    ``served_model_names``: the flags' names; none given: the config's, else the model id."""
    from .cluster import Cluster
    from .config import ApiConfig
    from .planning.options import resolve_load_options
    from .planning.planner import format_plan

    if config_path:
        cluster = Cluster.from_config(config_path)
    else:
        cluster = Cluster.local(engines=engines or 2, max_cores=max_cores)
    config = cluster.config if config_path else None
    options = resolve_load_options(config, **(load_args or {}))   # bad flags fail before anything starts
    key = resolve_api_key(api_key, config)
    names = choose_served_model_names(served_model_names, cluster.config)
    api = config.api if config else ApiConfig()
    host, port = host or api.host, (port if port is not None else api.port)
    stop = threading.Event()
    # while starting (other PCs' workers too, with launcher: ssh | slurm), Ctrl-C or SIGTERM
    # interrupts the start, which stops whatever was started; once up, they end the serving
    signal.signal(signal.SIGTERM, _interrupt)
    with cluster:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: stop.set())
        print(f"cluster {cluster.config.cluster_name}: {len(cluster.control.ids)} engine(s) up; "
              f"ipyparallel profile {cluster.profile_dir}", flush=True)
        plan = cluster.load(**{key: getattr(options, key) for key in LOAD_KEYS})
        print(format_plan(plan), flush=True)
        server = cluster.serve(host=host, port=port, api_key=key, served_model_names=names)
        print(serving_line(server, key), flush=True)
        stop.wait()
        print("stopping ...", flush=True)
    lifeline.exit_now(0)
    return 0


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


def choose_served_model_names(flags, config) -> tuple[str, ...]:
    """The names the API answers to: ``flags`` (--served-model-name) win over the config's
    ``served_model_names``; () = the model id. Raises ConfigError for a bad name."""
    from .api.server import check_served_model_names

    return check_served_model_names(flags or config.served_model_names)


def serving_line(server, key) -> str:
    """What a user reads once the API is up: where, and the model names a client may send."""
    names = ", ".join(f"'{name}'" for name in server.model_names())
    return (f"serving {server.cluster.model_id} as {names} at {server.url}/v1 (OpenAI-compatible"
            f"{', API key required' if key else ''}); Ctrl-C stops")


# ------------------------------------------------------------------ the command line
def add_model_options(parser: argparse.ArgumentParser) -> None:
    """What to load and how: the flags of `exo-lab plan`. Every option left out comes from
    config.yaml, else the default (exo_lab.settings)."""
    add_flags(parser, "plan")


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    """Every flag of the server command line but where the cluster comes from (--config /
    --engines): `python -m exo_lab.server` and `exo-lab serve` both declare theirs here."""
    add_flags(parser, "server")
    # SUPPRESS: `exo-lab -v serve` sets it before the subcommand; a default here would undo that
    parser.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log progress")


def build_parser() -> argparse.ArgumentParser:
    """`python -m exo_lab.server`'s parser: --config (required) and :func:`add_server_arguments`."""
    parser = argparse.ArgumentParser(prog="python -m exo_lab.server", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="config.yaml describing the cluster")
    add_server_arguments(parser)
    return parser


def server_arguments(args: argparse.Namespace) -> dict:
    """:func:`run_server`'s keyword arguments from parsed flags (both command lines)."""
    given = read_flags(args, "server")
    load_args = {key: value for key, value in given.items() if key in LOAD_KEYS}
    return {"load_args": load_args, "host": args.host, "port": args.port, "api_key": args.api_key,
            "served_model_names": args.served_model_names}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    bound_logging()
    raise_descriptor_limit()      # engines and the controller inherit it
    try:
        return run_server(config_path=args.config, **server_arguments(args))
    except ExoLabError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted while starting; everything it started is stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
