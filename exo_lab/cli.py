"""`exo-lab` command line: demo, check-config, plan, serve, bench.

User errors (bad config, model, flags) print one ``error: ...`` line and exit 2, no traceback.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

from .errors import ExoLabError
from .planning.options import OBJECTIVES
from .units import DTYPES

EXIT_USER_ERROR = 2


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 1")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (0-65535; 0 picks a free one)")
    return value


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    # Every option left out comes from config.yaml, else the default (planning/options.py).
    parser.add_argument("--model", default=None,
                        help="a local model folder, a Hugging Face hub id in the local cache, 'smollm2' or 'demo' "
                             "(default: the config's model, else demo)")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="weights dtype (default float32; int8 = weight-only int8, bfloat16 activations)")
    parser.add_argument("--max-context", type=positive_int, default=None,
                        help="tokens per request the KV cache is sized for (default min(model max, 4096))")
    parser.add_argument("--max-batch", type=positive_int, default=None, help="concurrent requests to size for")
    parser.add_argument("--objective", choices=OBJECTIVES, default=None,
                        help="latency (default): fastest single stream; throughput: fastest slowest stage")
    parser.add_argument("--min-stages", type=positive_int, default=None,
                        help="spread over at least this many engines (experiments)")


def _add_cluster_options(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--config", help="config.yaml describing the cluster")
    where.add_argument("--engines", type=positive_int, help="a local cluster of N engines on this machine")
    parser.add_argument("--max-cores", type=positive_int, default=None,
                        help="torch threads per engine (local cluster; default: every core)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="exo-lab", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    demo = commands.add_parser("demo", help="start a local cluster, load SmolLM2 and ask it a question")
    from .quickstart import add_arguments as add_demo_arguments

    add_demo_arguments(demo, positive_int)

    check = commands.add_parser("check-config", help="validate a config.yaml and summarise it")
    check.add_argument("file")

    secret = commands.add_parser("secret", help="write a new random cluster secret file (owner-only, mode 600)")
    secret.add_argument("file", help="where to write it; name it in network.secret_file on every PC")
    secret.add_argument("--force", action="store_true", help="replace an existing file (every PC needs the new one)")

    plan = commands.add_parser("plan", help="show how a model would be split, before loading anything")
    plan.add_argument("--config", required=True, help="config.yaml describing the cluster")
    _add_model_options(plan)
    plan.add_argument("--json", action="store_true", help="print exactly one JSON object")

    serve = commands.add_parser("serve", help="run the cluster and its OpenAI-compatible API")
    _add_cluster_options(serve)
    _add_model_options(serve)
    serve.add_argument("--host", default=None, help="interface to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=_port, default=None, help="port (default 8000)")
    serve.add_argument("--api-key", default=None,
                       help="require this Bearer key (default: config api.api_key_env/api_key_file, or $EXO_LAB_API_KEY)")

    bench = commands.add_parser("bench", help="measure single-process vs cluster tokens/s, hops, memory")
    from .bench import add_arguments

    add_arguments(bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return COMMANDS[args.command](args) or 0
    except ExoLabError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def cmd_secret(args) -> int:
    from pathlib import Path

    from .errors import ConfigError
    from .security import new_secret, write_secret_file

    path = Path(args.file).expanduser()
    if path.exists() and not args.force:
        raise ConfigError(f"{path} exists; a cluster's PCs must share one secret, so it is not replaced "
                          f"(pass --force to make a new one, then give it to every PC)")
    write_secret_file(path, new_secret())
    print(f"wrote a new cluster secret to {path} (mode 600). Give the same file to every PC of the "
          f"cluster once, by a private channel, and set network.secret_file: {path.absolute()}")
    return 0


def cmd_check_config(args) -> int:
    from .config import format_config_summary, load_config

    print(format_config_summary(load_config(args.file)))
    return 0


def cmd_plan(args) -> int:
    from .config import load_config
    from .model.profile import profile_model
    from .planning.nodes import nodes_from_config
    from .planning.planner import format_plan

    config = load_config(args.config)
    options = _load_options(args, config)
    plan = options.plan(profile_model(options.model, dtype=options.dtype), nodes_from_config(config))
    print(json.dumps(plan.to_json()) if args.json else format_plan(plan))
    return 0


def _load_options(args, config):
    from .planning.options import resolve_load_options

    return resolve_load_options(config, model=args.model, dtype=args.dtype, max_context=args.max_context,
                                max_batch=args.max_batch, objective=args.objective, min_stages=args.min_stages)


def cmd_demo(args) -> int:
    from .quickstart import run

    return run(args)


def cmd_serve(args) -> int:
    from .server import run_server

    return run_server(config_path=args.config, engines=args.engines, max_cores=args.max_cores,
                      load_args={"model": args.model, "dtype": args.dtype, "max_context": args.max_context,
                                 "max_batch": args.max_batch, "objective": args.objective,
                                 "min_stages": args.min_stages},
                      host=args.host, port=args.port, api_key=args.api_key)


def cmd_bench(args) -> int:
    from .bench import run

    return run(args)


COMMANDS = {"check-config": cmd_check_config, "secret": cmd_secret, "plan": cmd_plan, "demo": cmd_demo, "serve": cmd_serve,
            "bench": cmd_bench}

if __name__ == "__main__":
    sys.exit(main())
