"""Fine-tuning LoRA adapters through the stages, and serving them, against transformers + peft.

The reference is a single-process transformers + peft model trained on the same batches (the
job's own schedule, ``training_data.batch_at``: what is tested is the arithmetic through the
stages, not the data order) with torch's AdamW and clip_grad_norm_: per-step losses and the
final adapter must agree to float32 rounding. Served adapters are checked against peft's own
generation, and rows of different adapters sharing one batch against each running alone.
"""
from __future__ import annotations

import concurrent.futures
import os
import signal

import pytest
import torch
import torch.nn.functional as F

import exo_lab
from exo_lab.coordinator import training_data
from exo_lab.engine.training import TRAINING_SLACK_BYTES
from exo_lab.errors import ModelError, RequestError

import peft  # noqa: E402  (the reference: installed with .[test])

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ROWS = [{"prompt": f"Question {i}: what is the code?", "completion": f" The code is {i * 7} zebra."} for i in range(10)]
SETTINGS = dict(batch_size=4, micro_batch_size=2, epochs=2, learning_rate=5e-3, seed=3, weight_decay=0.01,
                max_grad_norm=0.5, lr_schedule="linear", warmup_steps=1)
LOSS_RTOL = 1e-6          # measured: 0.0 (bit-equal) on this machine
ADAPTER_ATOL = 1e-6       # measured: 7.5e-9 after 6 steps, weights up to 0.14


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir(num_layers=4)


@pytest.fixture(scope="module")
def peft_init(model_dir, tmp_path_factory):
    """A peft LoRA adapter as peft initialises it, with B made non-zero (so every product
    matters from the first step), saved with save_pretrained."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                                peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    folder = tmp_path_factory.mktemp("peft-init")
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def cluster(model_dir):
    with exo_lab.Cluster.local(engines=2, max_cores=1) as started:
        started.load(str(model_dir), dtype="float32", min_stages=2, progress=False)
        yield started


@pytest.fixture(scope="module")
def trained(cluster, peft_init, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained")
    job = cluster.finetune(ROWS, name="codes", output_dir=out, init_from=peft_init, save_every=2, **SETTINGS)
    return job.wait(300)


def peft_reference(model_dir, init, examples, total_steps, recorded=None):
    """Train peft's model from ``init`` on the job's batches; (losses, peft model)."""
    from transformers import AutoModelForCausalLM

    model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                                           init, is_trainable=True)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=0.0, weight_decay=SETTINGS["weight_decay"])
    losses = []
    for step in range(total_steps):
        batch = training_data.batch_at(examples, step, SETTINGS["batch_size"], SETTINGS["seed"])
        scale = 1.0 / sum(e.target_count for e in batch)
        total = 0.0
        for ids, targets in training_data.micro_batches(batch, SETTINGS["micro_batch_size"], 0):
            logits = model(input_ids=ids).logits.float()
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.long().reshape(-1),
                                   ignore_index=-100, reduction="sum") * scale
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(params, SETTINGS["max_grad_norm"])
        for group in optimizer.param_groups:
            group["lr"] = training_data.learning_rate(step, total_steps, SETTINGS["learning_rate"], "linear", 1)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(total)
    return losses, model


def saved_adapter(folder) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def test_training_through_two_stages_matches_transformers_and_peft(cluster, trained, model_dir, peft_init):
    examples, _ = training_data.tokenize(ROWS, cluster.tokenizer, 512)
    reference, model = peft_reference(model_dir, peft_init, examples, trained.total_steps)
    assert trained.status == "done" and trained.total_steps == 6 and len(trained.history) == 6
    assert trained.losses == pytest.approx(reference, rel=LOSS_RTOL, abs=0)
    assert trained.losses[-1] < trained.losses[0] - 1.0            # it learned something
    ours = saved_adapter(trained.output_dir)
    theirs = peft.get_peft_model_state_dict(model)
    assert set(ours) == set(theirs) and len(ours) == 4 * len(TARGETS) * 2
    assert max((ours[k] - theirs[k]).abs().max().item() for k in theirs) <= ADAPTER_ATOL
    # the init moved: an adapter equal to its start would pass the comparison above vacuously
    assert max((ours[k] - saved_adapter(peft_init)[k]).abs().max().item() for k in ours) > 1e-3
    # checkpoints every 2 steps, each loadable by peft
    assert [p.name for p in trained.checkpoints] == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    from transformers import AutoModelForCausalLM

    loaded = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                                            trained.output_dir)
    ids = torch.tensor([examples[0].ids])
    assert torch.allclose(loaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-4)


def test_recomputing_activations_gives_the_same_steps(cluster, trained, peft_init, tmp_path):
    job = cluster.finetune(ROWS, name="codes-recompute", output_dir=tmp_path, init_from=peft_init, recompute=True,
                           **SETTINGS).wait(300)
    assert job.recompute is True
    assert job.losses == pytest.approx(trained.losses, rel=LOSS_RTOL, abs=0)
    ours, before = saved_adapter(tmp_path), saved_adapter(trained.output_dir)
    assert max((ours[k] - before[k]).abs().max().item() for k in ours) <= ADAPTER_ATOL
    cluster.remove_adapter("codes-recompute")


def test_the_served_adapter_answers_as_peft_generates(cluster, trained, model_dir):
    """The adapter is served by name as soon as the job ends; greedy tokens equal peft's."""
    from transformers import AutoModelForCausalLM

    assert "codes" in cluster.adapters.names()
    model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                                           trained.output_dir).eval()
    prompt = cluster.tokenizer(ROWS[3]["prompt"], add_special_tokens=True)["input_ids"]
    with torch.no_grad():
        expected = model.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False,
                                  attention_mask=torch.ones(1, len(prompt), dtype=torch.long))[0, len(prompt):].tolist()
    got = cluster.generate(prompt, max_new_tokens=10, ignore_eos=True, adapter="codes").token_ids
    base = cluster.generate(prompt, max_new_tokens=10, ignore_eos=True).token_ids
    assert got == expected and got != base


