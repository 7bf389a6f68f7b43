"""SmolLM2-135M-Instruct (model id "smollm2", the demo's default) on a real 3-engine cluster:
greedy tokens exactly as one transformers process makes them, over 3 and over 2 stages, and a
sensible answer through the OpenAI API with the official client. Over 2 stages the model is
loaded with speculative decoding, a draft model (SmolLM2 itself at int8, on the coordinator)
drafting by default and prompt lookup asked for per request: an editing prompt (whose answer
copies the prompt) and an open one get their drafts accepted and still exactly transformers'
greedy tokens, seeded sampling gives exactly the tokens of plain decoding, and sampling follows
the model's own probabilities (the statistical check of test_sampling).

The model folder is built once into the exo-lab cache (tests/test_smollm2.py says how); each
load here takes 10-20 s on 2 cores, so the module loads twice and keeps generations short.
"""
from __future__ import annotations

import gc

import pytest
import torch

import exo_lab
from exo_lab.weights.resolve import resolve_model
from exo_lab.weights.smollm2 import smollm2_gguf_dir, smollm2_model_dir

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

MESSAGES = [{"role": "user", "content": "Write a short poem about computers that work together."}]
NEW_TOKENS = 20
EDIT = [{"role": "user", "content": "Rewrite the text below with 'cat' replaced by 'dog'. Change nothing else.\n\n"
         "The cat sat on the warm PC. Every morning the cat watched the fans spin, and every night "
         "the cat slept on the keyboard of the busiest machine in the office."}]
EDIT_TOKENS = 40


@pytest.fixture(scope="module")
def model_dir():
    return smollm2_model_dir(progress=False)


