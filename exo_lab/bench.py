"""`exo-lab bench`: single-process `model.generate` against the cluster on 1..N engines, in one run.

Same model, same prompt, greedy. Prints a table (and writes JSON with --json-out):
decode tokens/s and time to first token for each, the ratio cluster / single process, whether
the cluster's tokens equal the single process's, the data plane's per-hop overhead, and each
engine's peak RSS against its shard bytes and the bare engine's RSS.
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import time

logger = logging.getLogger(__name__)

PRESETS = {
    # A random-weight model with the shape of Qwen2.5-0.5B (494M parameters, tied embeddings).
    "qwen2.5-0.5b": dict(architecture="qwen2", num_layers=24, hidden_size=896, intermediate_size=4864,
                         num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True,
                         vocab_size=151936, max_shard_size="500MB"),
    "small": dict(architecture="llama", num_layers=8, hidden_size=512, intermediate_size=1408,
                  num_attention_heads=8, num_key_value_heads=4, max_shard_size="50MB"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="a model folder / hub id / 'demo' (default: the --preset random model)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="qwen2.5-0.5b",
                        help="random-weight model built once into the cache when --model is not given")
    parser.add_argument("--engines", default="1,2,3", help="engine counts to measure, e.g. 1,2,3")
    parser.add_argument("--max-cores", type=int, default=None, help="torch threads per engine (default: all)")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--json-out", default=None, help="also write the results as JSON to this file")


def bench_model_dir(preset: str):
    """The preset's random-weight model folder, built on first use (cached)."""
    from .demo import build_random_model, cache_dir

    target = cache_dir() / "models" / f"bench-{preset}-v1"
    return build_random_model(target, seed=0, **PRESETS[preset])


def prompt_ids(tokenizer, count: int) -> list[int]:
    text = "A cluster of ordinary office computers can run a language model that none could hold alone. "
    ids = tokenizer(text * (count // 8 + 2), add_special_tokens=False)["input_ids"]
    return list(ids[:count])


def single_process(model_dir, ids: list[int], new_tokens: int, dtype: str) -> dict:
    """Decode tokens/s and TTFT of `model.generate` in this process (all cores)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=getattr(torch, dtype))
    model.eval()
    inputs = torch.tensor([ids])
    kwargs = dict(do_sample=False, attention_mask=torch.ones_like(inputs), eos_token_id=None, pad_token_id=0)

    def run(n: int):
        started = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(inputs, max_new_tokens=n, min_new_tokens=n, **kwargs)
        return time.perf_counter() - started, out[0, len(ids):].tolist()

    run(2)  # warm-up
    ttft, _ = run(1)
    total, tokens = run(new_tokens)
    del model
    gc.collect()
    return {"ttft_s": ttft, "decode_tokens_per_s": (new_tokens - 1) / (total - ttft), "tokens": tokens}


def cluster_run(model: str, engines: int, ids: list[int], new_tokens: int, dtype: str,
                max_cores: int | None) -> dict:
    from . import engine as engine_side
    from .cluster import Cluster

    with Cluster.local(engines=engines, max_cores=max_cores) as cluster:
        bare = cluster._call_all(engine_side.bare_runtime_rss)
        plan = cluster.load(model, dtype=dtype, min_stages=engines, progress=False)
        cluster.generate(ids, max_new_tokens=2, ignore_eos=True)  # warm-up
        result = cluster.generate(ids, max_new_tokens=new_tokens, ignore_eos=True)
        rows = []
        for info, stage in zip(cluster._pipeline.engines, plan.stages):
            status = cluster._call(info.engine_id, engine_side.worker_status)
            rows.append({"engine": info.engine_id, "layers": [stage.start_layer, stage.stop_layer],
                         "shard_bytes": status["parameter_bytes"], "bare_rss_bytes": bare[info.engine_id],
                         "peak_rss_bytes": status["peak_rss_bytes"]})
    tokens = result.token_ids
    decode_s = result.total_time_s - result.time_to_first_token_s
    return {"engines": engines, "stages": len(plan.stages), "ttft_s": result.time_to_first_token_s,
            "decode_tokens_per_s": (len(result.token_ids) - 1) / decode_s, "tokens": tokens, "memory": rows}


def run(args) -> int:
    from transformers import AutoTokenizer

    from .dataplane import measure_hop_overhead
    from .models import resolve_model

    logging.getLogger("exo_lab").setLevel(logging.WARNING)
    counts = [int(x) for x in str(args.engines).split(",") if x.strip()]
    model_dir = resolve_model(args.model) if args.model else bench_model_dir(args.preset)
    model = args.model or str(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    ids = prompt_ids(tokenizer, args.prompt_tokens)
    print(f"model {model_dir} ({args.dtype}), prompt {len(ids)} tokens, {args.new_tokens} new tokens, greedy",
          flush=True)
    single = single_process(model_dir, ids, args.new_tokens, args.dtype)
    clusters = [cluster_run(model, n, ids, args.new_tokens, args.dtype, args.max_cores) for n in counts]
    hop = measure_hop_overhead()
    report = {"model": str(model_dir), "dtype": args.dtype, "prompt_tokens": len(ids),
              "new_tokens": args.new_tokens, "single_process": single, "clusters": clusters, "hop": hop}
    print(format_report(report))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(report, f, indent=2)
    return 0


def format_report(report: dict) -> str:
    from .config import format_bytes

    single = report["single_process"]
    lines = [f"{'run':<22} {'TTFT ms':>9} {'decode tok/s':>13} {'ratio':>7} {'same tokens':>12}",
             f"{'single process':<22} {single['ttft_s'] * 1e3:>9.1f} {single['decode_tokens_per_s']:>13.2f} "
             f"{1.0:>7.2f} {'-':>12}"]
    for c in report["clusters"]:
        ratio = c["decode_tokens_per_s"] / single["decode_tokens_per_s"]
        same = "yes" if c["tokens"] == single["tokens"] else "NO"
        lines.append(f"{'cluster, ' + str(c['stages']) + ' engine(s)':<22} {c['ttft_s'] * 1e3:>9.1f} "
                     f"{c['decode_tokens_per_s']:>13.2f} {ratio:>7.2f} {same:>12}")
    hop = report["hop"]
    lines += ["", f"data plane per hop (loopback, {hop.get('payload_bytes', 3584)} B): "
                  f"median {hop['hop_median_ms']:.3f} ms, p90 {hop['hop_p90_ms']:.3f} ms "
                  f"(bare zmq {hop['pair_median_ms']:.3f} ms)", "",
              f"{'engines':<8} {'engine':>6} {'layers':>10} {'shard':>10} {'bare RSS':>10} {'peak RSS':>10} "
              f"{'limit':>10} {'ok':>4}"]
    for c in report["clusters"]:
        for m in c["memory"]:
            limit = m["shard_bytes"] * 1.1 + m["bare_rss_bytes"]
            lines.append(f"{c['stages']:<8} {m['engine']:>6} {str(m['layers']):>10} {format_bytes(m['shard_bytes']):>10} "
                         f"{format_bytes(m['bare_rss_bytes']):>10} {format_bytes(m['peak_rss_bytes']):>10} "
                         f"{format_bytes(int(limit)):>10} {'yes' if m['peak_rss_bytes'] <= limit else 'NO':>4}")
    return "\n".join(lines)
