"""Planner tests: hand-checked plans on toy numbers, the exact optimum against brute force on
many small random cases, and the errors a user sees when nothing fits."""
from __future__ import annotations

import itertools
import json
import random

import numpy as np
import pytest

from exo_lab.errors import PlanError
from exo_lab.planning.planner import (DEFAULT_BANDWIDTH_BYTES_PER_S, DEFAULT_OVERHEAD_BYTES, NodeSpec, Plan,
                             format_plan, plan_layers)
from exo_lab.model.profile import ModelProfile


def toy_profile(num_layers=4, *, layer_bytes=100, embedding_bytes=50, final_norm_bytes=0,
                lm_head_bytes=50, tied=False, kv=0, activation=0, vocab_size=0, dtype="float32"):
    return ModelProfile(
        model_id="toy", model_type="llama", dtype=dtype, num_layers=num_layers, hidden_size=8,
        intermediate_size=16, vocab_size=vocab_size, max_position_embeddings=64,
        layer_bytes=layer_bytes, embedding_bytes=embedding_bytes, final_norm_bytes=final_norm_bytes,
        lm_head_bytes=lm_head_bytes, tied_embeddings=tied, kv_bytes_per_token_per_layer=kv,
        activation_bytes_per_token=activation,
    )


def node(name, budget_bytes, bandwidth=1e5, overhead=0, kind="cpu"):
    # 1e5 B/s makes one 100-byte toy layer cost exactly 1 ms and the 50-byte head 0.5 ms.
    return NodeSpec(name, budget_bytes, bandwidth, kind=kind, overhead_bytes=overhead)


def layout(plan: Plan):
    return [(s.node, s.start_layer, s.stop_layer) for s in plan.stages]


def small_plan(nodes, **kw):
    return plan_layers(toy_profile(), nodes, max_context=1, **kw)


# ----------------------------------------------------------------------------- hand-checked plans

def test_memory_terms_of_a_single_stage_add_up_exactly():
    profile = toy_profile(kv=1, activation=3, vocab_size=10, final_norm_bytes=2)
    # weights 4x100 + 50 + 2 + 50 = 502; KV slots 4 layers x 1 x 10 x 2 = 80; workspace: one step
    # of min(chunk 256, context 10) = 10 tokens x 3 = 30, one layer's KV gathered 1 x 10 x 2 = 20,
    # logits 10 x 4 x 2 = 80: 130; overhead 7.
    plan = plan_layers(profile, [node("a", 719, overhead=7)], max_context=10, max_batch=2)
    (stage,) = plan.stages
    assert (stage.weights_bytes, stage.kv_cache_bytes, stage.workspace_bytes) == (502, 80, 130)
    assert (stage.overhead_bytes, stage.total_bytes, stage.budget_bytes) == (7, 719, 719)
    assert stage.has_embeddings and stage.has_head
    with pytest.raises(PlanError):
        plan_layers(profile, [node("a", 718, overhead=7)], max_context=10, max_batch=2)


def test_the_workspace_follows_the_prefill_chunk_not_the_context():
    profile = toy_profile(kv=1, activation=3, vocab_size=10)
    # a step is max(chunk 4, batch 2) = 4 tokens: 4 x 3 + 20 + 80 = 112, whatever the context
    (stage,) = plan_layers(profile, [node("a", 10**6)], max_context=10, max_batch=2, prefill_chunk=4).stages
    assert stage.workspace_bytes == 112
    (longer,) = plan_layers(profile, [node("a", 10**6)], max_context=40, max_batch=2, prefill_chunk=4).stages
    assert longer.workspace_bytes == 4 * 3 + 40 * 2 + 80


