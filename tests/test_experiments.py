"""Experiments on the live shards (stage_activations, the raw engine namespace) and the plots,
on a real 2-engine cluster running the demo model, checked against transformers itself."""
from __future__ import annotations

import threading

import matplotlib
import pytest
import torch

from exo_lab.errors import ClusterError
from exo_lab.notebook import (plot_activations, plot_placement, plot_throughput, record_throughput,
                              stage_activations, stage_engines)
from exo_lab.weights.demo import demo_model_dir
from exo_lab.weights.resolve import read_model_config
from exo_lab.notebook.remote import tensor_stats

matplotlib.use("Agg")
pytestmark = pytest.mark.timeout(120)

PROMPT = "The office cluster runs one model"


@pytest.fixture(scope="module")
def reference(cluster):
    """The whole demo model in this process: hidden states after every layer, last logits."""
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(str(demo_model_dir())).eval()
    ids = torch.tensor([cluster.encode(PROMPT)])
    with torch.inference_mode():
        out = model(ids, output_hidden_states=True)
    return out


def test_stage_activations_equal_the_whole_model(cluster, reference):
    activations = stage_activations(cluster, PROMPT)
    plan = cluster.plan
    assert [(a["stage_index"], a["node"], a["start_layer"], a["stop_layer"]) for a in activations] == [
        (i, s.node, s.start_layer, s.stop_layer) for i, s in enumerate(plan.stages)]
    first, last = activations
    # hidden_states[k] is the output of layer k-1 (hidden_states[0] is the embedding)
    assert first["output_kind"] == "hidden_states"
    torch.testing.assert_close(first["output"], reference.hidden_states[first["stop_layer"]], rtol=1e-4, atol=1e-4)
    assert last["output_kind"] == "logits"
    torch.testing.assert_close(last["output"], reference.logits[:, -1, :], rtol=1e-4, atol=1e-4)
    assert last["next_token_id"] == int(reference.logits[0, -1].argmax())
    assert last["next_token"] == cluster.tokenizer.decode([last["next_token_id"]])
    # per-layer stats: every layer once, in order, with the numbers of the reference's states
    layers = [entry for a in activations for entry in a["layers"]]
    assert [entry["layer"] for entry in layers] == list(range(plan.stages[-1].stop_layer))
    # (transformers' last hidden state is after the final norm: the last layer has no reference)
    for entry in layers[:-1]:
        expected = reference.hidden_states[entry["layer"] + 1]
        assert entry["rms"] == pytest.approx(float(expected.pow(2).mean().sqrt()), rel=1e-4)
        assert entry["shape"] == list(expected.shape)
    assert all(a["forward_ms"] > 0 for a in activations)
    stats = tensor_stats(first["output"])
    assert first["output_stats"]["shape"] == stats.pop("shape") == [1, len(cluster.encode(PROMPT)), 128]
    assert {k: first["output_stats"][k] for k in stats} == pytest.approx(stats)


def test_the_greedy_token_is_the_one_the_data_plane_generates(cluster):
    activations = stage_activations(cluster, PROMPT, return_tensors=False, layer_stats=False)
    assert "output" not in activations[0] and activations[0]["layers"] == []
    assert cluster.generate(PROMPT, max_new_tokens=1).token_ids == [activations[-1]["next_token_id"]]


def test_private_kv_caches_do_not_disturb_live_generation(cluster):
    expected = cluster.generate(PROMPT, max_new_tokens=120, ignore_eos=True).token_ids
    alone = stage_activations(cluster, PROMPT)
    result = {}
    generation = threading.Thread(target=lambda: result.update(
        tokens=cluster.generate(PROMPT, max_new_tokens=120, ignore_eos=True).token_ids))
    generation.start()
    during = [stage_activations(cluster, PROMPT) for _ in range(3)]
    generation.join()
    assert result["tokens"] == expected
    for activations in during:
        torch.testing.assert_close(activations[-1]["output"], alone[-1]["output"])
        assert [len(a["layers"]) for a in activations] == [3, 3]   # the data plane's forwards not counted
    for row in cluster.status()["engines"]:
        assert row["active_requests"] == 0


def test_a_failed_experiment_forward_leaves_the_stage_serving(cluster):
    import ipyparallel as ipp

    from exo_lab.notebook import remote

    last = stage_engines(cluster)[-1]
    token_ids = torch.tensor([cluster.encode(PROMPT)])        # the last stage wants hidden states
    with pytest.raises(ipp.error.RemoteError, match="takes hidden states"):
        cluster.control.view([last["engine_id"]]).apply_sync(remote.experiment_forward, token_ids)
    row = next(r for r in cluster.status()["engines"] if r["engine_id"] == last["engine_id"])
    assert row["active_requests"] == 0
    assert cluster.generate(PROMPT, max_new_tokens=3, ignore_eos=True).completion_tokens == 3


