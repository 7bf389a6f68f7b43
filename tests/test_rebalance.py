"""Re-balancing while serving, on real engines: a PC gets busy mid-run and the layers move off
it with the streams going on; it gets free and they come back.

Two engines, pinned to one core each (as two PCs); a CPU hog pinned to the first engine's core
halves that engine's share of it. With ``replan: auto`` the supervisor sees stage 0 run slower
than it did, moves layers to stage 1 through the failover path (requests replayed), and moves
them back once the hog ends. Every stream must give exactly the greedy tokens of the same
request run undisturbed, and none may be lost. Timing figures are benchmarks/bench_rebalance.py's.
"""
from __future__ import annotations

import asyncio
import os
import time

import pytest

import exo_lab
from exo_lab.bench_measure import cpu_hog, pin_process
from exo_lab.sampling import SamplingParams

# layers of a few ms each at 1 thread: a move gains more than the re-plan's 1 ms minimum
MODEL = dict(num_layers=6, hidden_size=768, intermediate_size=2048, num_attention_heads=12, num_key_value_heads=4)
STREAMS, TOKENS = 4, 300
DEADLINE_S = 120

pytestmark = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores to pin 2 engines")


def split(cluster) -> list[tuple[int, int]]:
    return [(stage.start_layer, stage.stop_layer) for stage in cluster.pipeline.plan.stages]


async def stream_all(cluster, prompts, produced: list[list[int]]):
    async def one(i, prompt):
        params = SamplingParams(max_new_tokens=TOKENS, ignore_eos=True, temperature=0.0)
        async for event in cluster.astream(prompt, params):
            produced[i].extend(event.token_ids)
    return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)), return_exceptions=True)


def test_layers_move_off_a_busy_pc_and_back_with_every_stream_token_exact(tiny_model_dir):
    folder = tiny_model_dir(**MODEL)
    with exo_lab.Cluster.local(engines=2, max_cores=1, replan="auto") as cluster:
        cluster.load(str(folder), min_stages=2, objective="throughput", progress=False)
        even = split(cluster)
        assert even == [(0, 3), (3, 6)]
        for core, info in enumerate(cluster.pipeline.engines):
            pin_process(info.pid, core)
        prompts = [cluster.encode(f"Stream {i} about office PCs:") for i in range(STREAMS)]
        undisturbed = [[] for _ in prompts]
        assert cluster.run_coroutine(stream_all(cluster, prompts, undisturbed)) == [None] * STREAMS
        metrics = cluster.pipeline.scheduler.metrics
        assert split(cluster) == even and metrics.rebalances_total == 0, "the pipeline moved with no PC disturbed"
        rounds, seen = [], {}

        async def hog_spell(first_round: list[list[int]]):
            while sum(map(len, first_round)) < 200:
                await asyncio.sleep(0.01)
            hog = cpu_hog(0)
            try:
                while split(cluster) == even:
                    await asyncio.sleep(0.05)
                seen["busy"] = split(cluster)
                # the busy spell outlasts the new stages' first steps (their baseline)
                while cluster.pipeline.scheduler.stage_clock.ratios() is None:
                    await asyncio.sleep(0.05)
            finally:
                hog.kill()
                hog.wait()
            while split(cluster) != even:
                await asyncio.sleep(0.05)
            seen["free"] = split(cluster)

        async def disturbed():
            """Rounds of the same requests while the hog comes and goes (at most DEADLINE_S)."""
            rounds.append([[] for _ in prompts])
            spell = asyncio.ensure_future(hog_spell(rounds[0]))
            started = time.monotonic()
            while True:
                outcomes = await stream_all(cluster, prompts, rounds[-1])
                assert outcomes == [None] * STREAMS, f"a request was lost: {outcomes}"
                if spell.done() or time.monotonic() - started > DEADLINE_S:
                    break
                rounds.append([[] for _ in prompts])
            spell.cancel()

        cluster.run_coroutine(disturbed())
        assert seen.get("busy", even)[0][1] < 3, f"no layers moved off the busy PC: {seen}"
        assert seen.get("free") == even, f"the layers did not come back once the PC was free: {seen}"
        assert all(produced == undisturbed for produced in rounds)
        assert metrics.failovers_total == 0 and metrics.rebalances_total == 2