def test_tied_model_counts_the_shared_head_once_only_on_a_single_stage():
    tied = toy_profile(tied=True)
    (stage,) = plan_layers(tied, [node("a", 450)], max_context=1).stages
    assert stage.weights_bytes == 450           # 4x100 + 50, the head shares the embedding
    with pytest.raises(PlanError):
        plan_layers(toy_profile(tied=False), [node("a", 450)], max_context=1)
    # Split over two nodes, the last stage needs its own copy of the head matrix.
    plan = plan_layers(tied, [node("a", 250), node("b", 250)], max_context=1)
    assert layout(plan) == [("a", 0, 2), ("b", 2, 4)]
    assert [s.weights_bytes for s in plan.stages] == [250, 250]


def test_latency_uses_one_fast_node_and_says_why_the_other_is_unused():
    plan = small_plan([node("slow", 10**6), node("fast", 10**6, bandwidth=2e5)])
    assert layout(plan) == [("fast", 0, 4)]
    assert plan.predicted_ms_per_token == pytest.approx(2.25)     # (400 + 50) B / 2e5 B/s
    (unused,) = plan.unused_nodes
    assert unused.node == "slow" and unused.reason.startswith("not needed: slower than")


def test_latency_splits_only_while_the_hop_pays_off():
    # "fast" holds 2 layers + head (250 B). slow[0,2) 2 ms + fast[2,4) 1.25 ms + hop vs 4.5 ms alone.
    nodes = [node("slow", 10**6), node("fast", 250, bandwidth=2e5)]
    plan = small_plan(nodes, hop_ms=1.0)
    assert layout(plan) == [("slow", 0, 2), ("fast", 2, 4)]
    assert plan.predicted_ms_per_token == pytest.approx(2 + 1.25 + 1.0)
    assert [s.ms_per_token for s in plan.stages] == [pytest.approx(2.0), pytest.approx(1.25)]
    plan = small_plan(nodes, hop_ms=1.5)                          # 4.75 ms split > 4.5 ms alone
    assert layout(plan) == [("slow", 0, 4)]
    assert plan.predicted_ms_per_token == pytest.approx(4.5)
    (unused,) = plan.unused_nodes
    assert unused.node == "fast"
    assert "fewer hops are faster" in unused.reason and "plan uses 1 stage" in unused.reason


def test_throughput_balances_the_bottleneck_including_the_head():
    nodes = [node(f"n{i}", 10**6) for i in range(3)]
    profile = toy_profile(6)
    plan = plan_layers(profile, nodes, max_context=1, objective="throughput")
    assert layout(plan) == [("n0", 0, 2), ("n1", 2, 4), ("n2", 4, 6)]
    assert plan.bottleneck_ms == pytest.approx(2.5)               # last stage: 2 layers + head
    assert plan.predicted_ms_per_token == pytest.approx(6.5 + 2 * 0.5)
    latency = plan_layers(profile, nodes, max_context=1)
    assert layout(latency) == [("n0", 0, 6)]
    assert [u.node for u in latency.unused_nodes] == ["n1", "n2"]


def test_throughput_breaks_bottleneck_ties_by_latency():
    # A 200 B head (2 ms) makes the last stage >= 3 ms however many stages there are:
    # (2, 1) and (1, 1, 1) both have a 3 ms bottleneck; two stages save a hop.
    profile = toy_profile(3, lm_head_bytes=200)
    nodes = [node(f"n{i}", 10**6) for i in range(3)]
    plan = plan_layers(profile, nodes, max_context=1, objective="throughput")
    assert layout(plan) == [("n0", 0, 2), ("n1", 2, 3)]
    assert plan.bottleneck_ms == pytest.approx(3.0)
    assert plan.predicted_ms_per_token == pytest.approx(5.5)
    assert "lower bottleneck than 3.000 ms/token" in plan.unused_nodes[0].reason


def test_ties_go_to_fewer_stages_then_earlier_nodes_then_even_splits():
    nodes = [node(f"n{i}", 10**6) for i in range(3)]
    assert layout(small_plan(nodes, hop_ms=0.0)) == [("n0", 0, 4)]
    assert layout(small_plan(nodes, min_stages=2)) == [("n0", 0, 2), ("n1", 2, 4)]


