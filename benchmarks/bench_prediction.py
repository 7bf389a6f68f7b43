"""The planner's prediction against the pipeline's measured speed: one stream, greedy.

For each model and engine count: a local cluster of that many engines (torch threads: the
cores shared out, at least 1 each), the model loaded over exactly that many stages, 64 tokens
generated 3 times (a 32-token prompt; decode only: the time after the first token). Prints the
plan's predicted ms per token, the median measured, the error |predicted - measured| / measured,
and per stage the plan's figure against the stage's own mean step time (reported by the stages,
as /metrics and the widget show it).

    python benchmarks/bench_prediction.py [--models smollm2,qwen2.5-0.5b] [--engines 1,2,3]

``qwen2.5-0.5b`` is exo-lab bench's random-weight preset with Qwen2.5-0.5B's shape.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # runnable before pip install

import exo_lab  # noqa: E402
from exo_lab.bench import PRESETS, bench_model_dir, prompt_batch  # noqa: E402
from exo_lab.engine.probe import usable_cores  # noqa: E402
from exo_lab.sampling import SamplingParams  # noqa: E402

TOKENS, RUNS = 64, 3


def measure(model: str, engines: int, dtype: str) -> dict:
    threads = max(1, usable_cores() // engines)
    model_id = str(bench_model_dir(model)) if model in PRESETS else model
    with exo_lab.Cluster.local(engines=engines, max_cores=threads) as cluster:
        plan = cluster.load(model_id, dtype=dtype, min_stages=engines, max_batch=1, progress=False)
        prompt = prompt_batch(cluster.tokenizer, 1, 32)[0]
        params = SamplingParams(max_new_tokens=TOKENS, ignore_eos=True)
        cluster.generate(prompt, max_new_tokens=4, ignore_eos=True)          # warm-up
        metrics = cluster.metrics
        sums, counts = dict(metrics.stage_ms_sum), dict(metrics.stage_ms_count)
        decode_ms = []
        for _ in range(RUNS):
            stamps = []

            async def run():
                async for _event in cluster.astream(prompt, params):
                    stamps.append(time.perf_counter())

            cluster.run_coroutine(run())
            decode_ms.append((stamps[-1] - stamps[0]) / (len(stamps) - 1) * 1000)
        stage_ms = [(metrics.stage_ms_sum[i] - sums.get(i, 0.0)) / (metrics.stage_ms_count[i] - counts.get(i, 0))
                    for i in range(len(plan.stages))]
    measured = statistics.median(decode_ms)
    return {"model": model, "engines": engines, "threads": threads, "predicted": plan.predicted_ms_per_token,
            "measured": measured, "runs": decode_ms,
            "stages": [(s.ms_per_token, ms) for s, ms in zip(plan.stages, stage_ms)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2,qwen2.5-0.5b")
    parser.add_argument("--engines", default="1,2,3")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    print(f"{'model':14s} {'engines':>7s} {'threads':>7s} {'predicted':>9s} {'measured':>8s} {'error':>6s}  "
          f"runs (ms/token); per stage predicted/measured ms")
    for model in args.models.split(","):
        for engines in (int(n) for n in args.engines.split(",")):
            row = measure(model, engines, args.dtype)
            error = abs(row["predicted"] - row["measured"]) / row["measured"]
            stages = " ".join(f"{p:.1f}/{m:.1f}" for p, m in row["stages"])
            runs = ",".join(f"{ms:.1f}" for ms in row["runs"])
            print(f"{model:14s} {engines:7d} {row['threads']:7d} {row['predicted']:9.1f} {row['measured']:8.1f} "
                  f"{error:6.0%}  {runs}; {stages}", flush=True)


if __name__ == "__main__":
    main()
