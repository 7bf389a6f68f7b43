"""The typed control plane (exo_lab.control_types): every type checks its fields on construction
and names the bad one, a bad ShardSpec fails on the coordinator before any engine call and again
on the engine, status and probe survive a JSON round trip, and every state a real cluster shows
is an EngineState. All in one process but the last test (a real 2-engine cluster)."""
from __future__ import annotations

import json
import pickle
import subprocess
import sys
from types import SimpleNamespace

import pytest

from exo_lab.control_types import (EngineState, EngineStatus, GpuProbe, LoadedStage, Probe, ShardSpec, StageStatus,
                                   engine_state, received)
from exo_lab.errors import ClusterError, ModelError

SPEC = dict(model_dir="demo", start_layer=0, stop_layer=2, num_layers=4, dtype="float32", device="cpu",
            max_context=256, max_batch=2)
GPU = dict(index=0, name="NVIDIA H200", total_bytes=140 * 10**9, free_bytes=130 * 10**9)
PROBE = dict(hostname="system-b", device_name="system-b.local", advertise_host=None, pid=4242,
             memory_total_bytes=128 * 10**9, memory_free_bytes=100 * 10**9, cores=16, torch_threads=16,
             gpus=(GpuProbe(**GPU),), mps=False, torch_version="2.5.1", torch_cuda="12.4", rss_bytes=400_000_000)
STAGE = dict(stage_index=1, start_layer=2, stop_layer=4, dtype="float32", device="cpu", state=EngineState.GENERATING,
             messages=10, tokens=5, errors=0, dropped_messages=0, busy_s=0.5, last_forward_ms=3.2,
             active_requests=1, kv_slots=2, kv_cache_bytes=1_000_000, parameter_bytes=2_000_000, refused_steps=0)
MEMORY = dict(rss_bytes=1, peak_rss_bytes=1)
LOADED = dict(address="tcp://127.0.0.1:10101", load_s=0.4, reused=False, parameter_bytes=2_000_000,
              rss_bytes=500_000_000, peak_rss_bytes=600_000_000)


@pytest.mark.parametrize("cls, good, field, bad, message", [
    (ShardSpec, SPEC, "model_dir", 3, r"ShardSpec\.model_dir must be str"),
    (ShardSpec, SPEC, "model_dir", "", r"ShardSpec\.model_dir is empty"),
    (ShardSpec, SPEC, "start_layer", "0", r"ShardSpec\.start_layer must be int, got '0' \(str\)"),
    (ShardSpec, SPEC, "start_layer", -1, r"ShardSpec\.start_layer must be >= 0"),
    (ShardSpec, SPEC, "stop_layer", 5, r"\[0, 5\) is not a non-empty part .* stop_layer <= 4"),
    (ShardSpec, SPEC, "num_layers", True, r"ShardSpec\.num_layers must be int, got True \(bool\)"),
    (ShardSpec, SPEC, "dtype", "float64", r"ShardSpec\.dtype 'float64' is not supported; use one of float32"),
    (ShardSpec, SPEC, "device", "", r"ShardSpec\.device is empty"),
    (ShardSpec, SPEC, "max_context", 0, r"ShardSpec\.max_context must be >= 1"),
    (ShardSpec, SPEC, "max_batch", 0, r"ShardSpec\.max_batch must be >= 1"),
    (ShardSpec, SPEC, "max_batch", 2.0, r"ShardSpec\.max_batch must be int"),
    (GpuProbe, GPU, "free_bytes", -1, r"GpuProbe\.free_bytes must be >= 0"),
    (Probe, PROBE, "pid", 0, r"Probe\.pid must be >= 1"),
    (Probe, PROBE, "cores", "16", r"Probe\.cores must be int"),
    (Probe, PROBE, "gpus", [GpuProbe(**GPU)], r"Probe\.gpus must be tuple, got \[.*\(list\)"),
    (Probe, PROBE, "gpus", (GPU,), r"Probe\.gpus\[\] must be GpuProbe, got \{.*\(dict\)"),
    (Probe, PROBE, "torch_cuda", 12.4, r"Probe\.torch_cuda must be str or None"),
    (StageStatus, STAGE, "state", "generating", r"StageStatus\.state must be EngineState"),
    (StageStatus, STAGE, "kv_slots", 0, r"StageStatus\.kv_slots must be >= 1"),
    (StageStatus, STAGE, "stop_layer", 2, r"StageStatus layer range \[2, 2\) is empty"),
    (EngineStatus, MEMORY, "rss_bytes", None, r"EngineStatus\.rss_bytes must be int"),
    (EngineStatus, MEMORY, "stage", {}, r"EngineStatus\.stage must be StageStatus or None"),
    (LoadedStage, LOADED, "reused", "no", r"LoadedStage\.reused must be bool"),
    (LoadedStage, LOADED, "load_s", -0.1, r"LoadedStage\.load_s must be >= 0"),
])
def test_each_type_rejects_a_bad_field_by_name(cls, good, field, bad, message):
    cls(**good)
    error = ModelError if cls is ShardSpec else ClusterError
    with pytest.raises(error, match=message):
        cls(**{**good, field: bad})


