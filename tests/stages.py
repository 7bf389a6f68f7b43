"""Helpers for tests that build pipeline stages from tiny random checkpoints and chain them in
this process (test_shard, test_quant): load a split, run the chain, generate greedily."""
from __future__ import annotations

import torch
from transformers import AutoConfig

from exo_lab.control_types import ShardSpec
from exo_lab.weights.checkpoint import load_stage

NUM_LAYERS = 4
NEW_TOKENS = 20
SPLITS = {
    "1-stage": [(0, 4)],
    "2-stage": [(0, 2), (2, 4)],
    "3-stage": [(0, 1), (1, 3), (3, 4)],
}

def load_split(model_dir, split, dtype="float32", **spec):
    return [load_stage(ShardSpec(str(model_dir), a, b, NUM_LAYERS, dtype=dtype, max_context=256, **spec))
            for a, b in split]


def run_chain(stages, slot, inputs, position):
    """Pass ``inputs`` (one row) through every stage in KV slot ``slot``; returns the last
    stage's logits (1, vocab)."""
    for stage in stages:
        inputs = stage.forward(inputs, [slot], [position])
    return inputs


def generate(stages, prompt, new_tokens=NEW_TOKENS, slot=0, pick=None):
    """Prefill ``prompt`` at position 0, then feed one token at a time, as the engines do."""
    pick = pick or (lambda logits: int(torch.argmax(logits)))
    tokens, inputs, position = [], prompt, 0
    for _ in range(new_tokens):
        token = pick(run_chain(stages, slot, inputs, position))
        tokens.append(token)
        position += inputs.shape[1]
        inputs = torch.tensor([[token]])
    return tokens


def make_prompt(model_dir, length, seed=0):
    vocab = AutoConfig.from_pretrained(model_dir).vocab_size
    # ids 0-2 are the demo tokenizer's special tokens; any other id will do
    return torch.randint(3, vocab, (1, length), generator=torch.Generator().manual_seed(seed))


def run_chain_rows(stages, slots, inputs, positions):
    for stage in stages:
        inputs = stage.forward(inputs, slots, positions)
    return inputs


def hf_greedy(model_dir, prompt_ids: list[int], n: int) -> list[int]:
    """The reference: ``n`` greedy tokens after ``prompt_ids`` from transformers' own generate
    on the whole model (one thread), never stopping at end-of-sequence."""
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    inputs = torch.tensor([prompt_ids])
    with torch.inference_mode():
        out = model.generate(inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()
