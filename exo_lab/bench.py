"""`exo-lab bench`: the cluster against single-process transformers `generate`, in one run.

For each engine count and each concurrency c, the single process runs ``model.generate`` on a
batch of c prompts and the cluster serves the same c prompts as c concurrent requests
(continuous batching), greedy, in alternating rounds (this machine is shared and noisy: both
see the same noise). The table reports medians of aggregate tokens/s (c x new tokens / wall
time), the median per-round ratio cluster / single process, whether every request's tokens
equal the single process's row, at c = 1 the time to first token, the data plane's per-hop
overhead, and each engine's peak RSS against its shard, its KV slots and the bare engine's RSS.
Prints tables; --json-out writes JSON.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import threading
import time

from .bench_measure import SingleProcess, measure_cluster
from .settings_values import positive_int

logger = logging.getLogger(__name__)

PRESETS = {
    # A random-weight model with the shape of Qwen2.5-0.5B (494M parameters, tied embeddings).
    "qwen2.5-0.5b": dict(architecture="qwen2", num_layers=24, hidden_size=896, intermediate_size=4864,
                         num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True,
                         vocab_size=151936, max_shard_size="500MB"),
    "small": dict(architecture="llama", num_layers=8, hidden_size=512, intermediate_size=1408,
                  num_attention_heads=8, num_key_value_heads=4, max_shard_size="50MB"),
}
MEMORY_SLACK = 1.1      # peak RSS may exceed (shard + KV slots) by 10% over the bare engine


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="a model folder / hub id / 'demo' / 'smollm2' (default: the --preset random model)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="qwen2.5-0.5b",
                        help="random-weight model built once into the cache when --model is not given")
    parser.add_argument("--engines", type=_counts, default="1,2,3", help="engine counts to measure, e.g. 1,2,3")
    parser.add_argument("--concurrency", type=_counts, default="1",
                        help="concurrent requests to measure, e.g. 1,4,8 (transformers gets the same batch)")
    parser.add_argument("--max-cores", type=positive_int, default=None, help="torch threads per engine (default: all)")
    parser.add_argument("--micro-batches", type=positive_int, default=None,
                        help="steps in flight at once (default: one per stage)")
    parser.add_argument("--prompt-tokens", type=positive_int, default=32)
    parser.add_argument("--new-tokens", type=positive_int, default=32)
    parser.add_argument("--dtype", type=_dtypes, default=None,
                        help="stage dtype(s), e.g. int8 or float32,bfloat16,int8 (several: with --compare; "
                             "default: the model's auto dtype, gguf for a GGUF model such as smollm2)")
    parser.add_argument("--compare", action="store_true",
                        help="one stream per --dtype and --engines against transformers and llama.cpp "
                             "(pip install 'exo-lab[bench]'), with greedy agreement and perplexity")
    parser.add_argument("--quality-tokens", type=positive_int, default=64,
                        help="--compare: greedy tokens compared with float32")
    parser.add_argument("--ppl-tokens", type=positive_int, default=256,
                        help="--compare: tokens of exo_lab/data/corpus.txt for perplexity")
    parser.add_argument("--rounds", type=positive_int, default=3, help="alternating single/cluster rounds")
    parser.add_argument("--json-out", default=None, help="also write the results as JSON to this file")


def _dtypes(text: str) -> list[str]:
    from .units import DTYPES

    names = [part.strip() for part in text.split(",") if part.strip()]
    bad = [name for name in names if name not in DTYPES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"{text!r}: use one or more of {', '.join(DTYPES)}")
    return names


def _counts(text: str) -> list[int]:
    return [positive_int(part) for part in str(text).split(",") if part.strip()] or [positive_int(text)]


def bench_model_dir(preset: str):
    """The preset's random-weight model folder, built on first use (cached)."""
    from .weights.demo import build_random_model, cache_dir

    target = cache_dir() / "models" / f"bench-{preset}-v1"
    return build_random_model(target, seed=0, **PRESETS[preset])


