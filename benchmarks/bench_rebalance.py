"""Re-balancing while serving: a CPU hog on one PC's core mid-run, then gone.

Two local engines, one torch thread each, pinned to one core each (two PCs of one core); the
model over both (``replan: auto``, objective throughput). A steady load: ``--streams`` requests at
once, each ``--tokens`` greedy tokens from a fixed set of prompts, a new one started as one ends.

1. undisturbed: each prompt's tokens (the reference) and the tokens/s;
2. a hog (a busy loop pinned to engine 0's core) starts: the time until the layers moved, and the
   tokens/s from 30 to 60 s after the hog started;
3. the hog stops: the time until the plan is back, and the tokens/s after;
4. the best static plan for the hogged speeds: re-balancing off, the hog on again, the model
   loaded at several fixed splits (engine 0 planned as 1x .. 3x slower), the tokens/s of each.

Every request of steps 1-3 must equal its prompt's reference and none may fail.

    python benchmarks/bench_rebalance.py [--model smollm2] [--streams 4] [--tokens 96]
"""
from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # runnable before pip install

import exo_lab  # noqa: E402
from exo_lab.bench import prompt_batch  # noqa: E402
from exo_lab.bench_measure import cpu_hog, pin_process  # noqa: E402
from exo_lab.sampling import SamplingParams  # noqa: E402

PROMPTS = 8
SLOWER = (1.0, 1.5, 2.0, 2.5, 3.0)      # step 4: engine 0 planned this much slower


class Load:
    """``streams`` requests at once, round the prompts, until stopped; every token timed."""

    def __init__(self, cluster, prompts, streams: int, tokens: int):
        self.cluster, self.prompts, self.streams, self.tokens = cluster, prompts, streams, tokens
        self.stamps: list[float] = []
        self.done: list[tuple[int, list[int]]] = []      # (prompt index, tokens)
        self.errors: list[BaseException] = []
        self._next = 0
        self._stop = False
        self._task = None

    async def _worker(self):
        params = SamplingParams(max_new_tokens=self.tokens, ignore_eos=True, temperature=0.0)
        while not self._stop:
            index, self._next = self._next % len(self.prompts), self._next + 1
            out = []
            try:
                async for event in self.cluster.astream(self.prompts[index], params):
                    out.extend(event.token_ids)
                    self.stamps.extend([time.monotonic()] * len(event.token_ids))
            except Exception as exc:            # a lost request: counted
                self.errors.append(exc)
                continue
            self.done.append((index, out))

    def start(self):
        async def run():
            await asyncio.gather(*(self._worker() for _ in range(self.streams)))
        self._task = concurrent.futures.ThreadPoolExecutor(1).submit(self.cluster.run_coroutine, run())

    def stop(self):
        self._stop = True
        self._task.result(600)

    def rate(self, start: float, end: float) -> float:
        return sum(start <= t < end for t in self.stamps) / (end - start)


def split(cluster) -> tuple[tuple[int, int], ...]:
    return tuple((s.start_layer, s.stop_layer) for s in cluster.pipeline.plan.stages)


