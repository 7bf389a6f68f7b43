"""A PC can die mid-answer: the cluster re-plans on the survivors, replays, and the streams go on.

Each case compares every stream with the same request run uninterrupted (seeded sampling at
temperature 0.8: the draws depend on seed and position only, so a replayed request must give
exactly the same tokens). Engines are killed by pid; everything started is stopped by the
cluster's own stop().
"""
from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

import exo_lab
from exo_lab.errors import ClusterError
from exo_lab.sampling import SamplingParams

NEW_TOKENS = 60


def params(seed: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True, temperature=0.8, seed=seed)


def uninterrupted(cluster, prompts) -> list[list[int]]:
    return [cluster.generate(p, max_new_tokens=NEW_TOKENS, ignore_eos=True, temperature=0.8, seed=i).token_ids
            for i, p in enumerate(prompts)]


def run_with_failures(cluster, prompts, strike, *, after_tokens: list[int]) -> tuple[list, list[float]]:
    """Stream every prompt at once; when the streams have produced ``after_tokens[k]`` tokens in
    all, call ``strike(k)``. Returns every stream's tokens and each failure's pause (strike to
    the next token of any stream)."""
    out = [[] for _ in prompts]
    pauses = []

    async def one(i, prompt):
        async for event in cluster.astream(prompt, params(i)):
            out[i].extend(event.token_ids)

    async def scenario():
        tasks = [asyncio.ensure_future(one(i, p)) for i, p in enumerate(prompts)]
        for k, threshold in enumerate(after_tokens):
            while sum(map(len, out)) < threshold:
                await asyncio.sleep(0.005)
            strike(k)
            struck, before = time.perf_counter(), sum(map(len, out))
            while sum(map(len, out)) == before and not all(task.done() for task in tasks):
                await asyncio.sleep(0.005)
            pauses.append(time.perf_counter() - struck)
        await asyncio.gather(*tasks)

    cluster.run_coroutine(scenario())
    return out, pauses


def stage_pid(cluster, index: int) -> int:
    return cluster.pipeline.engines[index].pid


def test_streams_survive_two_stage_engines_killed_in_a_row():
    """8 concurrent streams on 2 stages with 2 spares; SIGKILL a stage's engine, then, after the
    failover, the engine of another stage: every stream completes with its uninterrupted tokens."""
    with exo_lab.Cluster.local(engines=4, max_cores=1) as cluster:
        cluster.load("demo", min_stages=2, progress=False)
        prompts = [cluster.encode(f"Request {i} asks about office PCs.") for i in range(8)]
        expected = uninterrupted(cluster, prompts)
        victims = []

        def kill(k):
            pid = stage_pid(cluster, 1 - k % 2)
            victims.append(pid)
            os.kill(pid, signal.SIGKILL)

        got, pauses = run_with_failures(cluster, prompts, kill, after_tokens=[100, 300])
        assert got == expected
        metrics = cluster.metrics.snapshot()
        assert metrics["failovers_total"] == 2 and metrics["replayed_requests_total"] >= 8
        assert len(set(victims)) == 2 and not {e.pid for e in cluster.pipeline.engines} & set(victims)
        assert max(pauses) < 30, pauses
        assert cluster.run_coroutine(cluster.ahealth()) == (True, "ok") and cluster.state == "serving"


def test_a_hung_engine_is_dropped_and_the_streams_go_on():
    """SIGSTOP: the engine still exists but answers nothing; the controller's heartbeat drops it."""
    with exo_lab.Cluster.local(engines=3, max_cores=1) as cluster:
        cluster.load("demo", min_stages=2, progress=False)
        prompts = [cluster.encode(f"Question {i} about clusters.") for i in range(4)]
        expected = uninterrupted(cluster, prompts)
        stopped = []

        def hang(_):
            stopped.append(stage_pid(cluster, 1))
            os.kill(stopped[0], signal.SIGSTOP)

        try:
            got, _ = run_with_failures(cluster, prompts, hang, after_tokens=[60])
        finally:
            for pid in stopped:
                os.kill(pid, signal.SIGKILL)
        assert got == expected
        assert cluster.metrics.failovers_total == 1 and stopped[0] not in {e.pid for e in cluster.pipeline.engines}


def test_when_the_survivors_cannot_hold_the_model_requests_end_clearly_and_it_reloads_later():
    # 650 MB per engine: half the demo model fits one engine (600 MB of it is the runtime
    # overhead the planner counts), the whole model does not
    with exo_lab.Cluster.local(engines=2, max_cores=1, max_memory="650MB") as cluster:
        cluster.load("demo", min_stages=2, progress=False)
        prompt = cluster.encode("A question that will not be answered.")

        def kill(_):
            os.kill(stage_pid(cluster, 1), signal.SIGKILL)

        started = time.perf_counter()
        with pytest.raises(ClusterError, match="cannot serve the model"):
            run_with_failures(cluster, [prompt], kill, after_tokens=[5])
        assert time.perf_counter() - started < 15
        ok, reason = cluster.run_coroutine(cluster.ahealth())
        assert not ok and "cannot serve the model" in reason and "stopped" in reason
        assert cluster.state == "failed" and cluster.status()["lifecycle"] == "failed"
        with pytest.raises(ClusterError, match="cannot serve the model"):
            cluster.generate(prompt, max_new_tokens=3)
        cluster.control.start_engines(1)            # a PC comes back
        deadline = time.monotonic() + 60
        while cluster.state != "serving" and time.monotonic() < deadline:
            time.sleep(0.2)
        assert cluster.failure is None and cluster.state == "serving", cluster.status()
        assert cluster.generate(prompt, max_new_tokens=3, ignore_eos=True).completion_tokens == 3


def test_an_engine_that_dies_while_its_shard_loads_is_left_out_and_the_load_goes_on():
    """SIGKILL an engine the moment its shard starts loading: load() plans again on the two
    engines left and returns, and the greedy answer is transformers' own."""
    import threading

    from exo_lab.weights.demo import demo_model_dir
    from stages import hf_greedy

    with exo_lab.Cluster.local(engines=3, max_cores=1) as cluster:
        killed: list[int] = []

        def kill_the_first_that_loads():
            deadline = time.monotonic() + 60
            while not killed and time.monotonic() < deadline:
                for engine_id, info in list(cluster.control.infos.items()):
                    if cluster.control.state(engine_id) == "loading":
                        os.kill(info.pid, signal.SIGKILL)
                        killed.append(engine_id)
                        return
                time.sleep(0.001)

        watcher = threading.Thread(target=kill_the_first_that_loads, daemon=True)
        watcher.start()
        plan = cluster.load("demo", min_stages=3, progress=False)
        watcher.join(5)
        assert killed and killed[0] not in {e.engine_id for e in cluster.pipeline.engines}
        assert len(plan.stages) == 2
        prompt = cluster.encode("Engines that die while loading.")
        got = cluster.generate(prompt, max_new_tokens=NEW_TOKENS, ignore_eos=True).token_ids
        assert got == hf_greedy(demo_model_dir(), prompt, NEW_TOKENS)
