"""SmolLM2-135M-Instruct (model id "smollm2", the demo's default) on a real 3-engine cluster:
greedy tokens exactly as one transformers process makes them, over 3 and over 2 stages, and a
sensible answer through the OpenAI API with the official client.

The model folder is built once into the exo-lab cache (tests/test_smollm2.py says how); each
load here takes 10-20 s on 2 cores, so the module loads twice and keeps generations short.
"""
from __future__ import annotations

import gc

import pytest
import torch

import exo_lab
from exo_lab.weights.resolve import resolve_model
from exo_lab.weights.smollm2 import smollm2_model_dir

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

MESSAGES = [{"role": "user", "content": "Write a short poem about computers that work together."}]
NEW_TOKENS = 20


@pytest.fixture(scope="module")
def model_dir():
    return smollm2_model_dir(progress=False)


@pytest.fixture(scope="module")
def reference(model_dir):
    """(prompt ids, greedy new tokens) from one process of plain transformers. Every step takes
    the argmax and goes on past end-of-sequence, as exo-lab does with ignore_eos."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    prompt_ids = list(tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)["input_ids"])
    tokens = []
    with torch.no_grad():
        output = model(torch.tensor([prompt_ids]), use_cache=True)
        for _ in range(NEW_TOKENS):
            tokens.append(int(output.logits[0, -1].argmax()))
            output = model(torch.tensor([[tokens[-1]]]), cache=output.cache, use_cache=True)
    del model
    gc.collect()
    return prompt_ids, tokens


@pytest.fixture(scope="module")
def cluster():
    with exo_lab.Cluster.local(engines=3, max_cores=1) as started:
        yield started


def load(cluster, stages: int):
    """SmolLM2 over exactly ``stages`` stages (kept loaded when it already is)."""
    if not (cluster.loaded and len(cluster.plan.stages) == stages):
        cluster.load("smollm2", min_stages=stages, progress=False)
    assert len(cluster.plan.stages) == stages
    return cluster.plan


def test_smollm2_resolves_to_the_cached_folder(model_dir):
    assert resolve_model("smollm2") == model_dir


@pytest.mark.parametrize("stages", [3, 2])
def test_greedy_tokens_match_one_process(cluster, reference, stages):
    prompt_ids, expected = reference
    plan = load(cluster, stages)
    assert plan.stages[-1].stop_layer == 30
    assert cluster.encode_chat(MESSAGES) == prompt_ids
    result = cluster.generate(prompt_ids, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    assert result.token_ids == expected


def test_openai_client_gets_a_sensible_answer(cluster):
    import openai

    load(cluster, 2)
    server = cluster.serve(host="127.0.0.1", port=0, api_key="sk-smollm2-test")
    try:
        with openai.OpenAI(base_url=server.url + "/v1", api_key="sk-smollm2-test", max_retries=0,
                           timeout=120) as client:
            answer = client.chat.completions.create(
                model="smollm2", messages=[{"role": "user", "content": "What is the capital of France?"}],
                max_tokens=16, temperature=0)
    finally:
        server.stop()
    choice = answer.choices[0]
    assert choice.message.content == "The capital of France is Paris."
    assert choice.finish_reason == "stop"
