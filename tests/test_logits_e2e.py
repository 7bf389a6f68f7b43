"""Logit rules, logprobs, n choices and embeddings end to end on a 2-stage demo cluster, against
transformers running the same model whole."""
from __future__ import annotations

import struct

import pytest
import torch
from transformers import AutoModelForCausalLM

from exo_lab.sampling import LogitRule, SamplingParams

PROMPT = [5, 17, 42, 99, 7, 256, 31, 64, 12]
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def reference():
    from exo_lab.weights.demo import demo_model_dir

    return AutoModelForCausalLM.from_pretrained(str(demo_model_dir()), dtype=torch.float32).eval()


class EveryThirdToken:
    """Allows only the ids divisible by 3 (so greedy must differ from the unconstrained argmax)."""

    def __init__(self, vocab: int):
        words = [0] * ((vocab + 31) // 32)
        for i in range(0, vocab, 3):
            words[i // 32] |= 1 << (i % 32)
        self.mask, self.accepted = struct.pack(f"<{len(words)}I", *words), []

    def next_rule(self):
        return LogitRule(self.mask)

    def accept(self, token_id):
        self.accepted.append(token_id)

    def finished(self):
        return False


async def collect(stream) -> tuple[list[int], list]:
    tokens, logprobs = [], []
    async for event in stream:
        tokens += event.token_ids
        logprobs += event.logprobs
    return tokens, logprobs


def test_a_mask_constrains_greedy_and_logprobs_are_transformers_log_softmax(cluster, reference):
    processor = EveryThirdToken(reference.config.vocab_size)
    params = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True, logprobs=3)
    tokens, logprobs = cluster.run_coroutine(collect(cluster.astream(PROMPT, params, processor=processor)))
    with torch.inference_mode():
        logits = reference(torch.tensor([PROMPT + tokens])).logits[0, len(PROMPT) - 1:-1].float()
    allowed = torch.zeros(logits.shape[1], dtype=torch.bool)
    allowed[::3] = True
    masked = logits.masked_fill(~allowed, float("-inf"))
    assert tokens == masked.argmax(dim=-1).tolist() and processor.accepted == tokens
    assert any(int(row.argmax()) % 3 for row in logits)        # the mask mattered
    expected = torch.log_softmax(masked, dim=-1)
    for step, (token, entry) in enumerate(zip(tokens, logprobs, strict=True)):
        assert entry.token_id == token and entry.logprob == pytest.approx(float(expected[step, token]), abs=1e-4)
        top = torch.topk(expected[step], 3)
        assert [i for i, _ in entry.top] == top.indices.tolist()
        assert [v for _, v in entry.top] == pytest.approx(top.values.tolist(), abs=1e-4)


def test_n_choices_sharing_one_prefill_equal_solo_runs_with_seeds_s_to_s_plus_2(cluster):
    params = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=1.0, seed=1234, ignore_eos=True)

    async def together():
        import asyncio

        return await asyncio.gather(*(collect(s) for s in cluster.astream_n(PROMPT, params, 3)))

    choices = [tokens for tokens, _ in cluster.run_coroutine(together())]
    solo = [cluster.generate(PROMPT, max_new_tokens=NEW_TOKENS, temperature=1.0, seed=1234 + i,
                             ignore_eos=True).token_ids for i in range(3)]
    assert choices == solo and len({tuple(c) for c in choices}) > 1


def test_embeddings_last_and_mean_equal_transformers_final_hidden_states(cluster, reference):
    inputs = [PROMPT, PROMPT[:4], list(range(3, 300))]         # the long one prefills in chunks
    last = cluster.embed(inputs, pooling="last")
    mean = cluster.run_coroutine(cluster.aembed(inputs, pooling="mean"))
    for ids, got_last, got_mean in zip(inputs, last, mean, strict=True):
        with torch.inference_mode():
            states = reference(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0].float()
        assert got_last.dtype == torch.float32 and got_last.shape == (reference.config.hidden_size,)
        assert torch.cosine_similarity(got_last, states[-1], dim=0) >= 0.9999
        assert torch.cosine_similarity(got_mean, states.mean(dim=0), dim=0) >= 0.9999
        assert torch.allclose(got_mean, states.mean(dim=0), atol=1e-3)
    assert not cluster.pipeline.scheduler.core.running                # no KV slot kept
