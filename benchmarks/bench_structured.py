"""Structured outputs with the real SmolLM2: valid rate and per-token cost of a JSON schema.

Runs ``exo_lab.Cluster.local(engines=2, max_cores=1)`` with SmolLM2 and, for each of the five
:data:`exo_lab.constrain.EXAMPLE_SCHEMAS`, --prompts chat prompts (8 at a time) through
``cluster.astream(..., processor=grammar.processor())``: the valid rate is the share whose text
parses with json and validates with jsonschema (target 100%). Then per-token time (median gap
between streamed tokens, same prompts) with a schema against unconstrained, at batch 1 and 8
(target <= 1.1x).
Prints a table.

    python benchmarks/bench_structured.py [--prompts 200] [--tokens 48]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import jsonschema

import exo_lab
from exo_lab import constrain
from exo_lab.constrain import EXAMPLE_SCHEMAS
from exo_lab.sampling import SamplingParams

BATCH = 8
TOPICS = ("a customer", "a city", "a bug report", "the weather", "a sensor", "a book", "an order",
          "a planet")


def prompt_ids(cluster, schema: dict, index: int) -> list[int]:
    return cluster.encode_chat([
        {"role": "system", "content": "Answer with one JSON object that matches this JSON schema: "
                                      + json.dumps(schema)},
        {"role": "user", "content": f"Example {index}: describe {TOPICS[index % len(TOPICS)]}."}])


async def one(cluster, ids, params, processor) -> tuple[str, list[float], str | None]:
    text, stamps, finish = [], [], None
    async for event in cluster.astream(ids, params, processor=processor):
        stamps.append(time.perf_counter())
        text.append(event.text)
        finish = event.finish_reason or finish
    return "".join(text), stamps, finish


def gaps_ms(stamp_lists) -> list[float]:
    return [(b - a) * 1e3 for stamps in stamp_lists for a, b in zip(stamps, stamps[1:])]


def valid_rate(cluster, name: str, schema: dict, prompts: int, tokens: int) -> tuple[int, str]:
    grammar = constrain.compile_json_schema(schema, cluster.tokenizer)
    valid, failure = 0, ""
    for start in range(0, prompts, BATCH):
        batch = range(start, min(prompts, start + BATCH))
        runs = [one(cluster, prompt_ids(cluster, schema, i),
                    SamplingParams(max_new_tokens=tokens, temperature=0.8, seed=i),
                    grammar.processor()) for i in batch]
        for text, _, finish in cluster.run_coroutine(_gather(runs)):
            try:
                jsonschema.validate(json.loads(text), schema)
                valid += 1
            except (ValueError, jsonschema.ValidationError) as exc:
                failure = failure or f"{name} (finish_reason {finish}): {text[-60:]!r}: " \
                                     f"{str(exc)[:80]}"
    return valid, failure


async def _gather(coroutines):
    return await asyncio.gather(*coroutines)


def stream_stamps(cluster, batch: int, schema: dict, constrained: bool, tokens: int) -> list[list[float]]:
    """When each token of ``batch`` concurrent requests arrived: the same prompts (the schema in
    the system prompt either way), with the schema's grammar or without (ignore_eos: it decodes
    ``tokens`` tokens)."""
    grammar = constrain.compile_json_schema(schema, cluster.tokenizer) if constrained else None
    runs = [one(cluster, prompt_ids(cluster, schema, i),
                SamplingParams(max_new_tokens=tokens, temperature=0.8, seed=i, ignore_eos=not constrained),
                grammar.processor() if grammar else None) for i in range(batch)]
    return [stamps for _, stamps, _ in cluster.run_coroutine(_gather(runs))]


def decode_gaps_ms(runs: list[list[float]], end: int) -> list[float]:
    """Gaps between consecutive tokens of each stream while every stream of the batch decodes:
    after the last one's first token (before, prompt chunks alternate with decode steps) and
    before any stream's ``end``-th token."""
    start = max(stamps[0] for stamps in runs)
    return [(b - a) * 1e3 for stamps in runs for a, b in zip(stamps[:end], stamps[1:end]) if a >= start]


def per_token_ms(cluster, batch: int, schema: dict, tokens: int) -> tuple[float, float]:
    """(constrained, unconstrained) median gap between tokens of ``batch`` requests decoding
    together, over the same stretch: until the shortest constrained answer ends (a grammar ends
    its answer early; past that, fewer rows per step would flatter the constrained run)."""
    constrained = stream_stamps(cluster, batch, schema, True, tokens)
    free = stream_stamps(cluster, batch, schema, False, tokens)
    end = min(len(stamps) for stamps in constrained)
    gaps = decode_gaps_ms(constrained, end), decode_gaps_ms(free, end)
    return tuple(statistics.median(g) if g else float("nan") for g in gaps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=200, help="prompts per schema")
    parser.add_argument("--tokens", type=int, default=160, help="max new tokens per answer")
    args = parser.parse_args()
    with exo_lab.Cluster.local(engines=2, max_cores=1) as cluster:
        cluster.load("smollm2", max_batch=BATCH, max_context=1024, progress=False)
        print(f"{'schema':16s} {'valid':>11s}")
        failures = []
        for name, schema in EXAMPLE_SCHEMAS.items():
            valid, failure = valid_rate(cluster, name, schema, args.prompts, args.tokens)
            print(f"{name:16s} {valid:5d}/{args.prompts:<5d} ({100 * valid / args.prompts:.1f}%)")
            failures += [failure] if failure else []
        for failure in failures:
            print("  invalid:", failure)
        print(f"\n{'batch':>5s} {'schema':16s} {'ms/token':>9s} {'free ms/token':>13s} {'ratio':>6s}")
        for batch in (1, BATCH):
            stream_stamps(cluster, batch, EXAMPLE_SCHEMAS["enums"], False, 16)   # warm-up
            for name, schema in EXAMPLE_SCHEMAS.items():
                constrained, free = per_token_ms(cluster, batch, schema, args.tokens)
                print(f"{batch:5d} {name:16s} {constrained:9.2f} {free:13.2f} "
                      f"{constrained / free:6.2f}", flush=True)


if __name__ == "__main__":
    main()
