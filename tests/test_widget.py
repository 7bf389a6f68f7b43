"""The dashboard widget on a real 2-engine cluster: rows match the engines and the plan, values
move while a generation runs, and no refresh thread outlives close() or cluster.stop()."""
from __future__ import annotations

import socket
import threading
import time

import pytest

import exo_lab
from exo_lab.notebook import format_status, status_html
from exo_lab.notebook.widget import ClusterWidget

pytestmark = pytest.mark.timeout(120)


def widget_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("exo-lab-widget") and t.is_alive()]


def wait_for(condition, timeout_s: float, interval_s: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval_s)
    return condition()


def value(widget) -> object:
    return widget.get_state()["value"]


def test_rows_match_engines_and_layer_ranges(cluster):
    widget = ClusterWidget(cluster, autostart=False)
    try:
        assert not widget.running
        assert [row.engine_id for row in widget.rows] == sorted(cluster.control.ids)
        by_node = {value(row.node): row for row in widget.rows}
        stages = cluster.plan.stages
        assert sorted(by_node) == sorted(stage.node for stage in stages)
        for index, stage in enumerate(stages):
            row = by_node[stage.node]
            assert value(row.layers) == f"{stage.start_layer}-{stage.stop_layer - 1}"
            assert value(row.host) == socket.gethostname()
            assert value(row.device) == "CPU"
            assert value(row.state) == "idle"
            assert row.view.memory_budget_bytes == stage.budget_bytes
            # the bar is the engine's RSS against its budget
            rss = next(r["rss_bytes"] for r in widget.status["engines"] if r["engine_id"] == row.engine_id)
            assert value(row.memory) == pytest.approx(rss / stage.budget_bytes)
            assert 0.0 < value(row.memory) < 1.0
            assert f"/ {exo_lab.config.format_bytes(stage.budget_bytes)}" in value(row.memory_label)
        assert value(by_node[stages[0].node].roles) == "embeddings + layers"
        assert value(by_node[stages[-1].node].roles) == "layers + head"
        assert "demo" in value(widget.model) and "2 stage(s)" in value(widget.model)
        assert "ready" in value(widget.title)
    finally:
        widget.close()


def test_values_change_while_a_generation_runs(cluster):
    widget = ClusterWidget(cluster, interval_s=0.2, metrics_interval_s=0.1)
    seen_tokens_per_s, seen_states, seen_in_flight = [], set(), set()
    generation = threading.Thread(
        target=cluster.generate, args=("Watch the dashboard",),
        kwargs={"max_new_tokens": 400, "ignore_eos": True})
    try:
        assert value(widget.throughput) == 0.0
        assert value(widget.in_flight) == "0 requests in flight; 0/8 KV slots, 0 queued"
        generation.start()
        while generation.is_alive():
            seen_tokens_per_s.append(value(widget.throughput))
            seen_states.update(value(row.state) for row in widget.rows)
            seen_in_flight.add(value(widget.in_flight))
            time.sleep(0.05)
        generation.join()
        assert max(seen_tokens_per_s) > 0.0, "tokens/s never moved during a 400-token generation"
        assert "1 request in flight; 1/8 KV slots, 0 queued" in seen_in_flight
        assert "generating" in seen_states
        # and it settles back once the request is done
        assert wait_for(lambda: value(widget.in_flight).startswith("0 requests in flight;"), 3.0)
        assert wait_for(lambda: all(value(row.state) == "idle" for row in widget.rows), 3.0)
        assert len(cluster.metrics.history) > 0     # the widget's samples feed plot_throughput
    finally:
        generation.join()
        widget.close()
    assert not widget.running


def test_close_joins_the_refresh_thread(cluster):
    before = set(threading.enumerate())
    widget = ClusterWidget(cluster, interval_s=0.1, metrics_interval_s=0.05)
    assert widget.running
    assert widget._thread in widget_threads()
    time.sleep(0.3)
    started = time.monotonic()
    widget.close()
    assert time.monotonic() - started < 2.0
    assert not widget._thread.is_alive()
    assert set(threading.enumerate()) <= before, "close() left a thread behind"
    assert widget.comm is None and all(row.comm is None for row in widget.rows)
    assert all(part.comm is None for part in widget.children)
    # nothing samples any more
    samples = len(cluster.metrics.history)
    time.sleep(0.3)
    assert len(cluster.metrics.history) == samples


def test_busy_engine_shows_busy_not_failed(cluster):
    """A long %%px-style task keeps an engine from answering the status poll: busy, not failed."""
    widget = ClusterWidget(cluster, autostart=False)
    engine_id = widget.rows[0].engine_id
    try:
        task = cluster.control.submit(engine_id, time.sleep, 4.0)
        time.sleep(0.2)
        widget.refresh()                    # its status call times out after 3 s
        assert value(widget.rows[0].state) == "busy"
        assert value(widget.rows[1].state) == "idle"
        task.get(10)
    finally:
        widget.close()