def test_min_stages_forces_a_split_and_unfit_nodes_are_skipped_in_order():
    nodes = [node("tiny", 10), node("a", 10**6), node("b", 10**6)]
    plan = small_plan(nodes, min_stages=2)
    assert layout(plan) == [("a", 0, 2), ("b", 2, 4)]
    (unused,) = plan.unused_nodes
    assert unused.node == "tiny"
    assert unused.reason == ("too little memory: budget 10 B < 100 B for a single layer + overhead "
                             "(weights 100 B + KV cache 0 B + workspace 0 B + overhead 0 B)")


def test_default_overhead_and_bandwidth_per_kind():
    assert DEFAULT_BANDWIDTH_BYTES_PER_S == {"cpu": 20e9, "cuda": 500e9, "mps": 100e9}
    plan = small_plan([NodeSpec("gpu", 2 * 10**9, 500e9, kind="cuda")])
    assert plan.stages[0].overhead_bytes == DEFAULT_OVERHEAD_BYTES["cuda"] == 1_500_000_000
    with pytest.raises(PlanError, match="1.5 GB"):
        small_plan([NodeSpec("gpu", 10**9, 500e9, kind="cuda")])


# ----------------------------------------------------------------------------- exactness

def brute_force(profile, nodes, max_context, max_batch, objective, min_stages, hop_ms):
    """Every subsequence of nodes x every contiguous split: the minimal key and the plans
    that reach it (key as documented: objective, then stages, node positions, even sizes)."""
    best_key, best = None, []
    num_layers = profile.num_layers
    for count in range(min_stages, min(len(nodes), num_layers) + 1):
        for chosen in itertools.combinations(range(len(nodes)), count):
            for cuts in itertools.combinations(range(1, num_layers), count - 1):
                bounds = (0, *cuts, num_layers)
                stages = [(p, bounds[j], bounds[j + 1]) for j, p in enumerate(chosen)]
                key = plan_key(profile, nodes, stages, max_context, max_batch, objective, hop_ms)
                if key is None:
                    continue
                if best_key is None or key < best_key:
                    best_key, best = key, [stages]
                elif key == best_key:
                    best.append(stages)
    return best_key, best


def plan_key(profile, nodes, stages, max_context, max_batch, objective, hop_ms):
    """The cost model written out from the spec; None if a stage does not fit."""
    tokens = max_context * max_batch
    times = []
    for position, start, stop in stages:
        first, last = start == 0, stop == profile.num_layers
        layers = stop - start
        weights = layers * profile.layer_bytes + first * profile.embedding_bytes
        weights += last * (profile.final_norm_bytes + profile.lm_head_bytes)
        if first and last and profile.tied_embeddings:
            weights -= profile.lm_head_bytes
        kv = layers * profile.kv_bytes_per_token_per_layer * tokens
        step_tokens = max(min(256, max_context), max_batch)        # the default prefill chunk is 256
        workspace = (profile.activation_bytes_per_token * step_tokens + profile.kv_bytes_per_token_per_layer * tokens
                     + last * profile.vocab_size * 4 * max_batch)
        if weights + kv + workspace + nodes[position].overhead_bytes > nodes[position].budget_bytes:
            return None
        read = layers * profile.layer_bytes + last * (profile.final_norm_bytes + profile.lm_head_bytes)
        times.append(round(read * 1e12 / nodes[position].bandwidth_bytes_per_s))
    total = sum(times) + (len(stages) - 1) * round(hop_ms * 1e9)
    ties = (len(stages), sum(p for p, _, _ in stages), sum((b - a) ** 2 for _, a, b in stages))
    return ((total,) if objective == "latency" else (max(times), total)) + ties