def test_requests_for_different_adapters_share_a_batch_through_the_api(cluster, trained, peft_init):
    import openai
    from ports import free_port

    cluster.add_adapter("start", peft_init)           # a second adapter: peft's init (B non-zero)
    server = cluster.serve(port=free_port())
    try:
        models = {m.id: m for m in openai.OpenAI(base_url=server.url + "/v1", api_key="x").models.list().data}
        assert {"codes", "start", cluster.model_id} <= set(models)
        names = [cluster.model_id, "codes", "start"] * 2
        prompts = [ROWS[i]["prompt"] for i in range(len(names))]

        def ask(name, prompt):
            with openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0) as client:
                reply = client.completions.create(model=name, prompt=prompt, max_tokens=12, temperature=0)
                return reply.choices[0].text

        alone = [ask(n, p) for n, p in zip(names, prompts)]
        with concurrent.futures.ThreadPoolExecutor(len(names)) as pool:
            together = list(pool.map(ask, names, prompts))
        assert together == alone
        from exo_lab.engine import training

        mixed = sum(cluster.control.call(e.engine_id, training.adapter_status)["mixed_steps"]
                    for e in cluster.pipeline.engines)
        assert mixed > 0, "no step ran rows of different adapters together"
        # the adapters change the answers (else the comparison above proves nothing)
        assert len({alone[0], alone[1], alone[2]}) == 3
        with pytest.raises(openai.NotFoundError):
            ask("no-such-adapter", "hi")
    finally:
        server.stop()
        cluster.remove_adapter("start")


def test_a_stage_killed_mid_training_resumes_from_its_checkpoint(model_dir, trained, peft_init, tmp_path):
    """Engine of stage 1 killed after step 3: the job goes back to checkpoint-2 on the engines
    left (the supervisor re-plans: one stage) and its final adapter equals the uninterrupted run's."""
    with exo_lab.Cluster.local(engines=2, max_cores=1) as cluster:
        cluster.load(str(model_dir), dtype="float32", min_stages=2, progress=False)
        victim = cluster.pipeline.engines[1].pid
        job = cluster.finetune(ROWS, name="codes", output_dir=tmp_path, init_from=peft_init, save_every=2,
                               **SETTINGS)
        killed = []

        def strike(j):
            if len(j.history) == 3 and not killed:     # step 4's batch meets the dead stage
                killed.append(victim)
                os.kill(victim, signal.SIGKILL)

        job._listeners.append(strike)
        job.wait(300)
        assert killed and job.resumes == 1
        assert victim not in {e.pid for e in cluster.pipeline.engines}
        assert [h["step"] for h in job.history] == [1, 2, 3, 4, 5, 6]
        assert job.losses == pytest.approx(trained.losses, rel=1e-6, abs=0)
        ours, uninterrupted = saved_adapter(tmp_path), saved_adapter(trained.output_dir)
        assert max((ours[k] - uninterrupted[k]).abs().max().item() for k in ours) <= ADAPTER_ATOL
        assert cluster.generate("Question 1:", max_new_tokens=4, adapter="codes").token_ids


