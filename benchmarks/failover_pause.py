"""The pause a stage engine's death costs, with a real model: kill -9 mid-answer, measure.

    python benchmarks/failover_pause.py [--model smollm2] [--streams 8] [--tokens 64] [--engines 3]

A local cluster of ``--engines`` engines (one torch thread each) loads the model on 2 stages
(the rest are spares). ``--streams`` greedy requests run once uninterrupted, then again at once;
after a quarter of their tokens the first stage's engine is SIGKILLed. Prints how many streams
equal the uninterrupted run, and the pause: from the kill until tokens flow again after the
stall (and the scheduler's own figure, failure detected to pipeline back). Exits 1 when a
stream differs. Only 127.0.0.1 is used; every process ends with the cluster.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import signal
import time

import exo_lab
from exo_lab.sampling import SamplingParams


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--engines", type=int, default=3)
    args = parser.parse_args()

    with exo_lab.Cluster.local(engines=args.engines, max_cores=1) as cluster:
        started = time.perf_counter()
        cluster.load(args.model, min_stages=2, max_batch=max(8, args.streams), progress=False)
        load_s = time.perf_counter() - started
        prompts = [cluster.encode_chat([{"role": "user", "content": f"Question {i}: how do office PCs "
                                         f"share the work of a language model?"}]) for i in range(args.streams)]
        params = SamplingParams(max_new_tokens=args.tokens, ignore_eos=True)
        expected = [cluster.generate(p, max_new_tokens=args.tokens, ignore_eos=True).token_ids for p in prompts]
        out: list[list[int]] = [[] for _ in prompts]
        stamps: list[float] = []

        async def one(i: int, prompt: list[int]) -> None:
            async for event in cluster.astream(prompt, params):
                out[i].extend(event.token_ids)
                stamps.append(time.perf_counter())

        async def scenario() -> float:
            tasks = [asyncio.ensure_future(one(i, p)) for i, p in enumerate(prompts)]
            while sum(map(len, out)) < args.streams * args.tokens // 4:
                await asyncio.sleep(0.002)
            victim = cluster.pipeline.engines[0]
            os.kill(victim.pid, signal.SIGKILL)
            killed = time.perf_counter()
            await asyncio.gather(*tasks)
            return killed

        killed = cluster.run_coroutine(scenario())
        # tokens already in flight still arrive just after the kill: the pause is the stall
        gaps = [(b - a, b) for a, b in zip(stamps, stamps[1:]) if b > killed]
        stall_s, resumed = max(gaps)
        metrics = cluster.metrics.snapshot()
        stages = len(cluster.pipeline.plan.stages)
    same = [got == want for got, want in zip(out, expected)]
    print(f"{args.model}: {args.streams} greedy streams x {args.tokens} tokens, 2 stages on {args.engines} "
          f"engines (1 thread each), loaded in {load_s:.1f} s; first stage's engine SIGKILLed after "
          f"{args.streams * args.tokens // 4} tokens")
    print(f"streams equal to the uninterrupted run: {sum(same)}/{len(same)}")
    print(f"kill -> tokens flow again: {resumed - killed:.2f} s (longest gap between tokens {stall_s:.2f} s); "
          f"scheduler's pause (detected -> back): "
          f"{metrics['last_failover_pause_s'] or 0:.2f} s; failovers {metrics['failovers_total']}, "
          f"replayed {metrics['replayed_requests_total']}; now {stages} stage(s)")
    return 0 if all(same) else 1


if __name__ == "__main__":
    raise SystemExit(main())
