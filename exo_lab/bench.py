"""`exo-lab bench`: single-process `model.generate` against the cluster on 1..N engines, in one run.

Same model, same prompt, greedy. The single process and the cluster run in alternating rounds
(this machine is shared and noisy: both see the same noise), and the table reports medians and
the median per-round ratio cluster / single process, whether the cluster's tokens equal the
single process's, the data plane's per-hop overhead, and each engine's peak RSS against its
shard bytes and the bare engine's RSS. Prints a table; --json-out writes JSON.
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import statistics
import threading
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
    parser.add_argument("--rounds", type=int, default=3, help="alternating single/cluster rounds per engine count")
    parser.add_argument("--json-out", default=None, help="also write the results as JSON to this file")


def bench_model_dir(preset: str):
    """The preset's random-weight model folder, built on first use (cached)."""
    from .model.demo import build_random_model, cache_dir

    target = cache_dir() / "models" / f"bench-{preset}-v1"
    return build_random_model(target, seed=0, **PRESETS[preset])


def prompt_ids(tokenizer, count: int) -> list[int]:
    text = "A cluster of ordinary office computers can run a language model that none could hold alone. "
    ids = tokenizer(text * (count // 8 + 2), add_special_tokens=False)["input_ids"]
    return list(ids[:count])


class SingleProcess:
    """The baseline: the whole model in this process, `model.generate`, all cores."""

    def __init__(self, model_dir, ids: list[int], dtype: str):
        import torch
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=getattr(torch, dtype)).eval()
        self.inputs = torch.tensor([ids])
        self.kwargs = dict(do_sample=False, attention_mask=torch.ones_like(self.inputs), eos_token_id=None,
                           pad_token_id=0)
        self.measure(2)  # warm-up: page in the weights

    def measure(self, new_tokens: int) -> dict:
        """TTFT and decode tokens/s from the time each token reaches generate's streamer hook."""
        import torch

        times = _TokenClock()
        started = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(self.inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                      streamer=times, **self.kwargs)
        stamps = times.stamps[1:]   # the first put() is the prompt itself
        decode_s = stamps[-1] - stamps[0]
        return {"ttft_s": stamps[0] - started,
                "decode_tokens_per_s": (len(stamps) - 1) / decode_s if decode_s > 0 else 0.0,
                "tokens": out[0, self.inputs.shape[1]:].tolist()}

    def close(self) -> None:
        del self.model
        gc.collect()


class _TokenClock:
    """A generate() streamer that only notes when each token arrives."""

    def __init__(self):
        self.stamps: list[float] = []

    def put(self, value) -> None:
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass


def measure_cluster(cluster, ids: list[int], new_tokens: int) -> dict:
    result = cluster.generate(ids, max_new_tokens=new_tokens, ignore_eos=True)
    decode_s = result.total_time_s - result.time_to_first_token_s
    return {"ttft_s": result.time_to_first_token_s,
            "decode_tokens_per_s": (len(result.token_ids) - 1) / max(decode_s, 1e-9), "tokens": result.token_ids}


def _median(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def cluster_run(single: SingleProcess, model: str, engines: int, ids: list[int], new_tokens: int,
                dtype: str, max_cores: int | None, rounds: int) -> dict:
    """Alternate single-process and cluster runs (noise on a shared machine hits both alike) and
    report medians and the median of the per-round ratios."""
    from .cluster import Cluster
    from .engine import probe as engine_probe
    from .engine import worker as engine_worker

    with Cluster.local(engines=engines, max_cores=max_cores) as cluster:
        bare = cluster.control.call_all(engine_probe.bare_runtime_rss)
        plan = cluster.load(model, dtype=dtype, min_stages=engines, progress=False)
        measure_cluster(cluster, ids, 2)  # warm-up: page in the weights
        pairs = [(single.measure(new_tokens), measure_cluster(cluster, ids, new_tokens)) for _ in range(rounds)]
        rows = []
        for info, stage in zip(cluster.pipeline.engines, plan.stages):
            status = cluster.control.call(info.engine_id, engine_worker.worker_status)
            rows.append({"engine": info.engine_id, "layers": [stage.start_layer, stage.stop_layer],
                         "shard_bytes": status["parameter_bytes"], "bare_rss_bytes": bare[info.engine_id],
                         "peak_rss_bytes": status["peak_rss_bytes"]})
    singles = [s for s, _ in pairs]
    clusters = [c for _, c in pairs]
    ratios = [c["decode_tokens_per_s"] / s["decode_tokens_per_s"] for s, c in pairs]
    return {"engines": engines, "stages": len(plan.stages), "rounds": rounds,
            "single_decode_tokens_per_s": _median(singles, "decode_tokens_per_s"),
            "single_ttft_s": _median(singles, "ttft_s"),
            "decode_tokens_per_s": _median(clusters, "decode_tokens_per_s"), "ttft_s": _median(clusters, "ttft_s"),
            "ratio": statistics.median(ratios),
            "same_tokens": all(c["tokens"] == s["tokens"] for s, c in pairs), "memory": rows}


def run(args) -> int:
    from transformers import AutoTokenizer

    from .model.resolve import resolve_model

    logging.getLogger("exo_lab").setLevel(logging.WARNING)
    counts = [int(x) for x in str(args.engines).split(",") if x.strip()]
    model_dir = resolve_model(args.model) if args.model else bench_model_dir(args.preset)
    model = args.model or str(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    ids = prompt_ids(tokenizer, args.prompt_tokens)
    print(f"model {model_dir} ({args.dtype}), prompt {len(ids)} tokens, {args.new_tokens} new tokens, greedy, "
          f"{args.rounds} alternating rounds", flush=True)
    single = SingleProcess(model_dir, ids, args.dtype)
    try:
        clusters = [cluster_run(single, model, n, ids, args.new_tokens, args.dtype, args.max_cores, args.rounds)
                    for n in counts]
    finally:
        single.close()
    hop = measure_hop_overhead()
    report = {"model": str(model_dir), "dtype": args.dtype, "prompt_tokens": len(ids),
              "new_tokens": args.new_tokens, "clusters": clusters, "hop": hop}
    print(format_report(report))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(report, f, indent=2)
    return 0


def format_report(report: dict) -> str:
    from .units import format_bytes

    lines = ["decode tokens/s and time to first token, medians of alternating rounds (ratio = median of "
             "per-round cluster/single)",
             f"{'engines':<8} {'single tok/s':>13} {'cluster tok/s':>14} {'ratio':>6} {'single TTFT ms':>15} "
             f"{'cluster TTFT ms':>16} {'same tokens':>12}"]
    for c in report["clusters"]:
        lines.append(f"{c['stages']:<8} {c['single_decode_tokens_per_s']:>13.2f} {c['decode_tokens_per_s']:>14.2f} "
                     f"{c['ratio']:>6.2f} {c['single_ttft_s'] * 1e3:>15.1f} {c['ttft_s'] * 1e3:>16.1f} "
                     f"{'yes' if c['same_tokens'] else 'NO':>12}")
    hop = report["hop"]
    lines += ["", f"data plane per hop (loopback, {hop['payload_bytes']} B): median {hop['hop_median_ms']:.3f} ms, "
                  f"p90 {hop['hop_p90_ms']:.3f} ms (bare zmq {hop['pair_median_ms']:.3f} ms)", "",
              f"{'engines':<8} {'engine':>6} {'layers':>10} {'shard':>10} {'bare RSS':>10} {'peak RSS':>10} "
              f"{'limit':>10} {'ok':>4}   (limit = shard x 1.1 + bare RSS)"]
    for c in report["clusters"]:
        for m in c["memory"]:
            limit = m["shard_bytes"] * 1.1 + m["bare_rss_bytes"]
            layers = "[%d, %d)" % tuple(m["layers"])
            lines.append(f"{c['stages']:<8} {m['engine']:>6} {layers:>10} {format_bytes(m['shard_bytes']):>10} "
                         f"{format_bytes(m['bare_rss_bytes']):>10} {format_bytes(m['peak_rss_bytes']):>10} "
                         f"{format_bytes(int(limit)):>10} {'yes' if m['peak_rss_bytes'] <= limit else 'NO':>4}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- data-plane hop


def measure_hop_overhead(n: int = 2000, payload_bytes: int = 3584, *,
                         warmup: int = 100) -> dict:
    """One-way time of a data-plane hop on loopback, in ms (ping-pong round trip / 2 between
    two threads, encode and decode included), next to a bare zmq PAIR baseline that sends the
    same bytes. Returns ``{"n", "payload_bytes", "hop_median_ms", "hop_p90_ms",
    "pair_median_ms", "pair_p90_ms"}``. The project target is a hop median <= 0.3 ms."""
    if n < 1 or payload_bytes < 0:
        raise ValueError(f"need n >= 1 and payload_bytes >= 0, got n={n}, "
                         f"payload_bytes={payload_bytes}")
    import zmq

    context = zmq.Context()
    try:
        hop = _ping_pong_ms(*_dataplane_pair(context, payload_bytes), n, warmup)
        pair = _ping_pong_ms(*_zmq_pair(context, payload_bytes), n, warmup)
    finally:
        context.term()
    return {"n": n, "payload_bytes": payload_bytes,
            "hop_median_ms": statistics.median(hop), "hop_p90_ms": _p90(hop),
            "pair_median_ms": statistics.median(pair), "pair_p90_ms": _p90(pair)}


def _p90(samples: list[float]) -> float:
    return sorted(samples)[min(len(samples) - 1, int(0.9 * len(samples)))]


def _payload_tensor(payload_bytes: int) -> torch.Tensor:
    import torch

    return torch.randn(1, 1, max(payload_bytes // 4, 1))


def _dataplane_pair(context, payload_bytes: int):
    from .errors import ClusterError
    from .sampling import SamplingSettings
    from .wire import Forward, Inbox, Outbox, Shutdown

    GREEDY = SamplingSettings()
    """(ping, echo): ping(i) sends and waits for the reply; echo() answers until SHUTDOWN."""
    tensor = _payload_tensor(payload_bytes)
    near, far = Inbox(context), Inbox(context)
    to_far, to_near = Outbox(context, far.address), Outbox(context, near.address)

    def ping(i: int) -> None:
        to_far.send(Forward(i, i, tensor, GREEDY))
        if near.recv(timeout_ms=5000) is None:
            raise ClusterError("hop measurement: no echo within 5000 ms")

    def echo() -> None:
        while (msg := far.recv(timeout_ms=5000)) is not None and not isinstance(msg, Shutdown):
            to_near.send(Forward(msg.request_id, msg.position, msg.tensor, msg.sampling))

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