def wait_until(predicate, timeout_s: float) -> float | None:
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if predicate():
            return time.monotonic()
        time.sleep(0.05)
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=96)
    args = parser.parse_args()
    if len(os.sched_getaffinity(0)) < 2:
        sys.exit("needs 2 cores: one per engine")
    options = dict(dtype=args.dtype, min_stages=2, objective="throughput", max_batch=args.streams, progress=False)
    with exo_lab.Cluster.local(engines=2, max_cores=1, replan="auto") as cluster:
        cluster.load(args.model, **options)
        for core, info in enumerate(cluster.pipeline.engines):
            pin_process(info.pid, core)
        busy_node = cluster.pipeline.plan.stages[0].node
        even = split(cluster)
        prompts = prompt_batch(cluster.tokenizer, PROMPTS, 24)
        load = Load(cluster, prompts, args.streams, args.tokens)
        began = time.monotonic()
        load.start()
        wait_until(lambda: len({i for i, _ in load.done}) == PROMPTS and time.monotonic() - began > 25, 600)
        rows = [("undisturbed", f"{load.rate(began + 5, time.monotonic()):.1f}", "-", str(even))]
        reference = {}
        for index, tokens in load.done:
            reference.setdefault(index, tokens)
        moved_before = split(cluster) != even

        hog_on = time.monotonic()
        hog = cpu_hog(0)
        moved = wait_until(lambda: split(cluster) != even, 60)
        chosen = dict(cluster.control.speed_factors)
        time.sleep(max(0.0, hog_on + 60 - time.monotonic()))
        moved_to = split(cluster)
        rows.append(("hog on: 30-60 s after", f"{load.rate(hog_on + 30, hog_on + 60):.1f}",
                     f"{moved - hog_on:.1f} s to move" if moved else "no move in 60 s", str(moved_to)))
        hogged_rate = load.rate(hog_on + 30, hog_on + 60)
        hog.kill()
        hog.wait()
        hog_off = time.monotonic()
        metrics = cluster.pipeline.scheduler.metrics
        moves = metrics.rebalances_total
        back = wait_until(lambda: metrics.rebalances_total > moves and split(cluster) != moved_to, 90)
        settle = (back or time.monotonic()) + 5
        time.sleep(max(0.0, settle + 20 - time.monotonic()))
        rows.append(("hog off: 20 s after the move back", f"{load.rate(settle, settle + 20):.1f}",
                     f"{back - hog_off:.1f} s to move back" if back else "no move back in 90 s", str(split(cluster))))
        load.stop()
        mismatched = sum(tokens != reference[index] for index, tokens in load.done)
        checked, lost, rebalances = len(load.done), len(load.errors), metrics.rebalances_total

        # the static plans, the re-balancer's among them, in two rounds (the second in reverse
        # order: this machine's speed wanders over minutes); each its mean
        cluster.supervisor.replan_auto = False
        plans = [(f"engine 0 x{factor}", {busy_node: factor}) for factor in SLOWER]
        plans.append(("the re-balancer's: engine 0 x" + f"{chosen.get(busy_node, 1.0):.2f}", chosen))
        rates: dict[str, list[float]] = {name: [] for name, _ in plans}
        layers = {}
        hog = cpu_hog(0)
        try:
            for order in (plans, plans[::-1]):
                for name, factors in order:
                    cluster.control.speed_factors = dict(factors)
                    cluster.load(args.model, **options)
                    layers[name] = split(cluster)
                    fixed = Load(cluster, prompts, args.streams, args.tokens)
                    began = time.monotonic()
                    fixed.start()
                    time.sleep(25)
                    fixed.stop()
                    rates[name].append(fixed.rate(began + 5, began + 25))
        finally:
            hog.kill()
            hog.wait()
    static = {name: sum(values) / len(values) for name, values in rates.items()}
    for name, _ in plans:
        runs = " / ".join(f"{rate:.1f}" for rate in rates[name])
        rows.append((f"hog on, static: {name}", f"{static[name]:.1f}", runs, str(layers[name])))
    best_name = max(static, key=static.get)
    best = static[best_name]
    print(f"{args.model} {args.dtype}, 2 engines x 1 thread pinned to cores 0 and 1, {args.streams} streams x "
          f"{args.tokens} greedy tokens, objective throughput")
    print(f"{'phase':<52}{'tokens/s':>10}  {'move (static: the 2 rounds)':<28}stages")
    for phase, rate, move, split_ in rows:
        print(f"{phase:<52}{rate:>10}  {move:<28}{split_}")
    chosen_name = plans[-1][0]
    print(f"best static plan for the hogged speeds: {best_name}. Against it: 30-60 s after the hog "
          f"{hogged_rate / best:.2f}, the re-balancer's plan loaded static {static[chosen_name] / best:.2f}")
    print(f"requests checked {checked}, token mismatches {mismatched}, lost {lost}, re-balances {rebalances}"
          f"{', a move before the hog' if moved_before else ''}")


if __name__ == "__main__":
    main()
