"""Sampling: the sampler alone, then sampled tokens through real clusters checked against the
reference model's own probabilities at every decode step.

The statistical tests (tests/sampling_stats.py) compare, over many sampled steps, the sum of an
observed quantity (the sampled token's log-probability; whether it was the argmax) with its
expectation under the reference model's distribution at that step, in standard deviations (z). A
pipeline that samples only the first token and then decodes greedily (the bug these tests are
named after) gives an argmax rate of 1 and z-scores above 10.
"""
from __future__ import annotations

import struct

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

import exo_lab
from exo_lab.errors import RequestError
from sampling_stats import Draws
from exo_lab.sampling import (GREEDY_BELOW_TEMPERATURE, SamplingParams, SamplingSettings, sample_token,
                              step_seed)

PROMPT = [11, 402, 77, 963, 5, 1210, 88, 300]
NEW_TOKENS = 24
SEEDS = range(10)


# ----------------------------------------------------------------------------- the sampler

def test_greedy_breaks_ties_to_the_lowest_id():
    logits = torch.tensor([[0.5, 3.0, -1.0, 3.0]])
    assert sample_token(logits, SamplingSettings(), position=0) == 1


def test_a_temperature_below_the_floor_is_greedy():
    logits = torch.tensor([0.0, 1.0, 0.5])
    tiny = SamplingSettings(temperature=1e-38, seed=1)
    assert tiny.greedy and GREEDY_BELOW_TEMPERATURE > 1e-38
    assert {sample_token(logits, tiny, p) for p in range(50)} == {1}


def test_the_draw_depends_on_seed_and_position_only():
    logits = torch.zeros(1000)
    settings = SamplingSettings(temperature=1.0, seed=7)
    first = [sample_token(logits, settings, p) for p in range(30)]
    assert first == [sample_token(logits, settings, p) for p in range(30)]
    assert len(set(first)) > 20                                     # positions draw independently
    other = [sample_token(logits, SamplingSettings(temperature=1.0, seed=8), p) for p in range(30)]
    assert other != first
    assert len({step_seed(7, p) for p in range(1000)}) == 1000


@pytest.mark.parametrize("top_k, top_p", [(3, 1.0), (0, 0.6), (5, 0.3), (0, 1.0)])
def test_draws_come_only_from_the_hf_filtered_set(top_k, top_p):
    logits = torch.randn(1, 12, generator=torch.Generator().manual_seed(3))   # (1, vocab)
    kept = logits / 0.8
    if top_k:
        kept = TopKLogitsWarper(top_k)(None, kept)
    if top_p < 1.0:
        kept = TopPLogitsWarper(top_p)(None, kept)
    allowed = set(torch.nonzero(kept[0] > float("-inf")).flatten().tolist())
    settings = SamplingSettings(temperature=0.8, top_p=top_p, top_k=top_k, seed=4)
    assert {sample_token(logits, settings, p) for p in range(1000)} == allowed


