"""Measured decode speed (exo_lab.engine.speed) and the planner's use of it: scratch stages of
the model's own shape time a layer and the head; the planner's stage times are then layers x
the layer's time + the head's on the last stage, in whole picoseconds, so engines measured alike
split a model evenly. How close the prediction comes to a real pipeline is a benchmark
(benchmarks/bench_prediction.py), not a test."""
from __future__ import annotations

import pytest

import exo_lab.engine.speed as speed
from exo_lab.model.profile import profile_model
from exo_lab.planning.planner import NodeSpec, plan_layers
from exo_lab.weights.resolve import read_model_config

GB = 10**9


def test_a_scratch_stage_times_a_layer_and_the_head_once_per_model_and_dtype(tiny_model_dir):
    config = read_model_config(tiny_model_dir(num_layers=6))
    first = speed.measure_decode(config, "float32")
    assert first["layer_seconds"] > 0 and first["head_seconds"] >= 0
    assert speed.measure_decode(config, "float32") is first          # cached in the engine
    assert speed.measure_decode(config, "int8") is not first
    assert speed.last_level_cache_bytes() >= 2**20


def test_a_model_too_large_for_a_scratch_stage_is_not_measured(tiny_model_dir, monkeypatch):
    config = read_model_config(tiny_model_dir(num_layers=5))
    monkeypatch.setattr(speed, "SCRATCH_MAX_BYTES", 1000)
    assert speed.measure_decode(config, "bfloat16") is None


def test_the_planner_plans_with_measured_times(tiny_model_dir):
    profile = profile_model(str(tiny_model_dir(num_layers=6)))
    alike = [NodeSpec(f"pc-{i}", 8 * GB, 20e9, measured_ms=(1.23456789, 7.654321)) for i in range(3)]
    plan = plan_layers(profile, alike, min_stages=3)
    assert [(s.start_layer, s.stop_layer) for s in plan.stages] == [(0, 2), (2, 4), (4, 6)]   # ties are exact
    assert [s.ms_per_token for s in plan.stages] == pytest.approx([2.469136, 2.469136, 2.469136 + 7.654321],
                                                                  abs=1e-6)
    # a faster PC takes the layers (latency: one stream's time); the bandwidth no longer counts
    faster = [NodeSpec("slow", 8 * GB, 1e12, measured_ms=(2.0, 5.0)), NodeSpec("fast", 8 * GB, 1e9,
                                                                                measured_ms=(1.0, 5.0))]
    plan = plan_layers(profile, faster, min_stages=2)
    assert [(s.node, s.stop_layer - s.start_layer) for s in plan.stages] == [("slow", 1), ("fast", 5)]
    assert plan.predicted_ms_per_token == pytest.approx(2.0 + 5 * 1.0 + 5.0 + plan.hop_ms)


def test_a_replan_needs_a_gain_worth_a_reload():
    """Measured speeds vary from one measure to the next: a new plan is loaded only when it is
    10% and 1 ms per token better (the noise of a model whose layers take microseconds, or of
    a few percent, moves nothing)."""
    from types import SimpleNamespace

    from exo_lab.coordinator.pipeline import is_better

    def plan(ms: float, objective: str = "latency", bottleneck: float | None = None):
        return SimpleNamespace(objective=objective, predicted_ms_per_token=ms,
                               bottleneck_ms=ms if bottleneck is None else bottleneck)

    assert is_better(plan(50.0), plan(60.0))
    assert not is_better(plan(57.0), plan(60.0))           # 5%: noise
    assert not is_better(plan(0.5), plan(0.8))             # 37%, but 0.3 ms: not worth a reload
    assert is_better(plan(10.0, "throughput", 5.0), plan(20.0, "throughput", 5.0))   # same slowest stage