def test_bad_training_input_says_what_to_fix(cluster, tmp_path):
    def refused(data, match, **options):
        with pytest.raises(ModelError, match=match):
            cluster.finetune(data, name="bad", output_dir=tmp_path, **options)

    refused([[{"role": "user", "content": "hi"}]], "has no assistant message")
    refused([{"question": "x"}], "not a chat")
    refused(ROWS, "unknown option", epoch=3)
    refused(ROWS, "micro_batch_size .* cannot exceed batch_size", batch_size=2, micro_batch_size=4)
    refused(ROWS, "LoRA target modules", target_modules=["lm_head"])
    refused(ROWS, "learning_rate must be in", learning_rate=5)
    refused(str(tmp_path / "missing.jsonl"), "is not a file")
    (tmp_path / "broken.jsonl").write_text('{"text": "fine"}\n{not json\n')
    refused(str(tmp_path / "broken.jsonl"), "line 2 is not JSON")
    refused(ROWS, "is not a fine-tuning checkpoint", resume_from=tmp_path)
    with pytest.raises(ModelError, match="is not a LoRA adapter folder"):
        cluster.add_adapter("x", tmp_path)
    with pytest.raises(RequestError, match="no adapter named 'nope'"):
        cluster.generate("hi", adapter="nope")


def test_chats_learn_only_their_assistant_turns(cluster):
    tokenizer = cluster.tokenizer
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of Mars?"},
            {"role": "assistant", "content": "Olympus City."}, {"role": "user", "content": "And its moon?"},
            {"role": "assistant", "content": "Phobos Base."}]
    (example,), skipped = training_data.tokenize([{"messages": chat}], tokenizer, 512)
    learned = tokenizer.decode([t for t in example.targets if t != training_data.IGNORE])
    assert learned == "Olympus City.<|im_end|>\nPhobos Base.<|im_end|>\n" and skipped == 0
    # a DataFrame of the same rows gives the same examples
    import pandas
    frame = pandas.DataFrame(ROWS)
    assert training_data.tokenize(training_data.rows_of(frame), tokenizer, 512) == \
        training_data.tokenize(ROWS, tokenizer, 512)
    # truncation leaves nothing to learn: refused
    with pytest.raises(ModelError, match="none of the 1 training rows has a token to learn"):
        training_data.tokenize([{"messages": chat}], tokenizer, 5)


TRAIN_MEASURE = """
import json, sys, torch
import torch.nn.functional as F
sys.path.insert(0, {tests!r})
from stages import load_split
from exo_lab.control_types import LoraSettings
from exo_lab.engine.room import _peak_rss_bytes
from exo_lab.engine.training import training_bytes
from exo_lab.model import lora
torch.set_num_threads(1)
first, last = load_split({folder!r}, [(0, 2), (2, 4)])
settings = LoraSettings(r=8)
stage = first if {first} else last
params = lora.init_adapter(stage, 1, settings, 0)
lora.wrap(stage).train = 1
optimizer = torch.optim.AdamW(params, lr=1e-3)
hidden = stage.stage_config.hidden_size
def batch(rows={rows}, length={length}):
    return torch.randint(3, 100, (rows, length)) if {first} else torch.randn(rows, length, hidden, requires_grad=True)
stage.train_forward(batch(1, 8))                    # warm: the first call's own costs, not its size
before = _peak_rss_bytes()
for step in range(2):
    kept = [stage.train_forward(batch()) for _ in range({in_flight})]
    for out in kept:
        if {first}:
            out.backward(torch.randn_like(out))
        else:
            F.cross_entropy(out.reshape(-1, out.shape[-1]), torch.randint(3, 100, ({rows} * {length},)),
                            reduction="sum").backward()
    optimizer.step()
    optimizer.zero_grad()
print(json.dumps({{"peak": _peak_rss_bytes() - before,
                   "estimate": training_bytes(stage, {rows}, {length}, {in_flight}, False, settings)}}))
"""


