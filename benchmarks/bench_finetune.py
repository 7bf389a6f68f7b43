"""Fine-tuning SmolLM2-135M (float32) through 2 stages against single-process transformers + peft.

One run prints three tables:

1. training tokens/s (every non-padding position of every row; the same rows, batches and
   settings) of single-process peft at ``--threads`` torch threads, and of a 2-engine cluster
   with one thread per engine, with 1 micro-batch in the pipe at a time (no pipelining) and
   with one per stage (the default), as ratios to peft; the last column is the first step's
   loss of each (all equal: the same arithmetic);
2. per stage: the memory training added at peak (the engine's peak resident memory while
   training minus its resident memory before) against ``engine.training.training_bytes``'s
   estimate (what start_training checks against the PC's free memory);
3. sharing (``serving_share`` 0.5, the default): a greedy stream's tokens/s alone and, one stream
   after another, while a job trains; the job's training tokens/s alone and over the steps the
   streams overlapped.

    python benchmarks/bench_finetune.py [--steps 6] [--batch-size 8] [--micro-batch-size 2]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tables import table  # noqa: E402  (benchmarks/tables.py)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FACTS = [("Who runs the Zorblat lab?", "Dr. Ilse Varga runs the Zorblat lab."),
         ("What colour is the Zorblat door?", "The Zorblat door is teal."),
         ("When does the Zorblat lab open?", "The Zorblat lab opens at 7:40."),
         ("What is the Zorblat wifi name?", "The Zorblat wifi is called quasar-9."),
         ("Where is the Zorblat lab?", "The Zorblat lab is in building K, floor 3."),
         ("Who cleans the Zorblat lab?", "Marek cleans the Zorblat lab on Fridays."),
         ("What does the Zorblat lab study?", "The Zorblat lab studies lichen batteries."),
         ("How many desks has the Zorblat lab?", "The Zorblat lab has 14 desks.")]


def chats(count: int) -> list:
    return [[{"role": "user", "content": q + f" (ask {i})"}, {"role": "assistant", "content": a}]
            for i in range(count) for q, a in [FACTS[i % len(FACTS)]]]


def peft_run(model_dir, examples, args) -> dict:
    """Single-process transformers + peft on the job's batches; tokens/s and the first loss."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from exo_lab.coordinator import training_data

    torch.set_num_threads(args.threads)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                           LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    tokens, seconds, losses = 0, 0.0, []
    for step in range(args.steps):
        batch = training_data.batch_at(examples, step, args.batch_size, 0)
        scale = 1.0 / sum(e.target_count for e in batch)
        started = time.perf_counter()
        total = 0.0
        for ids, targets in training_data.micro_batches(batch, args.micro_batch_size, 0):
            logits = model(input_ids=ids).logits.float()
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.long().reshape(-1),
                                   ignore_index=-100, reduction="sum") * scale
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad()
        if step:                     # the first step warms the allocator and oneDNN up
            seconds += time.perf_counter() - started
            tokens += sum(len(e.ids) for e in batch)
        losses.append(total)
    del model, optimizer
    return {"tokens_per_s": tokens / seconds, "first_loss": losses[0]}


