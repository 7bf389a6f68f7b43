"""Hard memory limits: a model larger than any PC, and a soak while one PC's memory shrinks.

Three compute PCs (netlab namespaces behind the README's firewall rules, each a cgroup v1 memory
group whose limit is its config ``max_memory``) and a coordinator/storage PC. Needs root, like
the netlab tests. Two parts, each printing a table:

``larger``: a random float32 model ``--ratio`` (default 2.5) times larger than one PC's limit
    loads across the three PCs and answers; the answer is compared with transformers' own greedy
    tokens on the whole model (computed first, in this process, before the PCs start). Per PC:
    its layers, what the planner reserved, what the kernel charged at peak, its limit, OOM kills.

``soak``: ``--soak-s`` seconds (600 for the issue's figure) of ``--streams`` concurrent requests
    whose prompts grow from a few tokens to most of the context and start again; at a third of
    the time system-c's limit drops to what it holds plus ``--shrunk-mib`` (its owner opened a
    big program), at two thirds it is raised back. Every answer is compared with the same
    prompt's answer from an undisturbed warm-up pass. Reports requests done, lost (an error or a
    different answer), OOM kills, each PC's peak charge against its limit, the memory watch's
    changes (from the coordinator's log) and tokens/s in each third.

    python benchmarks/bench_memory_limits.py larger [--limit-gb 5.8]
    python benchmarks/bench_memory_limits.py soak [--soak-s 600]
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import shutil
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]     # runnable before pip install; the netlab helpers

import netlab  # noqa: E402
from limited_lab import charged, limited_cluster  # noqa: E402
from tables import table  # noqa: E402  (benchmarks/tables.py)

COMPUTE = ("system-b", "system-c", "system-d")
GB = 10**9


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=60) as response:
        return json.load(response)


def greedy_reference(model: Path, prompt: str, tokens: int) -> str:
    """transformers' greedy continuation on the whole model, in this process (then freed)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model))
    network = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32).eval()
    inputs = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    with torch.inference_mode():
        out = network.generate(inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=tokens, do_sample=False)
    text = tokenizer.decode(out[0, inputs.shape[1]:], skip_special_tokens=True)
    del network
    return text


class PeakCharge:
    """Each PC's charge (resident anonymous memory plus mapped file pages) sampled every 0.5 s."""

    def __init__(self, net):
        self.net, self.peak = net, {name: 0 for name in COMPUTE}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(0.5):
            for name in COMPUTE:
                try:
                    self.peak[name] = max(self.peak[name], charged(self.net, name))
                except OSError:
                    pass

    def stop(self):
        self._stop.set()
        self._thread.join()


