"""The pipeline runtime on a real ipyparallel cluster: exact generation, errors, cleanup."""
from __future__ import annotations

import os
import shutil
import signal
import threading
import time

import psutil
import pytest
import torch

import exo_lab
import exo_lab.model.profile
from exo_lab.engine import probe as engine_probe
from exo_lab.engine import worker as engine_worker
from exo_lab.errors import ModelError, PlanError, RequestError
from stages import hf_greedy

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def cluster():
    with exo_lab.Cluster.local(engines=3, max_cores=1) as c:
        yield c
    # stop() ended every process it started
    assert not c.control.started


def prompts(tokenizer):
    short = tokenizer("Hello there, cluster", add_special_tokens=False)["input_ids"][:5]
    long_text = "Engineering PCs share one model, layer by layer, over the office network. " * 12
    long = tokenizer(long_text, add_special_tokens=False)["input_ids"][:150]
    return {"short": short, "long": long}


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_greedy_equals_transformers_on_1_2_3_engines(cluster, tiny_model_dir, architecture):
    from transformers import AutoTokenizer

    tied = architecture in ("qwen2", "qwen3")   # cover tied and untied heads across the set
    model_dir = tiny_model_dir(architecture, tie_word_embeddings=tied, num_layers=6)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    expected = {name: hf_greedy(model_dir, ids, NEW_TOKENS) for name, ids in prompts(tokenizer).items()}
    for stages in (1, 2, 3):
        plan = cluster.load(str(model_dir), min_stages=stages, progress=False)
        assert len(plan.stages) == stages
        assert [s.start_layer for s in plan.stages][0] == 0 and plan.stages[-1].stop_layer == 6
        for name, ids in prompts(tokenizer).items():
            result = cluster.generate(ids, max_new_tokens=NEW_TOKENS, ignore_eos=True)
            assert result.token_ids == expected[name], f"{architecture}, {stages} stages, {name} prompt"
            assert result.finish_reason == "length"


def test_no_process_holds_the_whole_model(cluster, tiny_model_dir):
    model_dir = tiny_model_dir("llama", num_layers=6)
    plan = cluster.load(str(model_dir), min_stages=3, progress=False)
    shard_bytes = [cluster.control.call(e.engine_id, engine_worker.worker_status).stage.parameter_bytes
                   for e in cluster.pipeline.engines]
    assert shard_bytes == [s.weights_bytes for s in plan.stages]
    total = exo_lab.model.profile.profile_model(str(model_dir)).total_parameter_bytes
    assert max(shard_bytes) < total / 2
    # the coordinator holds no weights at all: only the tokenizer
    assert not any(isinstance(v, torch.nn.Module) for v in vars(cluster.pipeline).values())


def test_sampling_with_seed_is_reproducible(cluster, tiny_model_dir):
    cluster.load(str(tiny_model_dir("llama", num_layers=6)), min_stages=2, progress=False)
    kwargs = dict(max_new_tokens=16, temperature=1.0, top_p=0.95, top_k=50, ignore_eos=True)
    first = cluster.generate("Hello", seed=7, **kwargs)
    again = cluster.generate("Hello", seed=7, **kwargs)
    other = cluster.generate("Hello", seed=8, **kwargs)
    assert first.token_ids == again.token_ids
    assert other.token_ids != first.token_ids


def test_stream_equals_generate_and_kv_cache_is_freed(cluster, tiny_model_dir):
    cluster.load(str(tiny_model_dir("llama", num_layers=6)), min_stages=3, progress=False)
    whole = cluster.generate("Tell me", max_new_tokens=10, ignore_eos=True)
    events = list(cluster.stream("Tell me", max_new_tokens=10, ignore_eos=True))
    assert "".join(e.text for e in events) == whole.text
    assert [t for e in events for t in e.token_ids] == whole.token_ids
    assert events[-1].finish_reason == "length"
    # breaking out of a stream cancels it; every stage frees the request's cache
    stream = cluster.stream("Tell me", max_new_tokens=200, ignore_eos=True)
    next(stream)
    stream.close()
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        engines = [s for s in cluster.status()["engines"] if "stage_index" in s]
        if all(s["active_requests"] == 0 for s in engines):
            break
        time.sleep(0.05)
    assert all(s["active_requests"] == 0 for s in engines)     # the slots are free again
    assert len({s["kv_cache_bytes"] for s in engines}) == 1 and engines[0]["kv_cache_bytes"] > 0   # flat KV slots