def test_the_training_estimate_bounds_what_a_stage_takes(tiny_model_dir):
    """What start_training checks against the PC's free memory bounds a stage's real peak
    (a fresh process per case; first stage with 2 micro-batches kept, last stage with 1)."""
    import json
    import pathlib
    import subprocess
    import sys

    folder = str(tiny_model_dir(hidden_size=256, intermediate_size=1024, num_attention_heads=4, num_key_value_heads=2))
    tests = str(pathlib.Path(__file__).parent)
    for first, rows, length, in_flight in ((True, 2, 256, 2), (False, 2, 256, 1), (True, 4, 128, 1)):
        script = TRAIN_MEASURE.format(tests=tests, folder=folder, first=first, rows=rows, length=length,
                                      in_flight=in_flight)
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                             check=True).stdout
        figures = json.loads(out.splitlines()[-1])
        print(first, rows, length, in_flight, figures)
        assert figures["peak"] <= figures["estimate"], figures
        # a bound, not a wild guess (beyond the fixed allocator slack; measured 1.1-1.4x on SmolLM2,
        # up to 3.4x on this small model)
        assert figures["estimate"] - TRAINING_SLACK_BYTES <= 4 * figures["peak"], figures


def test_a_job_resumed_from_a_checkpoint_ends_as_the_uninterrupted_run(cluster, trained, tmp_path):
    job = cluster.finetune(ROWS, name="codes-resumed", output_dir=tmp_path, resume_from=trained.checkpoints[1],
                           r=4, alpha=8, **SETTINGS).wait(300)
    assert [h["step"] for h in job.history] == [5, 6]
    assert job.losses == pytest.approx(trained.losses[4:], rel=LOSS_RTOL, abs=0)
    ours, uninterrupted = saved_adapter(tmp_path), saved_adapter(trained.output_dir)
    assert max((ours[k] - uninterrupted[k]).abs().max().item() for k in ours) <= ADAPTER_ATOL
    cluster.remove_adapter("codes-resumed")


def test_a_stopped_job_keeps_its_checkpoints_and_serves_nothing(cluster, tmp_path):
    job = cluster.finetune(ROWS, name="stopped", output_dir=tmp_path, max_steps=500, batch_size=2,
                           micro_batch_size=1, save_every=2)
    job._listeners.append(lambda j: j.step >= 3 and j.stop(wait=False))
    job.wait(120)
    assert job.status == "stopped" and 3 <= job.step < 500
    assert (tmp_path / "checkpoint-2" / "adapter_model.safetensors").is_file()
    assert "stopped" not in cluster.adapters.names()


def test_memory_for_training_is_checked_before_the_first_step():
    from exo_lab.engine.training import plan_memory

    assert plan_memory(free=100, need=80, lean=30, recompute=None) == (False, 80)
    assert plan_memory(free=100, need=180, lean=30, recompute=None) == (True, 30)    # recomputes to fit
    assert plan_memory(free=100, need=80, lean=30, recompute=True) == (True, 30)
    with pytest.raises(ModelError, match="needs about 0 MiB beyond its weights even recomputing"):
        plan_memory(free=100, need=300, lean=200, recompute=None)
    with pytest.raises(ModelError, match="needs about 0 MiB beyond its weights and its PC has"):
        plan_memory(free=100, need=180, lean=30, recompute=False)


@pytest.mark.parametrize("dtype", ["bfloat16", "int8", "int4"])
def test_frozen_bases_of_every_kind_pass_the_activations_gradient(dtype, model_dir):
    """A bfloat16 (exo-lab kernel), int8 or 4-bit base linear wrapped for training: the gradient it
    passes upstream is grad @ W for its dense weight, as an autograd-visible linear's."""
    from stages import load_split

    from exo_lab.control_types import LoraSettings
    from exo_lab.model import lora

    stage, = load_split(model_dir, [(0, 4)], dtype=dtype)
    lora.init_adapter(stage, 1, LoraSettings(r=4, targets=("q_proj", "down_proj")), seed=0)
    lora.wrap(stage).train = 1
    for module in (stage.layers[0].self_attn.q_proj, stage.layers[1].mlp.down_proj):
        assert isinstance(module, lora.LoraLinear) and type(module.base) is not torch.nn.Linear
        x = torch.randn(2, 5, module.in_features, dtype=torch.bfloat16, requires_grad=True)
        grad = torch.randn(2, 5, module.out_features, dtype=torch.bfloat16)
        module(x).backward(grad)
        A, B, scaling = module.adapters[1]
        dense = lora.dense_weight(module.base).float()
        expected = grad.float() @ (dense + scaling * B.detach().float() @ A.detach().float())
        assert torch.allclose(x.grad.float(), expected, rtol=0.03, atol=0.03), (x.grad.float() - expected).abs().max()
        assert A.grad is not None and B.grad is not None