def random_case(rng):
    num_layers = rng.randint(1, 8)
    profile = toy_profile(
        num_layers, layer_bytes=rng.randint(1, 100), embedding_bytes=rng.randint(0, 100),
        final_norm_bytes=rng.randint(0, 5), lm_head_bytes=rng.randint(0, 100),
        tied=rng.random() < 0.5, kv=rng.randint(0, 3), activation=rng.randint(0, 3),
        vocab_size=rng.randint(0, 5))
    max_context, max_batch = rng.randint(1, 4), rng.randint(1, 2)
    whole = (profile.total_parameter_bytes + profile.lm_head_bytes
             + num_layers * profile.kv_bytes_per_token_per_layer * max_context * max_batch + 60)
    # A few shared bandwidths make exact ties common, so tie-breaking is exercised too.
    nodes = [node(f"n{i}", rng.randint(0, whole), bandwidth=rng.choice([1e4, 2e4, 5e4, rng.uniform(1e4, 1e5)]),
                  overhead=rng.randint(0, 20))
             for i in range(rng.randint(1, 5))]
    hop_ms = rng.choice([0.0, 0.5, rng.uniform(0, 5)])
    return profile, nodes, max_context, max_batch, hop_ms


def test_plans_are_the_exact_optimum_of_brute_force():
    rng = random.Random(20240601)
    checked = feasible = 0
    for _ in range(400):
        profile, nodes, max_context, max_batch, hop_ms = random_case(rng)
        for objective, min_stages in itertools.product(("latency", "throughput"), (1, 2, 3)):
            if min_stages > min(len(nodes), profile.num_layers):
                continue
            args = (profile, nodes, max_context, max_batch, objective, min_stages, hop_ms)
            best_key, best = brute_force(*args)
            checked += 1
            if best_key is None:
                with pytest.raises(PlanError):
                    plan_layers(profile, nodes, max_context=max_context, max_batch=max_batch,
                                objective=objective, min_stages=min_stages, hop_ms=hop_ms)
                continue
            feasible += 1
            plan = plan_layers(profile, nodes, max_context=max_context, max_batch=max_batch,
                               objective=objective, min_stages=min_stages, hop_ms=hop_ms)
            position = {n.name: i for i, n in enumerate(nodes)}
            stages = [(position[s.node], s.start_layer, s.stop_layer) for s in plan.stages]
            assert stages in best, (args, stages, best)
            assert plan.predicted_ms_per_token == best_key[0 if objective == "latency" else 1] / 1e9
            assert all(s.total_bytes <= s.budget_bytes for s in plan.stages)
            assert {u.node for u in plan.unused_nodes} == {n.name for n in nodes} - {s.node for s in plan.stages}
    assert checked > 1000 and 0.3 * checked < feasible < checked    # both outcomes well covered


def test_plan_is_deterministic():
    rng = random.Random(7)
    for _ in range(20):
        profile, nodes, max_context, max_batch, hop_ms = random_case(rng)
        runs = []
        for _ in range(2):
            try:
                runs.append(plan_layers(profile, nodes, max_context=max_context, hop_ms=hop_ms))
            except PlanError as exc:
                runs.append(str(exc))
        assert runs[0] == runs[1]


# ----------------------------------------------------------------------------- errors

def test_not_enough_memory_in_total_names_the_numbers_and_the_fixes():
    profile = toy_profile(layer_bytes=10**9, embedding_bytes=10**8, lm_head_bytes=10**8, kv=1000)
    with pytest.raises(PlanError) as caught:
        plan_layers(profile, [node("a", 2 * 10**9), node("b", 10**9)], max_context=1000)
    message = str(caught.value)
    assert "needs at least 4.2 GB" in message and "weights 4.2 GB" in message
    assert "KV cache 4 MB at max_context 1000 x max_batch 1" in message
    assert "offer only 3 GB in total (a 2 GB, b 1 GB)" in message
    for fix in ("add compute nodes", "raise max_memory", "lower max_context (1000)", "bfloat16"):
        assert fix in message
    with pytest.raises(PlanError) as caught:
        plan_layers(toy_profile(dtype="bfloat16"), [node("a", 10)], max_context=1)
    assert "smaller dtype" not in str(caught.value)