def test_px_style_access_to_the_live_shard(cluster):
    """What a %%px cell does: the stage is `exo_stage` in each engine's namespace."""
    view = cluster.control.view([s["engine_id"] for s in stage_engines(cluster)])
    view.block = True
    view.execute("exo_layer_types = [type(layer).__name__ for layer in exo_stage.stage.layers]\n"
                 "exo_range = (exo_stage.stage.spec.start_layer, exo_stage.stage.spec.stop_layer)")
    assert view.pull("exo_range") == [(s.start_layer, s.stop_layer) for s in cluster.plan.stages]
    assert view.pull("exo_layer_types") == [["LlamaDecoderLayer"] * 3] * 2
    # a hook registered there sees the data plane's forwards: 1 prefill + 7 decode steps
    view.execute("exo_calls = []\n"
                 "exo_hook = exo_stage.stage.layers[0].register_forward_hook("
                 "lambda module, args, output: exo_calls.append(tuple(output.shape)))")
    reused_before = cluster.metrics.prefix_tokens_total
    try:
        cluster.generate(PROMPT, max_new_tokens=8, ignore_eos=True)
    finally:
        view.execute("exo_hook.remove()")
    # the prefill feeds the prompt less what an earlier request's KV slot already held
    prefilled = len(cluster.encode(PROMPT)) - (cluster.metrics.prefix_tokens_total - reused_before)
    hidden = read_model_config(demo_model_dir())["hidden_size"]
    for calls in view.pull("exo_calls"):
        assert calls == [(1, prefilled, hidden)] + [(1, 1, hidden)] * 7


def test_errors_without_a_model(cluster):
    cluster.unload()
    try:
        with pytest.raises(ClusterError, match=r"no model is loaded: call cluster.load\('demo'\)"):
            stage_activations(cluster, PROMPT)
    finally:
        cluster.load("demo", min_stages=2, progress=False)


# ----------------------------------------------------------------------------- plots

def test_plot_placement_of_the_live_plan(cluster, tmp_path):
    plan = cluster.plan
    fig = plot_placement(plan)
    ax_layers, ax_memory = fig.axes[:2]
    ticks = {t.get_text(): t.get_position()[1] for t in ax_layers.get_yticklabels()}
    assert sorted(ticks, key=ticks.get, reverse=True) == [s.node for s in plan.stages]   # first stage on top
    assert len(ax_layers.patches) == len(plan.stages)
    spans = sorted((p.get_x(), p.get_x() + p.get_width()) for p in ax_layers.patches)
    assert spans == [(s.start_layer, s.stop_layer) for s in plan.stages]
    # five stacked parts per node; they add up to its budget (in GB)
    assert len(ax_memory.patches) == 5 * len(plan.stages)
    for index, stage in enumerate(plan.stages):
        parts = ax_memory.patches[index * 5:(index + 1) * 5]
        assert sum(p.get_width() for p in parts) == pytest.approx(stage.budget_bytes / 1e9)
        assert parts[0].get_width() == pytest.approx(stage.weights_bytes / 1e9)
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["weights", "KV cache", "workspace", "runtime overhead", "free of budget"]
    fig.savefig(tmp_path / "placement.png")
    assert (tmp_path / "placement.png").stat().st_size > 10_000
    # the JSON form (status()["plan"]) plots too, with workspace and overhead as one part
    fig = plot_placement(cluster.status()["plan"])
    assert len(fig.axes[1].patches) == 4 * len(plan.stages)


def test_plot_placement_names_unused_nodes():
    from exo_lab.planning.planner import NodeSpec, plan_layers
    from exo_lab.model.profile import profile_model

    nodes = [NodeSpec("big", 8_000_000_000, 20e9), NodeSpec("tiny", 100_000_000, 20e9)]
    plan = plan_layers(profile_model("demo"), nodes)
    assert [u.node for u in plan.unused_nodes] == ["tiny"]
    fig = plot_placement(plan)
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert any(text.startswith("unused: too little memory") for text in texts)
    ticks = {t.get_text(): t.get_position()[1] for t in fig.axes[0].get_yticklabels()}
    assert ticks["big"] > ticks["tiny"]


def test_plot_throughput_from_recorded_metrics(cluster):
    cluster.metrics.history.clear()
    with record_throughput(cluster, interval_s=0.05) as metrics:
        cluster.generate(PROMPT, max_new_tokens=150, ignore_eos=True)
    points = list(metrics.history)
    assert len(points) >= 3
    assert max(tps for _, tps, _ in points) > 0 and max(n for _, _, n in points) == 1
    assert points[-1][2] == 0                      # the point after the work: nothing in flight
    fig = plot_throughput(metrics)
    ax, flight = fig.axes
    assert list(ax.lines[0].get_ydata()) == [tps for _, tps, _ in points]
    assert list(flight.lines[0].get_ydata()) == [n for _, _, n in points]
    assert not [t for t in threading.enumerate() if t.name == "exo-lab-throughput-sampler"]
    empty = plot_throughput([])
    assert "no samples yet" in empty.axes[0].texts[0].get_text()


def test_plot_activations(cluster):
    activations = stage_activations(cluster, PROMPT)
    fig = plot_activations(activations)
    ax_rms, ax_ms = fig.axes
    assert len(ax_rms.lines) == 2
    assert list(ax_rms.lines[1].get_xdata()) == [3, 4, 5]
    assert [p.get_height() for p in ax_ms.patches] == [a["forward_ms"] for a in activations]