@pytest.mark.parametrize("dtype", ["bfloat16", "int8", "int4"])
def test_bfloat16_int8_and_4bit_stages_learn(dtype, model_dir, tmp_path):
    with exo_lab.Cluster.local(engines=1, max_cores=1) as one:
        one.load(str(model_dir), dtype=dtype, progress=False)
        job = one.finetune(ROWS, name=f"codes-{dtype}", output_dir=tmp_path, r=8, alpha=16, epochs=3,
                           batch_size=5, micro_batch_size=5, learning_rate=1e-2, lr_schedule="constant").wait(300)
        assert job.losses[-1] < job.losses[0] - 1.0, job.losses
        prompt = one.tokenizer(ROWS[2]["prompt"])["input_ids"]
        assert one.generate(prompt, max_new_tokens=6, adapter=f"codes-{dtype}").token_ids != \
            one.generate(prompt, max_new_tokens=6).token_ids


def test_the_plan_says_when_fine_tuning_does_not_fit(model_dir):
    """Before any engine is asked: what training needs on each stage against what the plan left
    on its node; the estimate is the one each engine checks (the same function)."""
    from types import SimpleNamespace

    from stages import load_split

    from exo_lab.control_types import LoraSettings
    from exo_lab.coordinator.finetune import FineTuneSettings, plan_memory
    from exo_lab.engine.training import training_bytes
    from exo_lab.planning.planner import StagePlan

    def stage_plan(node, start, stop, head, spare):
        return StagePlan(node=node, start_layer=start, stop_layer=stop, has_embeddings=start == 0, has_head=head,
                         weights_bytes=1, kv_cache_bytes=1, workspace_bytes=2**20, overhead_bytes=1,
                         total_bytes=10 * 2**30, budget_bytes=10 * 2**30 + spare, ms_per_token=1.0)

    settings = FineTuneSettings(lora=LoraSettings(r=8), micro_batch_size=2)
    roomy = SimpleNamespace(model_dir=model_dir, plan=SimpleNamespace(
        stages=(stage_plan("system-b", 0, 2, False, 2**30), stage_plan("system-c", 2, 4, True, 2**30))))
    rows = plan_memory(roomy, settings, longest=64)
    assert [r["node"] for r in rows] == ["system-b", "system-c"] and all(r["need_bytes"] < 2**30 for r in rows)
    assert all(r["lean_bytes"] < r["need_bytes"] for r in rows)
    # system-c leaves room only for recomputed activations: fine, unless recomputing is refused
    lean = rows[1]["lean_bytes"]
    tight = SimpleNamespace(model_dir=model_dir, plan=SimpleNamespace(
        stages=(stage_plan("system-b", 0, 2, False, 2**30), stage_plan("system-c", 2, 4, True, lean))))
    plan_memory(tight, settings, longest=64)
    with pytest.raises(ModelError, match=r"stage 1 \(system-c, layers \[2, 4\)\) needs about \d+ MiB beyond what it "
                                         r"holds for serving \(micro-batches of 2 x 64 tokens, 2 in flight\)"):
        plan_memory(tight, FineTuneSettings(lora=LoraSettings(r=8), micro_batch_size=2, recompute=False), longest=64)
    full = SimpleNamespace(model_dir=model_dir, plan=SimpleNamespace(
        stages=(stage_plan("system-b", 0, 2, False, 2**20), stage_plan("system-c", 2, 4, True, 2**30))))
    with pytest.raises(ModelError, match="stage 0 .* even recomputing activations .* leaves 1 MiB: lower micro_batch_size"):
        plan_memory(full, settings, longest=64)
    # the engine's figure for a real stage is the same function's
    first, last = load_split(model_dir, [(0, 2), (2, 4)])
    from exo_lab.engine.training import estimate_training_bytes
    from exo_lab.weights.resolve import read_model_config

    config = read_model_config(model_dir)
    for stage in (first, last):
        assert training_bytes(stage, 2, 64, 2, False, settings.lora) == estimate_training_bytes(
            config, 2, stage.spec.is_last, settings.lora, 2, 64, 2, False, stage.step_bytes(2, 64, 64))