def test_a_misspelled_field_is_refused_by_name():
    with pytest.raises(TypeError, match="unexpected keyword argument 'num_layer'"):
        ShardSpec(**{**{k: v for k, v in SPEC.items() if k != "num_layers"}, "num_layer": 4})
    with pytest.raises(ClusterError, match="Probe has no field.* core;"):
        Probe.from_dict({**Probe(**PROBE).to_dict(), "core": 16})
    with pytest.raises(ClusterError, match="StageStatus has no field.* tokenz"):
        EngineStatus.from_dict({**EngineStatus(1, 1, StageStatus(**STAGE)).to_dict(), "tokenz": 3})
    with pytest.raises(ClusterError, match="missing 1 required .*'pid'"):
        Probe.from_dict({k: v for k, v in Probe(**PROBE).to_dict().items() if k != "pid"})


class _RecordingControl:
    """An EngineControl that records every call the pipeline makes of it."""

    inbox_ports = None

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        return lambda *args, **kwargs: self.calls.append(name)


def test_a_bad_spec_fails_on_the_coordinator_before_any_engine_call():
    from exo_lab.coordinator import pipeline
    from exo_lab.planning.options import LoadOptions

    # the plan and the model disagree: stage 1 reaches past the model's 4 layers
    plan = SimpleNamespace(stages=[SimpleNamespace(start_layer=0, stop_layer=2),
                                   SimpleNamespace(start_layer=2, stop_layer=6)])
    engines = [SimpleNamespace(engine_id=0, device="cpu", node="engine-0"),
               SimpleNamespace(engine_id=1, device="cpu", node="engine-1")]
    control = _RecordingControl()
    with pytest.raises(ModelError, match=r"\[2, 6\) is not a non-empty part of the model's 4 layers"):
        pipeline._load_shards(control, "demo", 4, LoadOptions(model="demo"), 256, plan, engines,
                              progress=False, timeout_s=5)
    assert control.calls == []     # not even stage 0 was sent, nor marked loading
    good = [SimpleNamespace(start_layer=0, stop_layer=2), SimpleNamespace(start_layer=2, stop_layer=4)]
    specs = pipeline.shard_specs("demo", 4, LoadOptions(model="demo", max_batch=3), 256,
                                 SimpleNamespace(stages=good), engines)
    assert [(s.start_layer, s.stop_layer, s.max_batch, s.model_dir) for s in specs] == [
        (0, 2, 3, "demo"), (2, 4, 3, "demo")]


