"""A stage never allocates past its PC's memory: each step's need against the room the PC has.

The engine checks its PC's free memory (its cgroup's where it has one) against the step's need
(:meth:`Stage.step_bytes` plus a margin) before every forward, and refuses the step with a SHORT
to the coordinator instead of allocating; the coordinator sheds KV slots (:meth:`Stage.resize_slots`,
weights kept) and replays. Here: the refusal leaves the KV untouched; the estimate bounds what a
forward really takes (the process's peak resident memory, in a fresh process); a resized stage
gives the tokens a fresh stage with that many slots gives.
"""
from __future__ import annotations

import json
import subprocess
import sys

import torch

from exo_lab.engine.worker import STEP_MARGIN_BYTES, StageWorker
from exo_lab.sampling import SamplingSettings
from exo_lab.wire import Forward, Row, Sampled, Short

from stages import generate, load_split, make_prompt

GREEDY = SamplingSettings()
MODEL = dict(hidden_size=256, intermediate_size=1024, num_attention_heads=4, num_key_value_heads=2)


class Room:
    """A PC with ``free`` bytes free (the worker reads it before each step)."""

    def __init__(self, free: int):
        self.free = free

    def free_bytes(self, enough=None) -> int:
        return self.free

    def limit_bytes(self):
        return None


def worker_with(stage, free: int) -> tuple[StageWorker, list]:
    worker = StageWorker(stage, inbox=None, stage_index=0, num_stages=1, room=Room(free))
    sent = []
    worker._send = sent.append
    return worker, sent


def test_a_step_past_the_free_memory_is_refused_before_anything_is_written(tiny_model_dir):
    stage, = load_split(tiny_model_dir(**MODEL), [(0, 4)], max_batch=2)
    prompt = make_prompt(tiny_model_dir(**MODEL), 64)
    need = stage.step_bytes(1, 64, 64) + STEP_MARGIN_BYTES
    worker, sent = worker_with(stage, need - 1)
    before = [k.clone() for k in stage.kv.keys]
    worker._handle(Forward(7, (Row(1, 0, GREEDY),), prompt))
    assert sent == [Short(7, 0, need - 1, need)] and worker.stats.refused == 1
    assert all(torch.equal(a, b) for a, b in zip(before, stage.kv.keys))       # nothing written
    worker.room.free = need
    worker._handle(Forward(8, (Row(1, 0, GREEDY),), prompt))
    assert isinstance(sent[-1], Sampled) and sent[-1].step_id == 8
    report = worker.memory_report((256, 64), 3)      # decode rows counted up to 3, the stage holds 2
    assert len(report.decode_bytes) == 3 and list(report.decode_bytes) == sorted(report.decode_bytes)
    assert report.prefill_chunks == (256, 64) and report.prefill_bytes[0] > report.prefill_bytes[1]
    assert report.prefill_bytes[0] >= stage.step_bytes(1, 256, 256) + STEP_MARGIN_BYTES
    assert report.kv_slot_bytes * 2 == stage.kv_cache_bytes() and report.slots == 2


def test_shedding_slots_keeps_the_weights_and_gives_the_tokens_of_a_stage_built_that_way(tiny_model_dir):
    folder = tiny_model_dir(**MODEL)
    stage, = load_split(folder, [(0, 4)], max_batch=4)
    weights = stage.layers[0].mlp.down_proj.weight
    full = stage.kv_cache_bytes()
    stage.resize_slots(1)
    assert stage.kv.num_slots == 1 and stage.spec.max_batch == 1 and stage.kv_cache_bytes() * 4 == full
    assert stage.layers[0].mlp.down_proj.weight is weights
    fresh, = load_split(folder, [(0, 4)], max_batch=1)
    prompt = make_prompt(folder, 12)
    assert generate([stage], prompt) == generate([fresh], prompt)


MEASURE = """
import json, sys, torch
sys.path.insert(0, {tests!r})
from stages import load_split, make_prompt
from exo_lab.engine.room import _peak_rss_bytes
torch.set_num_threads(1)
stage, = load_split({folder!r}, [(0, 4)], max_batch={rows})
stage.forward(make_prompt({folder!r}, 2), [0], [0])                 # warm: the first call's own costs
torch.manual_seed(0)
inputs = torch.randint(3, 100, ({rows}, {tokens}))
before = _peak_rss_bytes()
stage.forward(inputs, list(range({rows})), [0] * {rows})
print(json.dumps({{"peak": _peak_rss_bytes() - before, "estimate": stage.step_bytes({rows}, {tokens}, {tokens})}}))
"""


def test_the_step_estimate_bounds_what_a_forward_takes(tiny_model_dir):
    folder = str(tiny_model_dir(**MODEL))
    tests = str(__import__("pathlib").Path(__file__).parent)
    for rows, tokens in ((1, 256), (4, 128)):
        out = subprocess.run([sys.executable, "-c", MEASURE.format(tests=tests, folder=folder, rows=rows, tokens=tokens)],
                             capture_output=True, text=True, timeout=120, check=True).stdout
        figures = json.loads(out.splitlines()[-1])
        print(rows, tokens, figures)
        assert figures["peak"] <= figures["estimate"] + 2**20, figures     # 1 MiB: Python objects
        assert figures["estimate"] <= 2 * figures["peak"], figures      # a bound, not a wild guess
