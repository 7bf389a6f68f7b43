"""Grammar engines on SmolLM2's 49,152-token vocabulary: compile time and mask time per token.

Compares llguidance and xgrammar (outlines-core is not installed here) on the five example
schemas of :mod:`exo_lab.constrain` (nested objects, enums, arrays, bounded numbers, required
fields). For each schema and engine it compiles the schema (cold: a fresh compiler, no cache),
then walks the grammar --walks times, choosing uniformly among the allowed tokens with a seeded
RNG, timing every mask computation. Prints a table; the numbers behind the engine choice in
exo_lab/constrain.py's docstring come from here.

    python benchmarks/bench_grammar.py [--walks 20] [--seed 0]
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from exo_lab.constrain import EXAMPLE_SCHEMAS
from exo_lab.weights.smollm2 import smollm2_model_dir

MAX_STEPS = 400  # a walk that has not finished by then is cut (it still counts its masks)


def allowed_ids(mask: bytes | np.ndarray) -> np.ndarray:
    bits = np.unpackbits(np.frombuffer(bytes(mask), np.uint8), bitorder="little")
    return np.flatnonzero(bits)


class LLGuidanceEngine:
    name = "llguidance"

    def __init__(self, tokenizer):
        import llguidance.hf
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer)

    def compile(self, schema):
        import llguidance
        grammar = llguidance.LLMatcher.grammar_from_json_schema(
            schema, defaults={"whitespace_flexible": False, "item_separator": ", ",
                              "key_separator": ": "})
        matcher = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
        assert not matcher.is_error(), matcher.get_error()
        return matcher

    def walk(self, matcher, rng):
        matcher = matcher.deep_copy()
        times = []
        for _ in range(MAX_STEPS):
            if matcher.is_stopped():
                break
            start = time.perf_counter()
            mask = matcher.compute_bitmask()
            times.append(time.perf_counter() - start)
            assert matcher.consume_token(int(rng.choice(allowed_ids(mask))))
        return times


class XGrammarEngine:
    name = "xgrammar"

    def __init__(self, tokenizer):
        import xgrammar
        self.info = xgrammar.TokenizerInfo.from_huggingface(tokenizer)
        self.xgrammar = xgrammar

    def compile(self, schema):
        compiler = self.xgrammar.GrammarCompiler(self.info, max_threads=1, cache_enabled=False)
        return compiler.compile_json_schema(schema, any_whitespace=False,
                                            separators=(", ", ": "))

    def walk(self, compiled, rng):
        matcher = self.xgrammar.GrammarMatcher(compiled)
        bitmask = self.xgrammar.allocate_token_bitmask(1, self.info.vocab_size)
        times = []
        for _ in range(MAX_STEPS):
            if matcher.is_terminated():
                break
            start = time.perf_counter()
            matcher.fill_next_token_bitmask(bitmask)
            times.append(time.perf_counter() - start)
            ids = allowed_ids(bitmask[0].numpy().view(np.uint8))
            ids = ids[ids < self.info.vocab_size]
            assert matcher.accept_token(int(rng.choice(ids)))
        return times


def measure(engine, schema, walks: int, seed: int) -> dict:
    start = time.perf_counter()
    compiled = engine.compile(schema)
    compile_s = time.perf_counter() - start
    np_rng = np.random.default_rng(seed)
    times = []
    for _ in range(walks):
        times += engine.walk(compiled, np_rng)
    return dict(compile_ms=compile_s * 1e3, tokens=len(times),
                mean_us=statistics.fmean(times) * 1e6,
                p99_us=sorted(times)[int(0.99 * (len(times) - 1))] * 1e6,
                max_us=max(times) * 1e6)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--walks", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_model_dir(progress=False)))
    print(f"vocabulary: {len(tokenizer)} tokens; {args.walks} random walks per schema")
    engines = []
    for cls in (LLGuidanceEngine, XGrammarEngine):
        start = time.perf_counter()
        engines.append(cls(tokenizer))
        print(f"{cls.name}: tokenizer setup {time.perf_counter() - start:.2f} s")
    print(f"{'schema':16s} {'engine':11s} {'compile ms':>10s} {'tokens':>7s} "
          f"{'mask mean us':>12s} {'p99 us':>8s} {'max us':>8s}")
    for schema_name, schema in EXAMPLE_SCHEMAS.items():
        for engine in engines:
            row = measure(engine, schema, args.walks, args.seed)
            print(f"{schema_name:16s} {engine.name:11s} {row['compile_ms']:10.1f} "
                  f"{row['tokens']:7d} {row['mean_us']:12.0f} {row['p99_us']:8.0f} "
                  f"{row['max_us']:8.0f}")


if __name__ == "__main__":
    main()