def larger(args) -> None:
    from exo_lab.weights.demo import build_random_model

    limit = int(args.limit_gb * GB)
    work = Path(tempfile.mkdtemp(prefix="exo-larger-", dir=args.work))
    try:
        # q and o (hidden^2 each), k and v (4 of 16 heads: hidden^2 / 4 each), the MLP (3 x 4 hidden^2)
        layer_bytes = 4 * int(14.5 * args.hidden ** 2)
        layers = args.layers or -(-int(args.ratio * limit) // layer_bytes)
        started = time.monotonic()
        model = build_random_model(work / "model", num_layers=layers, hidden_size=args.hidden,
                                   intermediate_size=4 * args.hidden, num_attention_heads=16, num_key_value_heads=4,
                                   max_shard_size="500MB")
        weights = sum(p.stat().st_size for p in model.glob("*.safetensors"))
        print(f"model: {layers} layers, hidden {args.hidden}, {weights / GB:.2f} GB of float32 weights = "
              f"{weights / limit:.2f} x one PC's {limit / GB:.2f} GB limit (built in {time.monotonic() - started:.0f} s)")
        started = time.monotonic()
        reference = greedy_reference(model, args.prompt, args.tokens)
        print(f"transformers' greedy answer on the whole model: {reference!r} ({time.monotonic() - started:.0f} s)")
        with limited_cluster(work, model, limit=limit, compute=COMPUTE, max_context=256, max_batch=1,
                             timeout_s=1800) as lab:
            peaks = PeakCharge(lab.net)
            started = time.monotonic()
            answer = lab.client.completions.create(model=str(model), prompt=args.prompt, max_tokens=args.tokens,
                                                   temperature=0).choices[0].text
            elapsed = time.monotonic() - started
            peaks.stop()
            status = get_json(lab.api + "/v1/cluster/status")
            rows = []
            for stage in status["plan"]["stages"]:
                pc = stage["node"].split(".")[0]
                memory = lab.net.memory(pc)
                rows.append({"PC": pc, "layers": f"{stage['start_layer']}-{stage['stop_layer'] - 1}",
                             "weights GB": f"{stage['weights_bytes'] / GB:.2f}",
                             "planned GB": f"{stage['total_bytes'] / GB:.2f}",
                             "peak charged GB": f"{peaks.peak[pc] / GB:.2f}",
                             "peak usage GB (cache incl.)": f"{memory['peak'] / GB:.2f}",
                             "limit GB": f"{memory['limit'] / GB:.2f}", "OOM kills": memory["oom_kills"]})
        print(table(rows))
        print(f"answer {answer!r} in {elapsed:.1f} s; equals transformers: {answer == reference}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


SOAK_MODEL = dict(num_layers=28, hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
                  num_key_value_heads=4, max_shard_size="100MB")


def soak(args) -> None:
    from exo_lab.weights.demo import build_random_model

    limit = int(args.limit_gb * GB)
    work = Path(tempfile.mkdtemp(prefix="exo-soak-", dir=args.work))
    try:
        from transformers import AutoTokenizer

        model = build_random_model(work / "model", **SOAK_MODEL)
        tokenizer = AutoTokenizer.from_pretrained(str(model))
        text = " ".join(f"office{(j * 7) % 97} pc{j % 13} memory" for j in range(2000))
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        lengths = [int(16 * (1500 / 16) ** (i / (args.prompts - 1))) for i in range(args.prompts)]  # 16 .. 1500 tokens
        prompts = [tokenizer.decode(ids[i:i + n]) for i, n in enumerate(lengths)]
        with limited_cluster(work, model, limit=limit, compute=COMPUTE, max_context=2048, max_batch=4,
                             objective="throughput") as lab:
            def ask(prompt: str) -> str:
                return lab.client.completions.create(model=str(model), prompt=prompt, max_tokens=args.tokens,
                                                     temperature=0).choices[0].text

            reference = [ask(p) for p in prompts]        # undisturbed, one at a time
            print(f"warm-up: {len(prompts)} prompts of {lengths[0]}-{lengths[-1]} tokens answered")
            peaks = PeakCharge(lab.net)
            results: list[tuple[float, int, str | None, int]] = []    # (time, prompt, answer or None, tokens)
            start = time.monotonic()
            end = start + args.soak_s
            counter = iter(range(10**9))

            def stream() -> None:
                while time.monotonic() < end:
                    index = next(counter) % len(prompts)
                    try:
                        response = lab.client.completions.create(model=str(model), prompt=prompts[index],
                                                                 max_tokens=args.tokens, temperature=0)
                        results.append((time.monotonic(), index, response.choices[0].text,
                                        response.usage.completion_tokens))
                    except Exception as exc:          # counted as lost
                        results.append((time.monotonic(), index, None, 0))
                        print(f"  request failed: {exc}", flush=True)

            events = []
            with concurrent.futures.ThreadPoolExecutor(args.streams) as pool:
                futures = [pool.submit(stream) for _ in range(args.streams)]
                time.sleep(args.soak_s / 3)
                lowered = lab.net.leave_free("system-c", args.shrunk_mib * 2**20)
                events.append((time.monotonic() - start, f"system-c limit lowered to {lowered / GB:.3f} GB"))
                time.sleep(args.soak_s / 3)
                (lab.net._cgroups["system-c"] / "memory.limit_in_bytes").write_text(str(limit))
                events.append((time.monotonic() - start, f"system-c limit raised back to {limit / GB:.3f} GB"))
                for future in futures:
                    future.result()
            peaks.stop()
            status = get_json(lab.api + "/v1/cluster/status")
            memory = {name: lab.net.memory(name) for name in COMPUTE}
            log = "".join(lab.server_output)
        watch = [line.strip() for line in log.splitlines()
                 if "short of memory" in line or "memory is back" in line or "more memory is free" in line]
        lost = sum(answer is None or answer != reference[i] for _, i, answer, _ in results)
        thirds = []
        for k in range(3):
            lo, hi = start + k * args.soak_s / 3, start + (k + 1) * args.soak_s / 3
            tokens = sum(n for t, _, a, n in results if lo <= t < hi and a is not None)
            thirds.append(f"{tokens / (args.soak_s / 3):.2f}")
        print(table([{"PC": pc, "limit GB (end)": f"{memory[pc]['limit'] / GB:.3f}",
                      "peak charged GB": f"{peaks.peak[pc] / GB:.3f}",
                      "peak usage GB (cache incl.)": f"{memory[pc]['peak'] / GB:.3f}",
                      "OOM kills": memory[pc]["oom_kills"]} for pc in COMPUTE]))
        print(f"requests done {len(results)}, lost {lost} (failed {sum(a is None for _, _, a, _ in results)}, "
              f"different from undisturbed {sum(a is not None and a != reference[i] for _, i, a, _ in results)})")
        print(f"tokens/s by third (before / lowered / raised back): {' / '.join(thirds)}")
        print(f"memory watch at the end: {status.get('memory') or 'as planned'}; KV slots "
              f"{status['metrics']['kv_slots']}, steps refused {status['metrics']['refused_steps_total']}, "
              f"sheds {status['metrics']['sheds_total']}")
        for when, what in events:
            print(f"  {when:6.1f} s  {what}")
        for line in watch:
            print(f"  watch: {line}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("part", choices=("larger", "soak"))
    parser.add_argument("--work", default=None, help="folder for the model and the PCs (default: the temp dir)")
    parser.add_argument("--limit-gb", type=float, default=None, help="each PC's limit (larger: 5.8, soak: 1.6)")
    parser.add_argument("--ratio", type=float, default=2.5, help="larger: model bytes over one PC's limit")
    parser.add_argument("--hidden", type=int, default=2048, help="larger: the model's hidden size")
    parser.add_argument("--layers", type=int, default=None, help="larger: layers (default: from --ratio)")
    parser.add_argument("--prompt", default="The cluster of PCs")
    parser.add_argument("--tokens", type=int, default=None, help="tokens per answer (larger: 8, soak: 16)")
    parser.add_argument("--soak-s", type=float, default=600.0)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--shrunk-mib", type=int, default=24, help="soak: what system-c keeps free when lowered")
    args = parser.parse_args()
    reason = netlab.unavailable() or netlab.firewall_unavailable() or netlab.memory_unavailable()
    if reason:
        sys.exit(f"needs the netlab with memory limits: {reason}")
    if args.part == "larger":
        args.limit_gb, args.tokens = args.limit_gb or 5.8, args.tokens or 8
        larger(args)
    else:
        args.limit_gb, args.tokens = args.limit_gb or 1.6, args.tokens or 16
        soak(args)


if __name__ == "__main__":
    main()