def test_the_engine_checks_what_it_receives_again():
    from exo_lab.engine import worker as engine_worker

    with pytest.raises(ModelError, match="the coordinator sent a dict where an exo_lab.control_types.ShardSpec"):
        engine_worker.load_stage({**SPEC, "model_id": "demo"}, 0, 1, "127.0.0.1", "127.0.0.1")
    # unpickling skips __post_init__: a spec spoilt on the way is caught by received()
    spoilt = ShardSpec(**SPEC)
    object.__setattr__(spoilt, "max_batch", 0)
    with pytest.raises(ModelError, match=r"ShardSpec\.max_batch must be >= 1"):
        received(pickle.loads(pickle.dumps(spoilt)), ShardSpec, "the coordinator")
    probe = Probe(**{**PROBE, "gpus": (GpuProbe(**GPU),)})
    object.__setattr__(probe.gpus[0], "free_bytes", -5)      # nested types are checked too
    with pytest.raises(ClusterError, match=r"GpuProbe\.free_bytes must be >= 0"):
        received(pickle.loads(pickle.dumps(probe)), Probe, "engine 3")
    with pytest.raises(ClusterError, match="engine 3 sent a dict where an exo_lab.control_types.Probe belongs"):
        received(Probe(**PROBE).to_dict(), Probe, "engine 3")


def test_probe_and_status_round_trip_through_json_and_pickle():
    probe = Probe(**PROBE)
    assert Probe.from_dict(json.loads(json.dumps(probe.to_dict()))) == probe
    loaded = EngineStatus(rss_bytes=5, peak_rss_bytes=6, stage=StageStatus(**STAGE))
    idle = EngineStatus(rss_bytes=5, peak_rss_bytes=6)
    for status in (loaded, idle):
        assert EngineStatus.from_dict(json.loads(json.dumps(status.to_dict()))) == status
        assert received(pickle.loads(pickle.dumps(status)), EngineStatus, "engine 0") == status
    # the flat row the status dict has always had: state as its plain string
    assert loaded.to_dict() == {"loaded": True, "rss_bytes": 5, "peak_rss_bytes": 6,
                                **{**STAGE, "state": "generating"}}
    assert type(loaded.to_dict()["state"]) is str
    assert idle.to_dict() == {"loaded": False, "rss_bytes": 5, "peak_rss_bytes": 6}
    with pytest.raises(ClusterError, match="engine state 'thinking' is not one of idle, loading"):
        EngineStatus.from_dict({**loaded.to_dict(), "state": "thinking"})


def test_engine_states_are_strings_and_the_dashboard_knows_them_all():
    from exo_lab.notebook.formatting import STATE_COLORS, STATES, display_state

    assert STATES == ("idle", "loading", "generating", "busy", "failed", "stopped", "spare")
    assert set(STATE_COLORS) == set(EngineState)
    assert json.dumps([EngineState.SPARE]) == '["spare"]' and f"{EngineState.BUSY}" == "busy"
    assert engine_state("spare") is EngineState.SPARE
    assert display_state({"state": "spare"}) == "spare"
    assert display_state({"state": "idle", "active_requests": 1}) == "generating"
    assert display_state({}) == "idle"


def test_set_state_takes_an_engine_state():
    from exo_lab.config import config_from_dict
    from exo_lab.coordinator.control import EngineControl

    control = EngineControl(config_from_dict({"cluster_name": "t", "devices": [
        {"hostname": "a.local", "roles": ["coordinator", "compute"]}]}))
    assert control.state(7) is EngineState.IDLE
    control.set_state(7, EngineState.LOADING)
    assert control.state(7) is EngineState.LOADING
    with pytest.raises(TypeError, match="set_state takes an EngineState, got 'loading' \\(str\\)"):
        control.set_state(7, "loading")


def test_the_types_import_nothing_heavy():
    code = ("import sys, exo_lab.control_types; "
            "print(sorted(m for m in ('torch', 'transformers', 'ipyparallel', 'zmq') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_real_cluster_shows_only_engine_states(cluster):
    """The conftest cluster (2 engines, demo over both), then demo on one engine: a spare."""
    def states() -> set[str]:
        status = cluster.status()
        assert all(type(row["state"]) is str for row in status["engines"])
        return {row["state"] for row in status["engines"]}

    cluster.generate("Hello", max_new_tokens=2)
    assert states() <= set(EngineState)
    assert all(isinstance(cluster.control.state(eid), EngineState) for eid in cluster.control.ids)
    cluster.load("demo", min_stages=1, max_batch=1, progress=False)   # the tiny demo fits one engine
    assert len(cluster.plan.stages) == 1 and states() == {"idle", "spare"}
