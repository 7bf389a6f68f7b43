"""What the benchmarks measure, shared by ``exo-lab bench`` (:mod:`exo_lab.bench`) and its
speed comparison (:mod:`exo_lab.bench_speed`): the single-process transformers baseline and the
same prompts as concurrent requests through a cluster; and the disturbance re-balancing is
measured against (benchmarks/bench_rebalance.py, tests/test_rebalance.py): engines pinned to a
core each (:func:`pin_process`) and a busy loop on one of them (:func:`cpu_hog`). Linux only.
"""
from __future__ import annotations

import asyncio
import ctypes
import gc
import os
import signal
import subprocess
import sys
import time


def pin_process(pid: int, core: int) -> None:
    """Every thread of process ``pid`` onto ``core`` (threads it starts later inherit it)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), {core})
        except ProcessLookupError:
            pass                    # a thread that ended meanwhile


def cpu_hog(core: int) -> subprocess.Popen:
    """A busy loop on ``core``, as a PC's owner starting a build; it dies with this process
    (SIGKILL on its parent's death), so an interrupted benchmark leaves none behind."""
    def pinned():
        os.sched_setaffinity(0, {core})
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)          # PR_SET_PDEATHSIG

    return subprocess.Popen([sys.executable, "-c", "while True: pass"], preexec_fn=pinned)


class SingleProcess:
    """The baseline: the whole model in this process, `model.generate` on a batch, all cores."""

    def __init__(self, model_dir, dtype: str):
        import torch
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=getattr(torch, dtype)).eval()
        self.measure([[1, 2, 3]], 2)  # warm-up: page in the weights

    def measure(self, prompts: list[list[int]], new_tokens: int) -> dict:
        """Aggregate tokens/s, TTFT and per-stream decode tokens/s of one batched generate."""
        import torch

        inputs = torch.tensor(prompts)
        times = _TokenClock()
        started = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=new_tokens,
                                      min_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                                      pad_token_id=0, streamer=times)
        ended = time.perf_counter()
        stamps = times.stamps[1:]   # the first put() is the prompt itself
        return _figures(len(prompts) * new_tokens, started, ended, stamps[0], stamps[-1],
                        [row[inputs.shape[1]:].tolist() for row in out])

    def close(self) -> None:
        del self.model
        gc.collect()


class _TokenClock:
    """A generate() streamer that only notes when each step's tokens arrive."""

    def __init__(self):
        self.stamps: list[float] = []

    def put(self, value) -> None:
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass


def _figures(tokens: int, started: float, ended: float, first: float, last: float, rows: list[list[int]]) -> dict:
    steps = len(rows[0]) - 1
    return {"tokens_per_s": tokens / (ended - started), "ttft_s": first - started,
            "decode_tokens_per_s": steps / (last - first) if last > first else 0.0, "tokens": rows}


def measure_cluster(cluster, prompts: list[list[int]], new_tokens: int) -> dict:
    """The same batch as concurrent requests through the cluster's scheduler."""
    from .sampling import SamplingParams

    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    stamps: list[float] = []

    async def one(prompt):
        tokens = []
        async for event in cluster.astream(prompt, params):
            stamps.append(time.perf_counter())
            tokens.extend(event.token_ids)
        return tokens

    async def batch():
        return await asyncio.gather(*[one(p) for p in prompts])

    started = time.perf_counter()
    rows = cluster.run_coroutine(batch())
    ended = time.perf_counter()
    return _figures(len(prompts) * new_tokens, started, ended, min(stamps), max(stamps), rows)