@pytest.mark.parametrize("kwargs, param", [
    (dict(temperature=-0.1), "temperature"), (dict(temperature=2.5), "temperature"),
    (dict(temperature=float("nan")), "temperature"), (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"), (dict(top_k=-1), "top_k"), (dict(seed=-2**63 - 1), "seed"),
    (dict(seed=2**64), "seed"), (dict(seed=1.0), "seed"), (dict(top_k=1.5), "top_k")])
def test_one_validation_for_every_caller(kwargs, param):
    with pytest.raises(RequestError) as info:
        SamplingSettings(**kwargs)
    assert info.value.param == param
    with pytest.raises(RequestError):
        SamplingParams(**kwargs)


# ----------------------------------------------------------------------------- through clusters

@pytest.fixture(scope="module", params=[2, 3], ids=["2-engines", "3-engines"])
def sampling_cluster(request):
    with exo_lab.Cluster.local(engines=request.param, max_cores=1) as cluster:
        cluster.load("demo", min_stages=request.param, progress=False)
        assert len(cluster.plan.stages) == request.param
        yield cluster


@pytest.fixture(scope="module")
def reference():
    from exo_lab.weights.demo import demo_model_dir

    return AutoModelForCausalLM.from_pretrained(str(demo_model_dir()), dtype=torch.float32).eval()


def step_logits(reference, tokens: list[int]) -> torch.Tensor:
    """The reference model's logits for each new token, teacher-forced: (new tokens, vocab)."""
    with torch.inference_mode():
        logits = reference(torch.tensor([PROMPT + tokens])).logits[0].float()
    return logits[len(PROMPT) - 1:len(PROMPT) - 1 + len(tokens)]


def sampled(cluster, seed: int, **settings) -> list[int]:
    result = cluster.generate(PROMPT, max_new_tokens=NEW_TOKENS, seed=seed, ignore_eos=True, **settings)
    assert len(result.token_ids) == NEW_TOKENS
    return result.token_ids


@pytest.mark.parametrize("temperature", [0.7, 1.3])
def test_decode_steps_sample_from_the_models_distribution(sampling_cluster, reference, temperature):
    draws = Draws()
    for seed in SEEDS:
        tokens = sampled(sampling_cluster, seed, temperature=temperature)
        draws.add(tokens, step_logits(reference, tokens), temperature)
    draws.check()
    assert draws.expected_argmax_rate < 0.9    # the model is uncertain enough for greedy decoding to show


def test_top_k_and_top_p_hold_at_every_step(sampling_cluster, reference):
    for seed in range(4):
        tokens = sampled(sampling_cluster, seed, temperature=1.0, top_k=5)
        for step, logits in enumerate(step_logits(reference, tokens)):
            fifth_best = torch.topk(logits, 5).values[-1]
            assert logits[tokens[step]] >= fifth_best - 1e-4, f"step {step}: outside the top 5"
    for seed in range(4):
        tokens = sampled(sampling_cluster, seed, temperature=1.0, top_p=0.5)
        for step, logits in enumerate(step_logits(reference, tokens)):
            probs, order = torch.sort(torch.softmax(logits, dim=-1), descending=True)
            mass_before = torch.cumsum(probs, 0) - probs          # mass of the better tokens
            nucleus = set(order[mass_before < 0.5 + 1e-4].tolist())
            assert tokens[step] in nucleus, f"step {step}: outside the top-p 0.5 nucleus"


def test_same_seed_same_tokens_and_different_seeds_differ(sampling_cluster):
    first = sampled(sampling_cluster, 3, temperature=1.0)
    assert sampled(sampling_cluster, 3, temperature=1.0) == first
    assert sampled(sampling_cluster, 4, temperature=1.0) != first
    # unseeded requests draw their own seed: two of them differ
    unseeded = [sampling_cluster.generate(PROMPT, max_new_tokens=NEW_TOKENS, temperature=1.0,
                                          ignore_eos=True).token_ids for _ in range(2)]
    assert unseeded[0] != unseeded[1]


def test_the_api_default_temperature_samples_every_step(sampling_cluster):
    from openai import OpenAI

    server = sampling_cluster.serve(port=0)
    try:
        client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        messages = [{"role": "user", "content": "Tell me about clusters."}]
        reply = client.chat.completions.create(model=sampling_cluster.model_id, messages=messages,
                                               max_tokens=16, seed=5)   # no temperature: OpenAI's 1.0
    finally:
        server.stop()
    at_one = sampling_cluster.chat(messages, temperature=1.0, seed=5, max_new_tokens=16)
    assert reply.choices[0].message.content == at_one.text
    # the tokens after the first are not the greedy continuation of the first (the old bug)
    prompt = sampling_cluster.encode_chat(messages)
    greedy_rest = sampling_cluster.generate(prompt + at_one.token_ids[:1], max_new_tokens=15).token_ids
    assert len(at_one.token_ids) > 4
    assert at_one.token_ids[1:] != greedy_rest[:len(at_one.token_ids) - 1]


def test_one_seed_rule_a_negative_seed_draws_as_its_twos_complement():
    """The API, the wire and the sampler share sampling.normalize_seed: -1 is accepted (OpenAI
    clients send any int64) and draws exactly what 2**64 - 1 draws, on the wire as that value."""
    from exo_lab.api.params import seed as api_seed
    from exo_lab.wire import Forward, Row, decode, encode

    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(3))
    negative = SamplingSettings(temperature=1.0, seed=-1)
    assert negative.seed == 2**64 - 1 and api_seed({"seed": -1}) == 2**64 - 1
    assert [sample_token(logits, negative, p) for p in range(64)] == \
        [sample_token(logits, SamplingSettings(temperature=1.0, seed=2**64 - 1), p) for p in range(64)]
    frame = decode(encode(Forward(1, (Row(0, 0, negative, True),), torch.ones(1, 1, dtype=torch.int64))))
    assert frame.rows[0].sampling.seed == 2**64 - 1