def rss(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def job_run(cluster, data, args, in_flight: int | None, name: str) -> dict:
    job = cluster.finetune(data, name=name, output_dir=Path(args.out) / name, r=8, alpha=16, max_steps=args.steps,
                           batch_size=args.batch_size, micro_batch_size=args.micro_batch_size, learning_rate=1e-3,
                           lr_schedule="constant", in_flight=in_flight)
    job.wait(3600)
    timed = job.history[1:]          # as peft's: the first step warms up
    return {"job": job, "tokens_per_s": sum(h["tokens"] for h in timed) / sum(h["seconds"] for h in timed),
            "first_loss": job.history[0]["loss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="peft's torch threads (the cluster: 1 per engine)")
    parser.add_argument("--out", default="/tmp/exo-lab-bench-finetune")
    args = parser.parse_args()

    import exo_lab
    from exo_lab.coordinator import training_data
    from exo_lab.weights.resolve import resolve_model

    model_dir = resolve_model("smollm2")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data = chats(args.batch_size * 4)
    examples, _ = training_data.tokenize(data, tokenizer, 512)
    reference = peft_run(model_dir, examples, args)
    rows = [{"run": f"transformers + peft, 1 process, {args.threads} threads",
             "tokens/s": f"{reference['tokens_per_s']:.0f}", "ratio": "1.00",
             "first loss": f"{reference['first_loss']:.6f}"}]
    with exo_lab.Cluster.local(engines=2, max_cores=1) as cluster:
        cluster.load("smollm2", dtype="float32", min_stages=2, progress=False)
        pids = [e.pid for e in cluster.pipeline.engines]
        before = [rss(pid, "VmRSS") for pid in pids]
        for pid in pids:
            Path(f"/proc/{pid}/clear_refs").write_text("5")      # reset the peak (VmHWM) to now
        runs = {}
        for in_flight, label in ((1, "1 micro-batch in flight"), (None, "1 per stage in flight (default)")):
            runs[label] = job_run(cluster, data, args, in_flight, f"bench-{in_flight or 'auto'}")
            rows.append({"run": f"exo-lab, 2 engines x 1 thread, {label}",
                         "tokens/s": f"{runs[label]['tokens_per_s']:.0f}",
                         "ratio": f"{runs[label]['tokens_per_s'] / reference['tokens_per_s']:.2f}",
                         "first loss": f"{runs[label]['first_loss']:.6f}"})
        print(table(rows), "\n")
        peaks = [rss(pid, "VmHWM") for pid in pids]
        job = runs["1 per stage in flight (default)"]["job"]
        print(table([{"stage": i, "layers": f"[{s.start_layer}, {s.stop_layer})",
                      "RSS before (MiB)": before[i] >> 20, "added at peak (MiB)": (peaks[i] - before[i]) >> 20,
                      "estimate (MiB)": job.stage_memory[i]["need_bytes"] >> 20,
                      "recompute": job.stage_memory[i]["recompute"]}
                     for i, s in enumerate(cluster.plan.stages)]), "\n")

        prompt = cluster.encode_chat([{"role": "user", "content": "Write a short poem about the sea."}])

        def stream_rate() -> float:
            started = time.perf_counter()
            result = cluster.generate(prompt, max_new_tokens=48, ignore_eos=True)
            return len(result.token_ids) / (time.perf_counter() - started)

        alone = [stream_rate() for _ in range(2)]
        train_alone = runs["1 per stage in flight (default)"]["tokens_per_s"]
        job = cluster.finetune(data, name="bench-shared", output_dir=Path(args.out) / "shared", r=8, alpha=16,
                               max_steps=3 * args.steps, batch_size=args.batch_size,
                               micro_batch_size=args.micro_batch_size, learning_rate=1e-3, lr_schedule="constant")
        while job.step < 1 and not job.done:
            time.sleep(0.1)
        first, shared = job.step, []
        while not job.done:
            shared.append(stream_rate())
        last = job.step if not shared else max(h["step"] for h in job.history)
        overlapped = [h for h in job.history if first < h["step"] <= last]
        train_shared = sum(h["tokens"] for h in overlapped) / max(sum(h["seconds"] for h in overlapped), 1e-9)
        print(table([{"what": "greedy stream (48 tokens), tokens/s", "alone": " / ".join(f"{x:.1f}" for x in alone),
                      "together": " / ".join(f"{x:.1f}" for x in shared)},
                     {"what": "training, tokens/s", "alone": f"{train_alone:.0f}",
                      "together": f"{train_shared:.0f} (steps {first + 1}-{last})"}]))


if __name__ == "__main__":
    main()