def test_enough_memory_in_total_but_no_split_fits_gives_per_node_reasons():
    # 10 nodes of 99 B: 990 B in total, yet one 100 B layer fits nowhere.
    nodes = [node(f"n{i}", 99) for i in range(10)]
    with pytest.raises(PlanError) as caught:
        small_plan(nodes)
    message = str(caught.value)
    assert "no split into contiguous stages fits" in message
    assert "n0 (budget 99 B) cannot hold a single layer (100 B with overhead)" in message
    with pytest.raises(PlanError, match="with at least 2 stages.*big.*at most 2 layers mid-pipeline, 4 with the embeddings.*small.*at most 1 layer mid-pipeline, 0 with the"):
        small_plan([node("big", 10**6), node("small", 120)], min_stages=2)


@pytest.mark.parametrize("kwargs, match", [
    ({"objective": "fast"}, "objective 'fast' is not one of latency, throughput"),
    ({"max_context": 0}, "max_context must be an integer >= 1"),
    ({"max_batch": 0}, "max_batch must be an integer >= 1"),
    ({"min_stages": 0}, "min_stages must be an integer from 1 to 2"),
    ({"min_stages": 3}, "min_stages must be an integer from 1 to 2"),
    ({"hop_ms": -1.0}, "hop_ms must be a finite number >= 0"),
    ({"hop_ms": float("inf")}, "hop_ms must be a finite number >= 0"),
    ({"max_context": 2.5}, "max_context must be an integer >= 1"),
])
def test_invalid_arguments_name_the_allowed_values(kwargs, match):
    with pytest.raises(PlanError, match=match):
        plan_layers(toy_profile(), [node("a", 10**6), node("b", 10**6)], **kwargs)


@pytest.mark.parametrize("nodes, match", [
    ([], "no compute nodes"),
    ([node("a", 10**6), node("a", 10**6)], "appears twice"),
    ([node("a", 10**6, kind="tpu")], "kind 'tpu' is not one of cpu, cuda, mps"),
    ([node("a", 10**6, bandwidth=0)], "bandwidth_bytes_per_s must be > 0"),
])
def test_invalid_nodes_are_rejected(nodes, match):
    with pytest.raises(PlanError, match=match):
        plan_layers(toy_profile(), nodes)


# ----------------------------------------------------------------------------- output

def test_to_json_has_the_documented_shape_and_is_serialisable():
    plan = small_plan([node("slow", 10**6), node("fast", 250, bandwidth=2e5)], hop_ms=1.0)
    data = json.loads(json.dumps(plan.to_json()))
    required = {"model", "dtype", "objective", "predicted_ms_per_token", "stages", "unused_nodes"}
    assert required <= set(data) <= required | {"max_context", "max_batch", "bottleneck_ms"}
    assert data["model"] == "toy" and data["objective"] == "latency"
    assert data["predicted_ms_per_token"] == pytest.approx(4.25)
    assert data["stages"][0] == {"node": "slow", "kind": "cpu", "start_layer": 0, "stop_layer": 2, "weights_bytes": 250,
                                 "kv_cache_bytes": 0, "total_bytes": 250, "budget_bytes": 10**6,
                                 "ms_per_token": 2.0, "note": None}
    assert data["unused_nodes"] == []
    # numpy integers (e.g. from a probe) come out as plain ints.
    plan = plan_layers(toy_profile(), [node("a", 10**6)], max_context=np.int64(2), max_batch=np.int64(1))
    assert json.loads(json.dumps(plan.to_json()))["max_context"] == 2


def test_format_plan_is_a_readable_table():
    plan = small_plan([node("tiny", 10), node("slow", 10**6), node("fast", 250, bandwidth=2e5)], hop_ms=1.0)
    text = format_plan(plan)
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("stage"))
    for column in ("node", "device", "layers", "weights", "KV cache", "total / budget", "ms/token"):
        assert column in header
    assert any(line.split()[:4] == ["0", "slow", "cpu", "0-1"] for line in lines)
    assert any(line.split()[:4] == ["1", "fast", "cpu", "2-3"] for line in lines)
    assert "0-39 is [0, 40)" in text
    assert "predicted: 4.250 ms/token (235.3 tokens/s)" in text
    assert "tiny: too little memory" in text
