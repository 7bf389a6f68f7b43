"""`exo-lab` command line: demo, init, secret, check-config, plan, serve, bench.

User errors (bad config, model, flags) print one ``error: ...`` line and exit 2, no traceback.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

from .errors import ExoLabError
from .server import add_model_options, add_server_arguments, positive_int, server_arguments
from .units import GGUF_RECIPES as RECIPES

EXIT_USER_ERROR = 2


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

    init = commands.add_parser("init", help="write a starter config.yaml for this PC (and its secret file)")
    init.add_argument("--output", default="config.yaml", help="where to write it (default config.yaml)")
    init.add_argument("--cluster-name", default=None, help="the cluster's name (default: <this PC>-cluster)")
    init.add_argument("--force", action="store_true", help="replace an existing config file")

    secret = commands.add_parser("secret", help="write a new random cluster secret file, readable by you only (mode 600; on Windows restricted with icacls)")
    secret.add_argument("file", help="where to write it; name it in network.secret_file on every PC")
    secret.add_argument("--force", action="store_true", help="replace an existing file (every PC needs the new one)")

    plan = commands.add_parser("plan", help="show how a model would be split, before loading anything")
    plan.add_argument("--config", required=True, help="config.yaml describing the cluster")
    add_model_options(plan)
    plan.add_argument("--json", action="store_true", help="print exactly one JSON object")
    plan.add_argument("--gguf", metavar="RECIPE", choices=RECIPES, default=None,
                      help="plan the model as llama.cpp's RECIPE GGUF file of it would load (dtype gguf: "
                           f"{', '.join(RECIPES)}), for a folder with only config.json")
    plan.add_argument("--measure", action="store_true",
                      help="time the model's decode step on this PC (a few seconds) and plan its stages with that "
                           "figure; the other PCs plan with their config's memory_bandwidth or the default")

    serve = commands.add_parser("serve", help="run the cluster and its OpenAI-compatible API "
                                              "(the flags of python -m exo_lab.server, plus --engines)")
    _add_cluster_options(serve)
    add_server_arguments(serve)

    bench = commands.add_parser("bench", help="measure single-process vs cluster tokens/s, hops, memory")
    from .bench import add_arguments

    add_arguments(bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from .limits import bound_logging, raise_descriptor_limit

    bound_logging()                 # repeated errors once, with a count
    raise_descriptor_limit()        # engines and the controller inherit it
    try:
        return COMMANDS[args.command](args) or 0
    except ExoLabError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def cmd_secret(args) -> int:
    from .quickstart import write_cluster_secret

    return write_cluster_secret(args.file, force=args.force)


def cmd_check_config(args) -> int:
    from .config import format_config_summary, load_config
    from .planning.nodes import format_device_budgets
    from .security import require_shared_secret

    config = load_config(args.file)
    require_shared_secret(config)
    print(format_config_summary(config))
    print("memory per compute PC:\n" + format_device_budgets(config))
    return 0


def cmd_plan(args) -> int:
    from .config import load_config
    from .model.profile import profile_model
    from .planning.nodes import nodes_from_config
    from .planning.planner import format_plan

    config = load_config(args.config)
    options = _load_options(args, config)
    nodes = nodes_from_config(config)
    if getattr(args, "measure", False):
        nodes, note = _measured_here(config, options, nodes)
        print(note, file=sys.stderr if args.json else sys.stdout)
    recipe = getattr(args, "gguf", None)
    plan = options.plan(profile_model(options.model, dtype=None if recipe else options.dtype, gguf_recipe=recipe), nodes)
    print(json.dumps(plan.to_json()) if args.json else format_plan(plan))
    return 0


def _measured_here(config, options, nodes):
    """``nodes`` with this PC's CPU stages planned at its measured decode speed for the model
    (exo_lab.engine.speed, as an engine measures at load), unless its config gives
    memory_bandwidth (a config figure wins); and a line saying what was measured."""
    import dataclasses
    import socket

    from .config import same_host
    from .engine.probe import set_threads, usable_cores
    from .engine.speed import measure_decode
    from .weights.resolve import read_model_config, resolve_model

    here = socket.gethostname()
    device = config.device_named(here)
    if device is None or not device.is_compute:
        return nodes, (f"--measure: this PC ({here}) is not a compute device of {config.source}; every PC plans "
                       "with its config's memory_bandwidth or the default")
    if device.memory_bandwidth_bytes_per_s:
        return nodes, f"--measure: {device.hostname} plans with its config's memory_bandwidth (a config figure wins)"
    threads = set_threads(min(filter(None, (device.max_cores, usable_cores()))))
    measured = measure_decode(read_model_config(resolve_model(options.model, need_weights=False)), options.dtype)
    if measured is None:
        return nodes, f"--measure: {options.model} is too large (or too small) to time on a scratch stage here"
    ms = (measured["layer_seconds"] * 1e3, measured["head_seconds"] * 1e3)
    mine = {node.name for node in nodes if node.kind == "cpu" and same_host(node.name.split("/")[0], device.hostname)}
    nodes = [dataclasses.replace(node, measured_ms=ms) if node.name in mine else node for node in nodes]
    return nodes, (f"measured on {device.hostname} ({threads} thread(s)): {ms[0]:.3f} ms a layer, {ms[1]:.3f} ms "
                   f"the head at {options.dtype}; its CPU stages ({', '.join(sorted(mine))}) plan with it, the "
                   "other PCs with their config's memory_bandwidth or the default")


def _load_options(args, config):
    from .planning.options import resolve_load_options
    from .settings import read_flags

    return resolve_load_options(config, **read_flags(args, "plan"))


def cmd_demo(args) -> int:
    from .quickstart import run

    return run(args)


def cmd_serve(args) -> int:
    from .server import run_server

    return run_server(config_path=args.config, engines=args.engines, max_cores=args.max_cores,
                      **server_arguments(args))


def cmd_init(args) -> int:
    from .quickstart import write_starter_config

    return write_starter_config(args.output, cluster_name=args.cluster_name, force=args.force)


def cmd_bench(args) -> int:
    from .bench import run

    return run(args)


COMMANDS = {"check-config": cmd_check_config, "init": cmd_init, "secret": cmd_secret, "plan": cmd_plan, "demo": cmd_demo, "serve": cmd_serve,
            "bench": cmd_bench}

if __name__ == "__main__":
    sys.exit(main())