# ----------------------------------------------------------------------------- logit rules and logprobs

from exo_lab.sampling import LogitRule, TokenLogprob, allowed_mask, merge_rule, sample_row   # noqa: E402


def mask_of(ids, vocab) -> bytes:
    words = [0] * ((vocab + 31) // 32)
    for i in ids:
        words[i // 32] |= 1 << (i % 32)
    return struct.pack(f"<{len(words)}I", *words)


def test_a_mask_restricts_greedy_and_sampled_draws_to_the_allowed_ids():
    logits = torch.randn(100, generator=torch.Generator().manual_seed(0)) * 3
    allowed = [5, 37, 64, 99]                       # across words, and bit 31 of none
    rule = LogitRule(mask_of(allowed, 100))
    assert allowed_mask(rule.allowed, 100).nonzero().flatten().tolist() == allowed
    best = max(allowed, key=lambda i: float(logits[i]))
    assert sample_row(logits, SamplingSettings(), 3, rule)[0] == best != int(logits.argmax())
    for seed in range(200):
        settings = SamplingSettings(temperature=1.5, seed=seed, top_k=3)
        assert sample_row(logits, settings, seed, rule)[0] in allowed
    with pytest.raises(RequestError, match="allows no token"):
        sample_row(logits, SamplingSettings(), 0, LogitRule(bytes(16)))


def test_bias_and_penalties_match_a_hand_computation_and_logprobs_are_log_softmax_after_them():
    logits = torch.tensor([1.0, 2.0, 3.0, 0.5])
    params = SamplingParams(presence_penalty=1.0, frequency_penalty=0.5, logit_bias=((0, 4.0),), logprobs=2)
    rule = merge_rule(LogitRule(mask_of([0, 1, 2], 4), ((1, 0.25),)), params, [2, 2, 1])
    # by hand: 0: 1 + 4 = 5; 1: 2 + 0.25 - (1 + 0.5) = 0.75; 2: 3 - (1 + 0.5 * 2) = 1; 3: masked
    expected = torch.tensor([5.0, 0.75, 1.0, float("-inf")])
    token, logprob = sample_row(logits, SamplingSettings(temperature=0.3, seed=1), 9, rule, 2)
    reference = torch.log_softmax(expected, dim=-1)
    assert token == 0 or token in (1, 2)
    assert logprob.token_id == token and logprob.logprob == pytest.approx(float(reference[token]), abs=1e-6)
    assert [i for i, _ in logprob.top] == [0, 2] and logprob.top[0][1] == pytest.approx(float(reference[0]))
    # temperature does not change logprobs; the draw is still the one of (seed, position)
    assert sample_row(logits, SamplingSettings(), 9, rule, 0)[1] == TokenLogprob(0, logprob.top[0][1])
    assert merge_rule(None, SamplingParams(), [1, 2]) is None


@pytest.mark.parametrize("kwargs, param", [
    ({"logprobs": 21}, "logprobs"), ({"logprobs": -1}, "logprobs"), ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": float("nan")}, "frequency_penalty"), ({"logit_bias": ((1, 101.0),)}, "logit_bias"),
    ({"logit_bias": ((-1, 1.0),)}, "logit_bias"), ({"logit_bias": tuple((i, 1.0) for i in range(301))}, "logit_bias"),
    ({"logit_bias": ((1, 1.0), (1, 2.0))}, "logit_bias"), ({"logit_bias": {"a": 1.0}}, "logit_bias"),
])
def test_new_request_fields_are_validated_naming_the_field(kwargs, param):
    with pytest.raises(RequestError) as info:
        SamplingParams(**kwargs)
    assert info.value.param == param


def test_a_logit_rule_is_bounded():
    with pytest.raises(RequestError, match="whole uint32 words"):
        LogitRule(b"\0" * 3)
    with pytest.raises(RequestError, match="at most 1048576"):
        LogitRule(b"\0" * (2**20 + 4))
    with pytest.raises(RequestError, match="at most 4096"):
        LogitRule(bias=tuple((i, 1.0) for i in range(4097)))
    with pytest.raises(RequestError, match="finite"):
        LogitRule(bias=((1, float("inf")),))
    assert SamplingParams(logit_bias={7: 1, 2: -3.5}).logit_bias == ((2, -3.5), (7, 1.0))