def test_chat_uses_the_chat_template(cluster, tiny_model_dir):
    model_dir = tiny_model_dir("qwen2", num_layers=6)
    cluster.load(str(model_dir), min_stages=2, progress=False)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    expected_prompt = cluster.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if hasattr(expected_prompt, "keys"):
        expected_prompt = expected_prompt["input_ids"]
    assert cluster.encode_chat(messages) == list(expected_prompt)
    result = cluster.chat(messages, max_new_tokens=8, ignore_eos=True)
    assert result.token_ids == cluster.generate(list(expected_prompt), max_new_tokens=8, ignore_eos=True).token_ids


def test_stop_strings_cut_the_text(cluster, tiny_model_dir):
    cluster.load(str(tiny_model_dir("llama", num_layers=6)), min_stages=2, progress=False)
    full = cluster.generate("Hello", max_new_tokens=20, ignore_eos=True)
    stop = full.text[len(full.text) // 2:][:3]
    assert stop.strip(), f"greedy text too short to pick a stop string: {full.text!r}"
    cut = cluster.generate("Hello", max_new_tokens=20, stop=stop, ignore_eos=True)
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[:full.text.index(stop)]


def test_bad_requests_and_models_leave_the_cluster_usable(cluster, tiny_model_dir, tmp_path):
    good = tiny_model_dir("llama", num_layers=6)
    with pytest.raises(ModelError, match="no-such-folder"):
        cluster.load("./no-such-folder", progress=False)
    with pytest.raises(ModelError, match="not in the local Hugging Face cache|hf download"):
        cluster.load("nobody/no-such-model", progress=False)
    broken = tmp_path / "broken"
    shutil.copytree(good, broken)
    shard = sorted(broken.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(ModelError, match=shard.name):
        cluster.load(str(broken), min_stages=2, progress=False)
    corrupt = tmp_path / "corrupt"
    shutil.copytree(good, corrupt)
    shard = sorted(corrupt.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(ModelError, match=shard.name):
        cluster.load(str(corrupt), min_stages=2, progress=False)
    with pytest.raises(PlanError, match="does not fit"):
        cluster.load(str(good), max_context=2048, max_batch=10**7, progress=False)
    assert all(not s.get("loaded") for s in cluster.status()["engines"])  # nothing stays allocated
    cluster.load(str(good), min_stages=2, progress=False)
    with pytest.raises(RequestError, match="context"):
        cluster.generate([1] * 10, max_new_tokens=10**6)
    with pytest.raises(RequestError, match="temperature"):
        cluster.generate("Hi", temperature=-1)
    assert cluster.generate("Hi", max_new_tokens=3, ignore_eos=True).completion_tokens == 3


KILL_AFTER_TOKENS = 20


def test_engine_death_mid_generation_fails_over_to_the_survivors(tiny_model_dir):
    """A stage's engine SIGKILLed mid-generation: the request goes on on the two survivors with
    the tokens it would have had, and every process still ends with the cluster."""
    model_dir = str(tiny_model_dir("llama", num_layers=6))
    with exo_lab.Cluster.local(engines=3, max_cores=1) as cluster:
        cluster.load(model_dir, min_stages=3, progress=False)
        expected = cluster.generate("Hello", max_new_tokens=300, ignore_eos=True).token_ids
        victim = cluster.pipeline.engines[1]
        streamed, errors, under_way = [], [], threading.Event()

        def consume():
            try:
                for event in cluster.stream("Hello", max_new_tokens=300, ignore_eos=True):
                    streamed.extend(event.token_ids)
                    if len(streamed) >= KILL_AFTER_TOKENS:
                        under_way.set()
            except Exception as exc:  # noqa: BLE001 (reported below)
                errors.append(exc)
            under_way.set()

        thread = threading.Thread(target=consume)
        thread.start()
        assert under_way.wait(60) and not errors, errors
        os.kill(victim.pid, signal.SIGKILL)       # at least KILL_AFTER_TOKENS of 300 streamed: mid-generation
        thread.join(60)
        assert not thread.is_alive() and not errors, errors
        assert streamed == expected
        assert cluster.metrics.failovers_total == 1
        assert cluster.metrics.replayed_total == 1, "the generation ended before the engine was killed"
        assert victim.node not in [s.node for s in cluster.plan.stages] and len(cluster.plan.stages) == 2
        pids = [p.pid for p in cluster.control.call_all(engine_probe.probe_resources, False).values()]
    time.sleep(0.5)
    assert not [pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]


def test_malformed_data_plane_messages_do_not_break_the_pipeline(cluster, tiny_model_dir):
    import zmq

    cluster.load(str(tiny_model_dir("llama", num_layers=6)), min_stages=2, progress=False)
    expected = cluster.generate("Hello", max_new_tokens=6, ignore_eos=True).token_ids
    scheduler = cluster.pipeline.scheduler
    context = zmq.Context.instance()
    for address in (scheduler.outbox.address, scheduler.inbox.address):   # stage 0, the coordinator
        sock = context.socket(zmq.PUSH)
        sock.connect(address)
        sock.send_multipart([b"not a frame"])
        sock.send_multipart([b"EX" + bytes(20), b"payload"])
        sock.close(linger=1000)
    time.sleep(0.3)
    assert cluster.generate("Hello", max_new_tokens=6, ignore_eos=True).token_ids == expected
    # dropped and counted where they arrived: the coordinator's inbox and stage 0's
    assert cluster.metrics.dropped_total >= 1
    stage0 = next(row for row in cluster.status()["engines"] if row.get("stage_index") == 0)
    assert stage0["dropped_messages"] >= 1


PLAN_CONFIG = """\
cluster_name: plan_check
devices:
  - hostname: localhost
    roles: [coordinator, compute]
    address: 127.0.0.1
    engines: 2
    max_memory: 2GB
    max_cores: 1
network:
  discovery: manual
  port_range: {port}-{last}
  hop_latency_ms: 7
model: demo
max_context: 512
objective: throughput
"""


def test_the_plan_printed_is_the_plan_loaded(tmp_path):
    """`exo-lab plan` and Cluster.load resolve options (flags, config.yaml, defaults) and nodes
    the same way: hop latency, context, objective and budgets from the config included. Only
    the times differ: `exo-lab plan` has no engine to measure, so it predicts with the config's
    memory_bandwidth or the default, and the load with the speed its engines measured."""
    import json
    import subprocess
    import sys

    from ports import free_port_range

    first = free_port_range()
    config = tmp_path / "config.yaml"
    config.write_text(PLAN_CONFIG.format(port=first, last=first + 99))
    printed = subprocess.run([sys.executable, "-m", "exo_lab.cli", "plan", "--config", str(config), "--json"],
                             capture_output=True, text=True, timeout=120)
    assert printed.returncode == 0, printed.stderr
    with exo_lab.Cluster.from_config(config, profile_dir=tmp_path / "profile") as cluster:
        loaded = cluster.load(progress=False)
        assert cluster.pipeline.options.hop_ms == 7.0
        measured = [info.measured_ms for info in cluster.pipeline.engines]
    timings = ("predicted_ms_per_token", "bottleneck_ms", "ms_per_token")

    def untimed(plan: dict) -> dict:
        return {key: ([untimed(stage) for stage in value] if key == "stages" else value)
                for key, value in plan.items() if key not in timings}

    assert untimed(loaded.to_json()) == untimed(json.loads(printed.stdout))
    assert len(loaded.stages) == 2 and loaded.hop_ms == 7.0 and loaded.max_context == 512
    assert measured[0] == measured[1] and measured[0][0] > 0      # one PC: measured once, on its first engine
    layers = [s.stop_layer - s.start_layer for s in loaded.stages]
    assert [s.ms_per_token for s in loaded.stages] == pytest.approx(
        [layers[0] * measured[0][0], layers[1] * measured[0][0] + measured[0][1]], abs=1e-6)
