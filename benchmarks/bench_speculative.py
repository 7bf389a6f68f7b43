"""Speculative decoding with the real SmolLM2 (float32) on 2 engines: speed against plain
decoding on the same cluster (``speculative=False`` per request), identical tokens checked.
The cluster is loaded with ``speculation="draft_model"`` (SmolLM2 itself at int8 drafting on
the coordinator); each request names its drafter.

1. **editing** -- one stream, greedy: rewrite a given ~300-token text (or code) with one small
   change, the answer copying most of the prompt; prompt lookup (target >= 1.8x), then the
   draft model.
2. **chat** -- one stream, greedy, open chat prompts (nothing to copy): the draft model (target
   >= 1.3x), then prompt lookup (it must not lose).
3. **batch** -- eight concurrent streams, aggregate tokens/s with the load's drafter (past
   ``max_rows`` speculation is off: target >= 0.95x).

Each line: tokens, seconds plain and speculative, the ratio, the drafts' acceptance rate, the
tokens per verify trip (from the cluster's metrics), the draft model's seconds, and whether the
tokens were identical.

    python benchmarks/bench_speculative.py [--tokens 256] [--repeats 2]
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import itertools

import exo_lab
from exo_lab.coordinator.tenants import Tenant
from exo_lab.sampling import SamplingParams

# Every run is its own client: no run reuses the prompt KV another left in a slot (prefix reuse
# is per client), so plain and speculative runs both prefill their whole prompt.
_RUNS = itertools.count()


def fresh_client() -> Tenant:
    return Tenant(f"bench-run-{next(_RUNS)}")

TEXT = """\
The office has six engineering PCs. Each has a 16-core CPU and 128 GB of memory, and two of them
have an NVIDIA GPU. During the day their owners build software, run tests and answer email; at
night the machines are idle. The team wants to use them together to run a language model that
does not fit on any single PC. The cat that lives in the office sleeps on the warmest machine.
A coordinator PC plans how the model's layers are split across the machines, starts a worker on
each one, and serves an API that applications call as if it were a single server. When a PC gets
busy or leaves, the coordinator notices and moves the layers elsewhere, so requests keep going.
The cat does not notice any of this, but it does prefer the PCs with the busiest fans."""

CODE = """\
def load_stage(spec, stage_index, num_stages, bind_host):
    stage = Stage(spec, read_config(spec.model))
    stage.allocate_kv()
    weights = read_weights(spec.model, stage.checkpoint_names())
    stage.load_weights(weights)
    worker = StageWorker(stage, inbox_for(bind_host), stage_index, num_stages)
    publish(worker)
    return LoadedStage(stage_index=stage_index, address=worker.address,
                       parameter_bytes=stage.parameter_bytes(), kv_bytes=stage.kv_cache_bytes())


def unload_stage():
    worker = current_worker()
    if worker is None:
        return False
    worker.stop()
    publish(None)
    return True"""

EDITS = [
    ("Rewrite the text below with 'cat' replaced by 'dog'. Change nothing else.\n\n" + TEXT),
    ("Rewrite this Python code with the function load_stage renamed to start_stage. Change nothing "
     "else.\n\n" + CODE),
]
CHATS = ["What is a good way to learn to play the piano as an adult?",
         "Explain in a few sentences why the sky is blue.",
         "Write a short poem about autumn leaves."]


def one(cluster, messages, tokens: int, speculative: bool | str) -> tuple[list[int], float]:
    ids = cluster.encode_chat(messages)
    params = SamplingParams(max_new_tokens=tokens, speculative=speculative)
    started = time.perf_counter()
    result = cluster.run_coroutine(_collect(cluster, ids, params, fresh_client()))
    return result, time.perf_counter() - started


async def _collect(cluster, ids, params, tenant: Tenant) -> list[int]:
    out = []
    async for event in cluster.astream(ids, params, tenant):
        out += event.token_ids
    return out


async def _gather(coroutines):
    return await asyncio.gather(*coroutines)


def single(cluster, label: str, prompts: list[str], tokens: int, repeats: int, drafter: str) -> None:
    for index, prompt in enumerate(prompts):
        messages = [{"role": "user", "content": prompt}]
        plain_s, fast_s, same = [], [], True
        metrics = cluster.metrics
        drafted, accepted, rows = metrics.draft_tokens_total, metrics.draft_accepted_total, metrics.verify_rows_total
        drafting = metrics.draft_seconds_total
        for _ in range(repeats):
            plain, seconds = one(cluster, messages, tokens, False)
            plain_s.append(seconds)
            fast, seconds = one(cluster, messages, tokens, drafter)
            fast_s.append(seconds)
            same = same and fast == plain
        drafted = metrics.draft_tokens_total - drafted
        accepted = metrics.draft_accepted_total - accepted
        rows = metrics.verify_rows_total - rows
        drafting = (metrics.draft_seconds_total - drafting) / repeats
        plain_t, fast_t = statistics.median(plain_s), statistics.median(fast_s)
        print(f"{label:8s} {drafter:13s} {index:2d} {len(plain):6d} {plain_t:8.2f} {fast_t:8.2f} "
              f"{plain_t / fast_t:6.2f} {(accepted / drafted if drafted else 0):7.2f} "
              f"{((accepted + rows) / rows if rows else 1):6.2f} {drafting:8.2f} {'yes' if same else 'NO'}", flush=True)


def batch(cluster, tokens: int, streams: int = 8) -> None:
    results = {}
    for speculative in (False, True):
        runs = [_collect(cluster, cluster.encode_chat([{"role": "user", "content": EDITS[i % 2]}]),
                         SamplingParams(max_new_tokens=tokens, speculative=speculative), fresh_client())
                for i in range(streams)]
        started = time.perf_counter()
        outputs = cluster.run_coroutine(_gather(runs))
        seconds = time.perf_counter() - started
        results[speculative] = (outputs, sum(len(o) for o in outputs) / seconds)
    same = results[True][0] == results[False][0]
    print(f"batch of {streams}: plain {results[False][1]:.1f} tok/s, speculative {results[True][1]:.1f} tok/s, "
          f"ratio {results[True][1] / results[False][1]:.2f}, tokens identical: {'yes' if same else 'NO'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=256, help="max new tokens per answer")
    parser.add_argument("--repeats", type=int, default=2, help="runs per prompt and mode (median time)")
    parser.add_argument("--model", default="smollm2")
    args = parser.parse_args()
    with exo_lab.Cluster.local(engines=2, max_cores=1) as cluster:
        cluster.load(args.model, min_stages=2, max_batch=8, speculation="draft_model", progress=False)
        one(cluster, [{"role": "user", "content": "Hi"}], 8, False)      # warm-up
        one(cluster, [{"role": "user", "content": "Hi"}], 8, True)
        print(f"{'task':8s} {'drafter':13s} {'#':>2s} {'tokens':>6s} {'plain s':>8s} {'spec s':>8s} {'ratio':>6s} "
              f"{'accept':>7s} {'/trip':>6s} {'draft s':>8s} same")
        single(cluster, "editing", EDITS, args.tokens, args.repeats, "prompt_lookup")
        single(cluster, "chat", CHATS, args.tokens, args.repeats, "draft_model")
        single(cluster, "chat", CHATS, args.tokens, args.repeats, "prompt_lookup")
        single(cluster, "editing", EDITS, args.tokens, args.repeats, "draft_model")
        batch(cluster, min(args.tokens, 96))


if __name__ == "__main__":
    main()