def prompt_batch(tokenizer, count: int, tokens: int) -> list[list[int]]:
    """``count`` different prompts of exactly ``tokens`` tokens each (no padding needed)."""
    text = "A cluster of ordinary office computers can run a language model that none could hold alone. "
    ids = tokenizer(text * (tokens // 8 + count + 2), add_special_tokens=False)["input_ids"]
    return [list(ids[i:i + tokens]) for i in range(count)]


def _median(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def engine_run(single: SingleProcess, model: str, engines: int, batches: dict, args) -> dict:
    """One local cluster of ``engines`` engines: every concurrency, alternating with the single
    process, then each stage's memory."""
    from .cluster import Cluster
    from .engine import probe as engine_probe

    with Cluster.local(engines=engines, max_cores=args.max_cores) as cluster:
        bare = cluster.control.call_all(engine_probe.bare_runtime_rss, model)
        plan = cluster.load(model, dtype=args.dtype, min_stages=engines, max_batch=max(batches),
                            micro_batches=args.micro_batches, progress=False)
        for prompts in batches.values():   # warm-up at every batch size (first-use costs of its shapes)
            measure_cluster(cluster, prompts, 2)
        rows = [concurrency_run(single, cluster, prompts, args) for prompts in batches.values()]
        memory = memory_rows(cluster, plan, bare)
    return {"engines": engines, "stages": len(plan.stages), "rows": rows, "memory": memory}


def concurrency_run(single: SingleProcess, cluster, prompts: list[list[int]], args) -> dict:
    pairs = [(single.measure(prompts, args.new_tokens), measure_cluster(cluster, prompts, args.new_tokens))
             for _ in range(args.rounds)]
    singles, clusters = [s for s, _ in pairs], [c for _, c in pairs]
    return {"concurrency": len(prompts), "rounds": args.rounds,
            "single_tokens_per_s": _median(singles, "tokens_per_s"),
            "tokens_per_s": _median(clusters, "tokens_per_s"),
            "ratio": statistics.median(c["tokens_per_s"] / s["tokens_per_s"] for s, c in pairs),
            "single_ttft_s": _median(singles, "ttft_s"), "ttft_s": _median(clusters, "ttft_s"),
            "single_decode_tokens_per_s": _median(singles, "decode_tokens_per_s"),
            "decode_tokens_per_s": _median(clusters, "decode_tokens_per_s"),
            "same_tokens": all(c["tokens"] == s["tokens"] for s, c in pairs)}


def memory_rows(cluster, plan, bare: dict) -> list[dict]:
    from .engine import worker as engine_worker

    rows = []
    for info, stage in zip(cluster.pipeline.engines, plan.stages):
        status = cluster.control.call(info.engine_id, engine_worker.worker_status)
        rows.append({"engine": info.engine_id, "layers": [stage.start_layer, stage.stop_layer],
                     "shard_bytes": status.stage.parameter_bytes, "kv_bytes": status.stage.kv_cache_bytes,
                     "bare_rss_bytes": bare[info.engine_id], "peak_rss_bytes": status.peak_rss_bytes})
    return rows


def run(args) -> int:
    from transformers import AutoTokenizer

    from .weights.resolve import auto_dtype, resolve_model

    logging.getLogger("exo_lab").setLevel(logging.WARNING)
    model_dir = resolve_model(args.model) if args.model else bench_model_dir(args.preset)
    model = args.model or str(model_dir)
    if args.dtype is None:
        args.dtype = [auto_dtype(model)]
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    if args.compare:
        return run_compare(args, model, model_dir, tokenizer)
    if len(args.dtype) > 1:
        raise SystemExit("several --dtype values need --compare")
    args.dtype = args.dtype[0]
    batches = {c: prompt_batch(tokenizer, c, args.prompt_tokens) for c in args.concurrency}
    print(f"model {model_dir} ({args.dtype}), prompts of {args.prompt_tokens} tokens, {args.new_tokens} new "
          f"tokens each, greedy, {args.rounds} alternating rounds", flush=True)
    single = SingleProcess(model_dir, args.dtype)
    for prompts in batches.values():
        single.measure(prompts, 2)
    try:
        clusters = [engine_run(single, model, n, batches, args) for n in args.engines]
    finally:
        single.close()
    report = {"model": str(model_dir), "dtype": args.dtype, "prompt_tokens": args.prompt_tokens,
              "new_tokens": args.new_tokens, "clusters": clusters, "hop": measure_hop_overhead()}
    print(format_report(report))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(report, f, indent=2)
    return 0


def run_compare(args, model: str, model_dir, tokenizer) -> int:
    from .bench_speed import format_compare
    from .bench_speed import run_compare as compare

    print(f"model {model_dir}: one stream, prompt of {args.prompt_tokens} tokens, {args.new_tokens} new tokens, "
          f"dtypes {', '.join(args.dtype)}, engines {args.engines}, {args.rounds} rounds", flush=True)
    report = compare(args, model, model_dir, tokenizer, prompt_batch(tokenizer, 1, args.prompt_tokens)[0])
    print(format_compare(report))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(report, f, indent=2)
    return 0


def format_report(report: dict) -> str:
    from .units import format_bytes

    lines = ["aggregate tokens/s (c requests x new tokens / wall time), medians of alternating rounds; ratio = "
             "median of per-round cluster / transformers generate at the same batch",
             f"{'engines':<8} {'c':>3} {'transformers':>13} {'exo-lab':>9} {'ratio':>6} {'TTFT ms':>16} "
             f"{'decode tok/s':>16} {'same tokens':>12}"]
    for c in report["clusters"]:
        for r in c["rows"]:
            ttft = f"{r['single_ttft_s'] * 1e3:.0f} / {r['ttft_s'] * 1e3:.0f}"
            decode = f"{r['single_decode_tokens_per_s']:.1f} / {r['decode_tokens_per_s']:.1f}"
            lines.append(f"{c['stages']:<8} {r['concurrency']:>3} {r['single_tokens_per_s']:>13.2f} "
                         f"{r['tokens_per_s']:>9.2f} {r['ratio']:>6.2f} {ttft:>16} {decode:>16} "
                         f"{'yes' if r['same_tokens'] else 'NO':>12}")
    lines.append("(TTFT and decode tok/s per stream: transformers / exo-lab)")
    hop = report["hop"]
    lines += ["", f"data plane per hop (loopback, {hop['payload_bytes']} B): median {hop['hop_median_ms']:.3f} ms, "
                  f"p90 {hop['hop_p90_ms']:.3f} ms (bare zmq {hop['pair_median_ms']:.3f} ms)"
                  + (f"; authenticated {hop['auth_hop_median_ms']:.3f} ms (+{hop['auth_added_ms']:.3f} ms)"
                     if "auth_hop_median_ms" in hop else ""), "",
              f"{'engines':<8} {'engine':>6} {'layers':>10} {'shard':>10} {'KV slots':>10} {'bare RSS':>10} "
              f"{'peak RSS':>10} {'limit':>10} {'ok':>4}   (limit = (shard + KV slots) x {MEMORY_SLACK} + bare RSS)"]
    for c in report["clusters"]:
        for m in c["memory"]:
            limit = (m["shard_bytes"] + m["kv_bytes"]) * MEMORY_SLACK + m["bare_rss_bytes"]
            layers = "[%d, %d)" % tuple(m["layers"])
            lines.append(f"{c['stages']:<8} {m['engine']:>6} {layers:>10} {format_bytes(m['shard_bytes']):>10} "
                         f"{format_bytes(m['kv_bytes']):>10} {format_bytes(m['bare_rss_bytes']):>10} "
                         f"{format_bytes(m['peak_rss_bytes']):>10} {format_bytes(int(limit)):>10} "
                         f"{'yes' if m['peak_rss_bytes'] <= limit else 'NO':>4}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- data-plane hop

def measure_hop_overhead(n: int = 2000, payload_bytes: int = 3584, *,
                         warmup: int = 100) -> dict:
    """One-way time of a data-plane hop on loopback, in ms (ping-pong round trip / 2 between
    two threads, encode and decode included), unauthenticated ("hop") and as exo-lab runs it,
    CurveZMQ-authenticated with a cluster key ("auth_hop"), next to a bare zmq PAIR baseline
    that sends the same bytes. Returns ``{"n", "payload_bytes", "hop_median_ms", "hop_p90_ms",
    "auth_hop_median_ms", "auth_hop_p90_ms", "auth_added_ms", "pair_median_ms",
    "pair_p90_ms"}``. Targets: a hop median <= 0.3 ms; authentication adds < 0.05 ms."""
    if n < 1 or payload_bytes < 0:
        raise ValueError(f"need n >= 1 and payload_bytes >= 0, got n={n}, "
                         f"payload_bytes={payload_bytes}")
    import zmq

    from .security import derive_key, new_secret

    key = derive_key(new_secret().encode(), "data-plane")
    context = zmq.Context()
    try:
        hop = _ping_pong_ms(*_dataplane_pair(context, payload_bytes), n, warmup)
        auth_hop = _ping_pong_ms(*_dataplane_pair(context, payload_bytes, key), n, warmup)
        pair = _ping_pong_ms(*_zmq_pair(context, payload_bytes), n, warmup)
    finally:
        context.term()
    return {"n": n, "payload_bytes": payload_bytes,
            "hop_median_ms": statistics.median(hop), "hop_p90_ms": _p90(hop),
            "auth_hop_median_ms": statistics.median(auth_hop), "auth_hop_p90_ms": _p90(auth_hop),
            "auth_added_ms": statistics.median(auth_hop) - statistics.median(hop),
            "pair_median_ms": statistics.median(pair), "pair_p90_ms": _p90(pair)}


def _p90(samples: list[float]) -> float:
    return sorted(samples)[min(len(samples) - 1, int(0.9 * len(samples)))]


def _payload_tensor(payload_bytes: int) -> torch.Tensor:
    import torch

    return torch.randn(1, 1, max(payload_bytes // 4, 1))


def _dataplane_pair(context, payload_bytes: int, key: bytes | None = None):
    from .errors import ClusterError
    from .sampling import SamplingSettings
    from .wire import Forward, Inbox, Outbox, Row, Shutdown

    GREEDY = SamplingSettings()
    """(ping, echo): ping(i) sends and waits for the reply; echo() answers until SHUTDOWN."""
    tensor = _payload_tensor(payload_bytes)
    near, far = Inbox(context, key=key), Inbox(context, key=key)
    to_far, to_near = Outbox(context, far.address, key=key), Outbox(context, near.address, key=key)

    def ping(i: int) -> None:
        to_far.send(Forward(i, (Row(0, i % 1000, GREEDY),), tensor))
        if near.recv(timeout_ms=5000) is None:
            raise ClusterError("hop measurement: no echo within 5000 ms")

    def echo() -> None:
        while (msg := far.recv(timeout_ms=5000)) is not None and not isinstance(msg, Shutdown):
            to_near.send(Forward(msg.step_id, msg.rows, msg.tensor))

    def stop() -> None:
        to_far.send(Shutdown())

    def close() -> None:
        for sock in (near, far, to_far, to_near):
            sock.close()

    return ping, echo, stop, close


def _zmq_pair(context, payload_bytes: int):
    import zmq

    payload = bytes(payload_bytes)
    near, far = context.socket(zmq.PAIR), context.socket(zmq.PAIR)
    far.connect(f"tcp://127.0.0.1:{near.bind_to_random_port('tcp://127.0.0.1')}")
    near.rcvtimeo = far.rcvtimeo = 5000

    def ping(i: int) -> None:
        near.send(payload)
        near.recv()

    def echo() -> None:
        while (data := far.recv()) != b"stop":
            far.send(data)

    def stop() -> None:
        near.send(b"stop")

    def close() -> None:
        near.close(linger=0)
        far.close(linger=0)

    return ping, echo, stop, close


def _ping_pong_ms(ping, echo, stop, close, n: int, warmup: int) -> list[float]:
    thread = threading.Thread(target=echo, name="exo-lab-hop-echo", daemon=True)
    thread.start()
    try:
        for i in range(warmup):
            ping(i)
        samples = []
        for i in range(n):
            start_ns = time.perf_counter_ns()
            ping(i)
            samples.append((time.perf_counter_ns() - start_ns) / 2e6)   # one way, ms
    finally:
        try:
            stop()
        finally:
            thread.join(timeout=10)   # the echo's recv timeout ends it even if stop() failed
            close()
    return samples