@pytest.fixture(scope="module")
def references(model_dir):
    """{messages' name: (prompt ids, greedy new tokens)} from one process of plain transformers.
    Every step takes the argmax and goes on past end-of-sequence, as exo-lab does with ignore_eos."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    out = {}
    for name, messages, new_tokens in (("poem", MESSAGES, NEW_TOKENS), ("edit", EDIT, EDIT_TOKENS)):
        prompt_ids = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"])
        tokens = []
        with torch.no_grad():
            output = model(torch.tensor([prompt_ids]), use_cache=True)
            for _ in range(new_tokens):
                tokens.append(int(output.logits[0, -1].argmax()))
                output = model(torch.tensor([[tokens[-1]]]), cache=output.cache, use_cache=True)
        out[name] = prompt_ids, tokens
    del model
    gc.collect()
    return out


@pytest.fixture(scope="module")
def reference(references):
    return references["poem"]


@pytest.fixture(scope="module")
def cluster():
    with exo_lab.Cluster.local(engines=3, max_cores=1) as started:
        yield started


SPECULATION = {3: "off", 2: "draft_model"}    # how each split is loaded


def load(cluster, stages: int):
    """SmolLM2 over exactly ``stages`` stages, speculating as SPECULATION says (kept loaded when
    it already is)."""
    if not (cluster.loaded and len(cluster.plan.stages) == stages):
        # float32: the GGUF's blocks dequantized, exactly the weights of the float32 folder
        cluster.load("smollm2", dtype="float32", min_stages=stages, speculation=SPECULATION[stages], progress=False)
    assert len(cluster.plan.stages) == stages
    assert cluster.pipeline.options.speculation == SPECULATION[stages]
    return cluster.plan


def test_smollm2_resolves_to_the_cached_folder():
    assert resolve_model("smollm2") == smollm2_gguf_dir()


@pytest.mark.parametrize("stages", [3, 2])
def test_greedy_tokens_match_one_process(cluster, reference, stages):
    prompt_ids, expected = reference
    plan = load(cluster, stages)
    assert plan.stages[-1].stop_layer == 30
    assert cluster.encode_chat(MESSAGES) == prompt_ids
    result = cluster.generate(prompt_ids, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    assert result.token_ids == expected


def test_a_draft_model_drafts_open_chat_and_keeps_transformers_greedy_tokens(cluster, references):
    prompt_ids, expected = references["poem"]
    load(cluster, 2)
    metrics = cluster.metrics
    accepted, rows, seconds = metrics.draft_accepted_total, metrics.verify_rows_total, metrics.draft_seconds_total
    fast = cluster.generate(prompt_ids, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    accepted, rows = metrics.draft_accepted_total - accepted, metrics.verify_rows_total - rows
    assert fast.token_ids == expected
    # an open prompt has nothing to copy: these drafts came from the draft model
    assert accepted >= NEW_TOKENS // 2 and rows <= NEW_TOKENS // 2, (accepted, rows)
    assert metrics.draft_seconds_total > seconds
    assert cluster.pipeline.scheduler.drafting.model.dtype == "int8"


def test_speculation_accepts_drafts_of_an_edit_and_keeps_transformers_greedy_tokens(cluster, references):
    prompt_ids, expected = references["edit"]
    load(cluster, 2)
    metrics = cluster.metrics
    accepted, rows = metrics.draft_accepted_total, metrics.verify_rows_total
    fast = cluster.generate(prompt_ids, max_new_tokens=EDIT_TOKENS, ignore_eos=True, speculative="prompt_lookup")
    accepted, rows = metrics.draft_accepted_total - accepted, metrics.verify_rows_total - rows
    assert accepted >= EDIT_TOKENS // 4 and rows < EDIT_TOKENS - accepted // 2, (accepted, rows)
    assert fast.token_ids == expected
    plain = cluster.generate(prompt_ids, max_new_tokens=EDIT_TOKENS, ignore_eos=True, speculative=False)
    assert plain.token_ids == expected
    # shown where people look: the widget's and dashboard's line, and /metrics
    from prometheus_client import CollectorRegistry, generate_latest

    from exo_lab.coordinator.metrics import MetricsCollector
    from exo_lab.notebook.formatting import metrics_line

    assert "of drafts accepted" in metrics_line(metrics.snapshot())
    registry = CollectorRegistry()
    registry.register(MetricsCollector(cluster.metrics_source))
    exported = generate_latest(registry).decode()
    assert f'exo_lab_draft_tokens_accepted_total{{model="smollm2"}} {float(metrics.draft_accepted_total)}' in exported


def test_two_requests_verified_in_one_step_each_get_transformers_tokens(cluster, references):
    """One micro-batch: both rows of a step verify together, drafts of different lengths (from
    prompt lookup for one, the draft model for the other) padded."""
    import asyncio

    from exo_lab.sampling import SamplingParams

    load(cluster, 2)
    scheduler = cluster.pipeline.scheduler
    before, scheduler.micro_batches = scheduler.micro_batches, 1
    rows = cluster.metrics.verify_rows_total

    async def tokens(name: str, count: int, drafter: str) -> list[int]:
        out = []
        params = SamplingParams(max_new_tokens=count, ignore_eos=True, speculative=drafter)
        async for event in cluster.astream(references[name][0], params):
            out += event.token_ids
        return out

    async def both():
        return await asyncio.gather(tokens("edit", EDIT_TOKENS, "prompt_lookup"),
                                    tokens("poem", NEW_TOKENS, "draft_model"))

    try:
        edit, poem = cluster.run_coroutine(both())
    finally:
        scheduler.micro_batches = before
    assert edit == references["edit"][1] and poem == references["poem"][1]
    assert cluster.metrics.verify_rows_total > rows


@pytest.mark.parametrize("drafter", ["prompt_lookup", "draft_model"])
def test_seeded_sampling_with_speculation_gives_the_tokens_of_plain_decoding(cluster, references, drafter):
    """Each position draws from (seed, position), a draft is kept only when it equals that draw:
    standard speculative sampling for a deterministic drafter, token for token the plain draws."""
    prompt_ids, _ = references["edit"]
    load(cluster, 2)
    accepted = cluster.metrics.draft_accepted_total
    settings = dict(max_new_tokens=EDIT_TOKENS, ignore_eos=True, temperature=0.5, seed=1)
    fast = cluster.generate(prompt_ids, speculative=drafter, **settings)
    assert cluster.metrics.draft_accepted_total > accepted
    assert fast.token_ids == cluster.generate(prompt_ids, speculative=False, **settings).token_ids


def test_sampling_with_speculation_follows_the_models_distribution(cluster, references, model_dir):
    """The statistical check of test_sampling.py (sampling_stats), with drafts being accepted
    (from prompt lookup and from the draft model, 3 answers each): every decode step's token
    against transformers' own probabilities at that step."""
    from transformers import AutoModelForCausalLM

    from sampling_stats import Draws

    prompt_ids, _ = references["edit"]
    load(cluster, 2)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    draws = Draws()
    accepted = {"prompt_lookup": 0, "draft_model": 0}
    for seed in range(6):
        drafter = ("prompt_lookup", "draft_model")[seed % 2]
        before = cluster.metrics.draft_accepted_total
        tokens = cluster.generate(prompt_ids, max_new_tokens=EDIT_TOKENS, ignore_eos=True, temperature=0.8,
                                  seed=100 + seed, speculative=drafter).token_ids
        accepted[drafter] += cluster.metrics.draft_accepted_total - before
        with torch.no_grad():
            logits = model(torch.tensor([prompt_ids + tokens])).logits[0, len(prompt_ids) - 1:-1]
        draws.add(tokens, logits, 0.8)
    del model
    gc.collect()
    draws.check()
    assert min(accepted.values()) >= EDIT_TOKENS // 2, accepted       # both drafters really ran


def test_openai_client_gets_a_sensible_answer(cluster):
    import openai

    load(cluster, 2)
    server = cluster.serve(host="127.0.0.1", port=0, api_key="sk-smollm2-test")
    try:
        with openai.OpenAI(base_url=server.url + "/v1", api_key="sk-smollm2-test", max_retries=0,
                           timeout=120) as client:
            answer = client.chat.completions.create(
                model="smollm2", messages=[{"role": "user", "content": "Tell me the capital of France."}],
                max_tokens=16, temperature=0)
    finally:
        server.stop()
    choice = answer.choices[0]
    assert choice.message.content == "The capital of France is Paris."
    assert choice.finish_reason == "stop"
