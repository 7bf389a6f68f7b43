"""Re-balancing's arithmetic, pure: the stage clock, the slowdowns it implies, and the planner
timing the plan in force at new speeds. The move itself runs on real engines in
tests/test_rebalance.py."""
from __future__ import annotations

import pytest

from exo_lab.coordinator.balance import REBALANCE_DRIFT, StageClock, drifted, slowdowns, steady
from exo_lab.model.profile import profile_from_config
from exo_lab.planning.planner import NodeSpec, plan_layers, reprice, slowed
from exo_lab.errors import PlanError

GB = 10**9


def test_the_clock_compares_the_last_steps_with_the_first_of_the_same_batch_size():
    clock = StageClock(steps=4, baseline_steps=3)
    for ms in [(10.0, 10.0), (10.0, 12.0), (10.0, 11.0)]:       # 4 rows: the baseline (10, 11)
        clock.record(ms, rows=4)
    assert clock.ratios() is None                                 # nothing after it yet
    for ms in [(40.0, 40.0)] * 3:                                 # 1 row: a baseline of its own
        clock.record(ms, rows=1)
    for ms in [(100.0, 1.0), (20.0, 11.0), (20.0, 11.0), (20.0, 11.0), (20.0, 22.0)]:   # the 100 falls out
        clock.record(ms, rows=4)
    assert clock.ratios() == pytest.approx((2.0, 1.0))            # median (20, 11) over (10, 11)
    clock.reset()
    assert clock.ratios() is None


def test_the_batch_size_seen_last_is_the_one_compared():
    clock = StageClock(steps=4, baseline_steps=2)
    for rows, ms in [(4, (10.0, 10.0))] * 4 + [(2, (5.0, 5.0))] * 2 + [(2, (5.0, 10.0))] * 2:
        clock.record(ms, rows=rows)
    assert clock.ratios() == pytest.approx((1.0, 2.0))
    clock.record((30.0, 10.0), rows=4)
    clock.record((30.0, 10.0), rows=4)
    clock.record((30.0, 10.0), rows=4)
    assert clock.ratios() == pytest.approx((3.0, 1.0))


def test_every_stage_slowing_alike_says_nothing():
    factors = slowdowns(["a", "b"], [3.0, 3.0], {})
    assert factors == pytest.approx({"a": 1.0, "b": 1.0}) and not drifted(factors, {})


def test_a_busy_pc_shows_as_its_slowdown_and_a_freed_one_comes_back():
    # the hog doubles a's stage time
    busy = slowdowns(["a", "b"], [2.0, 1.0], {})
    assert busy == pytest.approx({"a": 2.0, "b": 1.0}) and drifted(busy, {})
    # the plan that followed (a planned 2x slower) runs at its baseline: nothing drifts
    held = slowdowns(["a", "b"], [1.0, 1.0], busy)
    assert held == pytest.approx(busy) and not drifted(held, busy)
    # the hog stops: a's stage takes half of its baseline
    freed = slowdowns(["a", "b"], [0.5, 1.0], busy)
    assert freed == pytest.approx({"a": 1.0, "b": 1.0}) and drifted(freed, busy)


def test_small_noise_is_no_drift_and_a_missing_ratio_is_no_answer():
    assert not drifted(slowdowns(["a", "b"], [1.1, 1 + REBALANCE_DRIFT * 0.99], {}), {})
    assert slowdowns(["a", "b"], [1.0, 0.0], {}) is None
    assert slowdowns(["a", "b"], [1.0], {}) is None


@pytest.fixture(scope="module")
def profile(tiny_model_dir):
    import json

    folder = tiny_model_dir(num_layers=6)
    return profile_from_config(json.loads((folder / "config.json").read_text()), dtype="float32", model_id="tiny")


def nodes(layer_ms=(1.0, 1.0)):
    return [NodeSpec(name, 10 * GB, 20e9, measured_ms=(ms, 0.5)) for name, ms in zip("ab", layer_ms)]


def test_slowed_scales_measured_times_or_bandwidth():
    node = NodeSpec("a", GB, 20e9, measured_ms=(2.0, 1.0))
    assert slowed(node, 1.5).measured_ms == (3.0, 1.5) and slowed(node, 1.0) is node
    assert slowed(NodeSpec("b", GB, 20e9), 2.0).bandwidth_bytes_per_s == 10e9


@pytest.mark.parametrize("objective", ["latency", "throughput"])
def test_the_plan_in_force_timed_at_its_own_speeds_is_itself(profile, objective):
    plan = plan_layers(profile, nodes(), min_stages=2, objective=objective)
    again = reprice(plan, profile, nodes())
    assert again.predicted_ms_per_token == pytest.approx(plan.predicted_ms_per_token)
    assert again.bottleneck_ms == pytest.approx(plan.bottleneck_ms)


def test_at_new_speeds_the_plan_in_force_costs_more_than_the_plan_for_them(profile):
    plan = plan_layers(profile, nodes(), min_stages=2, objective="throughput")
    assert [(s.start_layer, s.stop_layer) for s in plan.stages] == [(0, 3), (3, 6)]
    busy = [slowed(nodes()[0], 2.0), nodes()[1]]
    current = reprice(plan, profile, busy)
    # a's 3 layers at 2 ms, b's 3 at 1 ms plus the head: timed by hand
    assert [s.ms_per_token for s in current.stages] == pytest.approx([6.0, 3.5])
    assert current.predicted_ms_per_token == pytest.approx(9.5 + plan.hop_ms)
    better = plan_layers(profile, busy, min_stages=2, objective="throughput")
    assert [(s.start_layer, s.stop_layer) for s in better.stages] == [(0, 2), (2, 6)]
    assert better.bottleneck_ms == pytest.approx(4.5) and current.bottleneck_ms == pytest.approx(6.0)
    with pytest.raises(PlanError, match="no speed for node"):
        reprice(plan, profile, busy[:1])


def test_a_slowdown_counts_once_two_checks_see_it_alike():
    assert not steady({"a": 1.4, "b": 1.0}, None)
    assert not steady({"a": 1.9, "b": 1.0}, {"a": 1.4, "b": 1.0})          # still growing
    assert steady({"a": 1.9, "b": 1.0}, {"a": 1.8, "b": 1.0})
    assert not steady({"a": 1.9, "b": 1.0}, {"a": 1.9})                     # other stages
