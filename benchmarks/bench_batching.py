"""Serving many people at once: micro-batching, chunked prefill, prefix reuse, flat memory.

    python benchmarks/bench_batching.py [--model smollm2] [--engines 2]

Prints one table (and --json-out writes it): each line a target of the batching issue, measured
in one run on a local cluster of engines pinned one core each (as separate PCs would be):

- micro-batches: 8 concurrent greedy requests, aggregate tokens/s with one micro-batch per stage
  against a single one, in alternating rounds;
- prefill gap: 4 streams decode while a 2,000-token prompt arrives; their inter-token gap p99
  while it prefills against their median gap;
- prefix reuse: the second turn of a chat (1,500 tokens of history + 20 new) reaches its first
  token against the same prompt with no reusable KV;
- flat memory: every engine's RSS after 200 requests against after the first 10.
`exo-lab bench --concurrency 1,4,8` has the comparison with transformers at the same batch.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time

import exo_lab
from exo_lab.sampling import SamplingParams


def pin_to_core(core: int) -> list[int]:
    """Runs inside an engine: restrict it to one CPU core (a PC of its own, in miniature)."""
    import os

    import torch

    os.sched_setaffinity(0, {core % os.cpu_count()})
    torch.set_num_threads(1)
    return sorted(os.sched_getaffinity(0))


async def collect(cluster, prompt: list[int], new_tokens: int, stamps: list[float] | None = None) -> list[int]:
    tokens = []
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    async for event in cluster.astream(prompt, params):
        if stamps is not None:
            stamps.append(time.perf_counter())
        tokens.extend(event.token_ids)
    return tokens


def run(cluster, coroutine):
    return cluster.run_coroutine(coroutine)


async def together(*coroutines):
    return await asyncio.gather(*coroutines)


def prompt_of(cluster, tokens: int, salt: int = 0) -> list[int]:
    text = f"Note {salt}: a cluster of office PCs runs one language model across all of them. "
    ids = cluster.encode(text * (tokens // 10 + 2))
    return ids[:tokens]


def micro_batching(cluster, rounds: int) -> dict:
    prompts = [prompt_of(cluster, 24, salt=i) for i in range(8)]
    scheduler = cluster.pipeline.scheduler
    stages = len(cluster.plan.stages)
    rates = {1: [], stages: []}
    for _ in range(rounds):
        for micro in (1, stages):
            scheduler.micro_batches = micro
            started = time.perf_counter()
            run(cluster, together(*[collect(cluster, p, 32) for p in prompts]))
            rates[micro].append(8 * 32 / (time.perf_counter() - started))
    scheduler.micro_batches = stages
    ratio = statistics.median(many / one for one, many in zip(rates[1], rates[stages]))
    return {"target": f"micro-batches: {stages} vs 1, 8 requests", "value": ratio, "goal": ">= 1.6x",
            "detail": f"{statistics.median(rates[stages]):.1f} vs {statistics.median(rates[1]):.1f} tok/s"}


def prefill_gap(cluster) -> dict:
    streams = [[] for _ in range(4)]
    window = {}

    async def scenario():
        decoders = [asyncio.ensure_future(collect(cluster, prompt_of(cluster, 16, salt=50 + i), 160, streams[i]))
                    for i in range(4)]
        await asyncio.sleep(1.0)
        long_prompt = prompt_of(cluster, 2000, salt=99)
        window["start"] = time.perf_counter()
        first = []
        await collect(cluster, long_prompt, 1, first)
        window["end"] = first[0]
        await asyncio.gather(*decoders)

    run(cluster, scenario())
    gaps = [(b, b - a) for stamps in streams for a, b in zip(stamps, stamps[1:])]
    during = sorted(g for t, g in gaps if window["start"] <= t <= window["end"])
    median = statistics.median(g for _, g in gaps)
    p99 = during[min(len(during) - 1, int(0.99 * len(during)))] if during else float("nan")
    return {"target": "prefill gap: p99 while a 2,000-token prompt prefills / median", "value": p99 / median,
            "goal": "<= 3x", "detail": f"p99 {p99 * 1e3:.0f} ms, median {median * 1e3:.0f} ms, "
                                       f"prefill {window['end'] - window['start']:.1f} s"}


def prefix_reuse(cluster) -> dict:
    history = prompt_of(cluster, 1500, salt=7)

    def ttft(prompt):
        stamps, started = [], time.perf_counter()
        run(cluster, collect(cluster, prompt, 1, stamps))
        return stamps[0] - started

    run(cluster, collect(cluster, history, 4))               # the first turn: its KV stays in its slot
    turn = history + prompt_of(cluster, 20, salt=8)
    warm = ttft(turn)
    cold = ttft(prompt_of(cluster, len(turn), salt=9))       # as long, and no KV to reuse
    return {"target": "prefix reuse: 2nd-turn TTFT / cold (1,500 + 20 tokens)", "value": warm / cold,
            "goal": "<= 0.25x", "detail": f"{warm * 1e3:.0f} ms vs {cold * 1e3:.0f} ms"}


def flat_memory(cluster) -> dict:
    from exo_lab.engine import room

    prompts = [prompt_of(cluster, 30 + i % 50, salt=200 + i) for i in range(200)]

    def rss():
        return cluster.control.call_all(room.memory)

    run(cluster, together(*[collect(cluster, p, 8) for p in prompts[:10]]))
    early = rss()
    for start in range(10, 200, 16):
        run(cluster, together(*[collect(cluster, p, 8) for p in prompts[start:start + 16]]))
    late = rss()
    growth = max(late[e]["rss_bytes"] / early[e]["rss_bytes"] for e in early)
    return {"target": "flat memory: engine RSS after 200 requests / after 10", "value": growth,
            "goal": "<= 1.05x", "detail": ", ".join(f"engine {e}: {early[e]['rss_bytes'] / 1e6:.0f} -> "
                                                      f"{late[e]['rss_bytes'] / 1e6:.0f} MB" for e in early)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct (fetched once)")
    parser.add_argument("--engines", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args()
    if args.model is None:
        from exo_lab.weights.smollm2 import smollm2_model_dir

        args.model = str(smollm2_model_dir())
    with exo_lab.Cluster.local(engines=args.engines, max_cores=1) as cluster:
        for index, engine_id in enumerate(sorted(cluster.control.ids)):
            cluster.control.call(engine_id, pin_to_core, index, what="pinning to a core")
        cluster.load(args.model, min_stages=args.engines, max_batch=8, progress=False)
        run(cluster, collect(cluster, prompt_of(cluster, 8), 4))    # warm-up
        rows = [micro_batching(cluster, args.rounds), prefill_gap(cluster), prefix_reuse(cluster),
                flat_memory(cluster)]
    print(f"{'target':<58} {'measured':>9}  {'goal':<9} detail")
    for row in rows:
        print(f"{row['target']:<58} {row['value']:>8.2f}x  {row['goal']:<9} {row['detail']}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
