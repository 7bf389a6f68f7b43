"""How long the exact planner takes, by cluster size and model depth.

Run from the repository root:  python benchmarks/bench_planner.py [--repeats 5]
Target (DESIGN.md): 128 nodes x 128 layers in well under a second.
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # runnable before pip install

from exo_lab.planning.planner import DEFAULT_BANDWIDTH_BYTES_PER_S, NodeSpec, plan_layers  # noqa: E402
from exo_lab.model.profile import ModelProfile  # noqa: E402

SIZES = ((8, 32), (32, 80), (128, 128))
VARIANTS = (("latency", 1), ("throughput", 1), ("latency", 4), ("throughput", 4))
GB = 10**9


def make_profile(num_layers: int) -> ModelProfile:
    """Llama-70B-like sizes in bfloat16, at any depth."""
    return ModelProfile(
        model_id=f"bench-{num_layers}l", model_type="llama", dtype="bfloat16", num_layers=num_layers,
        hidden_size=8192, intermediate_size=28672, vocab_size=128256, max_position_embeddings=8192,
        layer_bytes=1_711_000_000, embedding_bytes=2_101_000_000, final_norm_bytes=16_384,
        lm_head_bytes=2_101_000_000, tied_embeddings=False,
        kv_bytes_per_token_per_layer=4096, activation_bytes_per_token=8192 * 2 * 4,
    )


def make_nodes(count: int, seed: int) -> list[NodeSpec]:
    """A mixed cluster: mostly CPU boxes with 16-128 GB, a quarter with a GPU."""
    rng = random.Random(seed)
    nodes = []
    for index in range(count):
        kind = "cuda" if rng.random() < 0.25 else "cpu"
        budget = rng.choice((16, 24, 48, 80)) * GB if kind == "cuda" else rng.choice((16, 32, 64, 128)) * GB
        nodes.append(NodeSpec(f"node-{index}", budget, DEFAULT_BANDWIDTH_BYTES_PER_S[kind], kind=kind))
    return nodes


def time_plan(profile, nodes, objective, min_stages, repeats):
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        plan = plan_layers(profile, nodes, max_context=4096, objective=objective, min_stages=min_stages)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), plan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="runs per cell; the median is shown")
    args = parser.parse_args()
    print(f"{'nodes x layers':>14}  {'objective':<10} {'min_stages':>10}  {'plan ms':>8}  "
          f"{'stages':>6}  {'ms/token':>9}  {'bottleneck':>10}")
    for num_nodes, num_layers in SIZES:
        profile, nodes = make_profile(num_layers), make_nodes(num_nodes, seed=num_nodes)
        for objective, min_stages in VARIANTS:
            seconds, plan = time_plan(profile, nodes, objective, min_stages, args.repeats)
            print(f"{f'{num_nodes} x {num_layers}':>14}  {objective:<10} {min_stages:>10}  "
                  f"{seconds * 1000:>8.1f}  {len(plan.stages):>6}  {plan.predicted_ms_per_token:>9.2f}  "
                  f"{plan.bottleneck_ms:>10.2f}")


if __name__ == "__main__":
    main()