def test_repr_is_the_status_as_a_table(cluster):
    widget = ClusterWidget(cluster, autostart=False)
    try:
        text = repr(widget)
        lines = text.splitlines()
        assert lines[0] == "cluster local: ready, model demo, 2 engines"
        assert lines[1].split()[:3] == ["engine", "node", "host"]
        for stage in cluster.plan.stages:
            row = next(line for line in lines if f" {stage.node} " in line)
            assert f"{stage.start_layer}-{stage.stop_layer - 1}" in row and row.rstrip().endswith("idle")
        assert "tokens/s" in lines[-1]
        bundle = widget._repr_mimebundle_()
        assert bundle["text/plain"] == text
        assert "<table" in bundle["text/html"] and "engine-0" in bundle["text/html"]
        assert "application/vnd.jupyter.widget-view+json" in bundle
    finally:
        widget.close()
    # format_status on a fresh status shows the same engines and layers
    fresh = format_status(cluster.status())
    assert fresh.splitlines()[0] == lines[0]
    assert [line.split()[:6] for line in fresh.splitlines()[2:4]] == [line.split()[:6] for line in lines[2:4]]


def test_format_status_of_hand_written_status():
    """GPU rows measure the stage's tensors against the GPU budget; failures carry their error."""
    status = {
        "cluster_name": "office", "state": "ready", "model": "m", "failure": None,
        "plan": {"stages": [{"stop_layer": 4}, {"stop_layer": 10}]},
        "metrics": {"tokens_per_s": 12.5, "requests_in_flight": 1, "tokens_total": 340, "requests_total": 4,
                    "errors_total": 0},
        "engines": [
            {"engine_id": 0, "node": "gpu-box", "hostname": "gpu-box", "device": "cuda:0", "kind": "cuda",
             "start_layer": 0, "stop_layer": 4, "parameter_bytes": 3_000_000_000, "kv_cache_bytes": 1_000_000_000,
             "rss_bytes": 900_000_000, "budget_bytes": 8_000_000_000, "state": "idle", "active_requests": 1,
             "planned_ms": 27.43, "measured_ms": 30.08},
            {"engine_id": 1, "node": "cpu-box", "hostname": "cpu-box", "device": "cpu", "kind": "cpu",
             "start_layer": 4, "stop_layer": 10, "rss_bytes": 6_000_000_000, "budget_bytes": 6_400_000_000,
             "state": "failed", "error": "engine 1 did not answer within 3 s"},
            {"engine_id": 2, "rss_bytes": 300_000_000, "state": "idle"},
        ],
    }
    lines = format_status(status).splitlines()
    assert lines[0] == "cluster office: ready, model m, 3 engines"
    assert lines[2].split() == ["0", "gpu-box", "gpu-box", "GPU", "(cuda:0)", "embeddings", "+", "layers", "0-3",
                                "27.4", "/", "30.1", "4", "GB", "tensors", "/", "8", "GB", "(50%)", "generating"]
    assert lines[3].split()[-1] == "failed" and "6 GB RSS / 6.4 GB (94%)" in lines[3]
    assert lines[4].split() == ["2", "-", "-", "-", "unused", "-", "-", "300", "MB", "RSS", "idle"]
    assert lines[5] == "12.5 tokens/s, 1 request in flight (340 tokens, 4 requests, 0 errors so far)"
    assert lines[6] == "engine 1: engine 1 did not answer within 3 s"
    html = status_html(status)
    assert html.count("<tr") == 4 and 'title="engine 1 did not answer within 3 s"' in html
    assert "#dc2626" in html      # 94 % of the budget: a red bar
    assert "m: ?, 2 stage(s)" in html


def test_widget_stops_by_itself_when_the_cluster_stops():
    with exo_lab.Cluster.local(engines=1, max_cores=1) as small:
        widget = ClusterWidget(small, interval_s=0.1, metrics_interval_s=0.05)
        try:
            assert widget.running
            row = widget.rows[0]
            # no model: the row still says where the engine runs (probed once)
            assert value(row.host) == socket.gethostname()
            assert value(row.roles) == "-" and value(row.layers) == "-"
            assert value(widget.in_flight) == "no model loaded"
            small.stop()
            assert wait_for(lambda: not widget.running, 6.0), "the refresh thread outlived the cluster"
            assert value(row.state) == "stopped"
            assert "stopped" in repr(widget).splitlines()[0]
            assert not widget.start().running      # a stopped cluster is not polled again
        finally:
            widget.close()
    assert widget_threads() == []
