"""exo_lab.model.shard: stages built from tiny random checkpoints, chained in process, must generate
exactly what Hugging Face's own ``generate`` does, and load nothing but their own tensors."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM

from exo_lab.errors import ModelError, RequestError
from exo_lab.control_types import ShardSpec
import exo_lab.weights.checkpoint as checkpoint
from exo_lab.weights.checkpoint import load_stage
from stages import NEW_TOKENS, NUM_LAYERS, SPLITS, generate, load_split, make_prompt, run_chain, run_chain_rows

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")
PROMPT_LENGTHS = (5, 120)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


# ----------------------------------------------------------------------------- helpers

_REFERENCE_MODELS: dict[str, torch.nn.Module] = {}
_REFERENCE_TOKENS: dict[tuple, list[int]] = {}


def reference_model(model_dir, dtype=torch.float32):
    key = f"{model_dir}:{dtype}"
    if key not in _REFERENCE_MODELS:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
        model.generation_config.eos_token_id = None   # always generate NEW_TOKENS tokens
        _REFERENCE_MODELS[key] = model.eval()
    return _REFERENCE_MODELS[key]


def reference_tokens(model_dir, prompt, dtype=torch.float32):
    key = (str(model_dir), tuple(prompt[0].tolist()), dtype)
    if key not in _REFERENCE_TOKENS:
        out = reference_model(model_dir, dtype).generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW_TOKENS,
            do_sample=False)
        _REFERENCE_TOKENS[key] = out[0, prompt.shape[1]:].tolist()
        assert len(_REFERENCE_TOKENS[key]) == NEW_TOKENS
    return _REFERENCE_TOKENS[key]


def weight_map(model_dir) -> dict[str, str]:
    return json.loads((Path(model_dir) / "model.safetensors.index.json").read_text())["weight_map"]


def tensor_bytes(model_dir, names, dtype=torch.float32) -> int:
    files = weight_map(model_dir)
    total = 0
    for name in names:
        with safe_open(str(Path(model_dir) / files[name]), framework="pt") as handle:
            total += handle.get_tensor(name).numel() * torch.empty((), dtype=dtype).element_size()
    return total


def save_model(config, folder) -> Path:
    """A random checkpoint built with transformers directly, for configs demo.py does not make."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    for p in model.parameters():   # larger weights than HF's init, so greedy output varies
        torch.nn.init.normal_(p, std=0.2)
    model.save_pretrained(folder, max_shard_size="200KB")
    return Path(folder)


# ----------------------------------------------------------------------------- exactness

@pytest.mark.parametrize("split_name", SPLITS)
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_chained_stages_generate_exactly_what_hf_generates(tiny_model_dir, architecture, tied,
                                                           split_name):
    model_dir = tiny_model_dir(architecture, tie_word_embeddings=tied)
    stages = load_split(model_dir, SPLITS[split_name])
    for length in PROMPT_LENGTHS:
        prompt = make_prompt(model_dir, length)
        assert generate(stages, prompt) == reference_tokens(model_dir, prompt), f"prompt {length}"


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_last_stage_logits_match_full_model(tiny_model_dir, architecture):
    model_dir = tiny_model_dir(architecture)
    stages = load_split(model_dir, SPLITS["3-stage"])
    prompt = make_prompt(model_dir, 12)
    full = reference_model(model_dir)
    with torch.no_grad():
        want = full(prompt).logits[:, -1, :]                             # (1, vocab)
        want_next = full(torch.cat([prompt, torch.tensor([[7]])], dim=1)).logits[:, -1, :]
    got = run_chain(stages, 0, prompt, 0)
    assert got.shape == want.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # one decode step through the caches gives the full model's logits for the longer sequence
    torch.testing.assert_close(run_chain(stages, 0, torch.tensor([[7]]), 12), want_next,
                               atol=1e-5, rtol=0)


def test_middle_stage_returns_hidden_states(tiny_model_dir):
    model_dir = tiny_model_dir("llama")
    first, middle, _ = load_split(model_dir, SPLITS["3-stage"])
    hidden = middle.forward(first.forward(make_prompt(model_dir, 6), [0], [0]), [0], [0])
    assert hidden.shape == (1, 6, 64) and hidden.dtype == torch.float32
    assert first.embed_tokens is not None and first.lm_head is None and first.norm is None
    assert middle.embed_tokens is None and middle.lm_head is None and len(middle.layers) == 2
    with pytest.raises(ValueError, match=r"hidden states \(B, T, 64\)"):
        middle.forward(make_prompt(model_dir, 6), [0], [0])   # token ids sent to a middle stage


@pytest.mark.parametrize("architecture", ["mistral", "qwen2"])
def test_sliding_window_layers_match_hf_across_stages(tmp_path, architecture):
    # window 16 with a 100-token prompt, so the window really cuts; Qwen2's layers 2-3 slide and
    # 0-1 do not, so the 3-stage split gives stage [1, 3) one layer of each kind.
    window = 16
    extra = dict(use_sliding_window=True, max_window_layers=2) if architecture == "qwen2" else {}
    config = AutoConfig.for_model(
        architecture, vocab_size=300, hidden_size=64, intermediate_size=128,
        num_hidden_layers=NUM_LAYERS, num_attention_heads=4, num_key_value_heads=2,
        sliding_window=window, eos_token_id=None, **extra)
    model_dir = save_model(config, tmp_path / architecture)
    stages = load_split(model_dir, SPLITS["3-stage"])
    prompt = make_prompt(model_dir, 100)
    assert generate(stages, prompt) == reference_tokens(model_dir, prompt)
    sliding = [[kind == "sliding_attention" for kind in stage.layer_types] for stage in stages]
    if architecture == "qwen2":
        assert sliding == [[False], [False, True], [True]]
    else:
        assert sliding == [[True], [True, True], [True]]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_stages_match_hf_in_that_dtype(tiny_model_dir, dtype):
    model_dir = tiny_model_dir("qwen2")
    stages = load_split(model_dir, SPLITS["2-stage"], dtype=dtype)
    assert {p.dtype for s in stages for p in s.parameters()} == {getattr(torch, dtype)}
    prompt = make_prompt(model_dir, 30)
    assert generate(stages, prompt) == reference_tokens(model_dir, prompt, getattr(torch, dtype))
    assert run_chain(stages, 0, prompt, 0).dtype == torch.float32


# ----------------------------------------------------------------------------- KV caches

def test_kv_slots_are_allocated_once_at_load(tiny_model_dir):
    model_dir = tiny_model_dir("llama")
    stages = load_split(model_dir, SPLITS["2-stage"], max_batch=3)
    # 2 layers x (K + V) x 3 slots x 2 kv heads x 256 positions x head_dim 16 x 4 bytes
    expected = 2 * 2 * 3 * 2 * 256 * 16 * 4
    assert [stage.kv_cache_bytes() for stage in stages] == [expected, expected]
    generate(stages, make_prompt(model_dir, 40), new_tokens=3, slot=2)
    assert [stage.kv_cache_bytes() for stage in stages] == [expected, expected]   # flat


def test_rows_outside_the_plan_are_request_errors(tiny_model_dir):
    model_dir = tiny_model_dir("llama")
    (stage,) = load_split(model_dir, SPLITS["1-stage"], max_batch=2)
    with pytest.raises(RequestError, match="slots must be in"):
        stage.forward(torch.tensor([[9]]), [2], [0])
    with pytest.raises(RequestError, match="exceed the planned context of 256"):
        stage.forward(make_prompt(model_dir, 8), [0], [250])
    with pytest.raises(RequestError, match="2 rows of 1 tokens need 2 slots"):
        stage.forward(torch.tensor([[9], [10]]), [0], [0, 1])


def test_a_reused_slot_restarts_at_position_zero(tiny_model_dir):
    model_dir = tiny_model_dir("llama")
    stages = load_split(model_dir, SPLITS["2-stage"])
    prompt = make_prompt(model_dir, 5)
    generate(stages, make_prompt(model_dir, 9, seed=1), new_tokens=4, slot=0)
    assert generate(stages, prompt, slot=0) == reference_tokens(model_dir, prompt)


def test_interleaved_requests_match_each_alone(tiny_model_dir):
    model_dir = tiny_model_dir("qwen3")
    stages = load_split(model_dir, SPLITS["3-stage"], max_batch=2)
    prompts = {0: make_prompt(model_dir, 5), 1: make_prompt(model_dir, 33, seed=1)}
    inputs = dict(prompts)
    positions = {0: 0, 1: 0}
    tokens = {0: [], 1: []}
    for _ in range(NEW_TOKENS):
        for slot in (0, 1):   # alternate requests on the same stages, token by token
            token = int(torch.argmax(run_chain(stages, slot, inputs[slot], positions[slot])))
            tokens[slot].append(token)
            positions[slot] += inputs[slot].shape[1]
            inputs[slot] = torch.tensor([[token]])
    for slot, prompt in prompts.items():
        assert tokens[slot] == reference_tokens(model_dir, prompt)
    assert tokens[0] != tokens[1]


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_a_batch_of_rows_at_different_positions_matches_each_alone(tiny_model_dir, architecture):
    """Decode steps batch rows of different lengths (per-row positions, masks and RoPE), in
    slots that are not consecutive: each row's logits equal its own single-row run."""
    model_dir = tiny_model_dir(architecture)
    stages = load_split(model_dir, SPLITS["2-stage"], max_batch=4)
    prompts = {3: make_prompt(model_dir, 7), 0: make_prompt(model_dir, 30, seed=1), 2: make_prompt(model_dir, 2, seed=2)}
    for slot, prompt in prompts.items():          # prefill each alone
        run_chain(stages, slot, prompt, 0)
    slots = list(prompts)
    next_ids = torch.tensor([[5], [6], [7]])      # (B, T=1)
    positions = [prompts[slot].shape[1] for slot in slots]
    batched = run_chain_rows(stages, slots, next_ids, positions)
    alone_stages = load_split(model_dir, SPLITS["2-stage"])
    for row, slot in enumerate(slots):
        run_chain(alone_stages, 0, prompts[slot], 0)
        alone = run_chain(alone_stages, 0, next_ids[row:row + 1], positions[row])
        torch.testing.assert_close(batched[row:row + 1], alone, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- loading

def test_stage_reads_only_its_own_files_and_tensors(tiny_model_dir, monkeypatch):
    model_dir = tiny_model_dir("llama")
    files = weight_map(model_dir)
    opened, read = [], []

    class Spy:   # the real safe_open, recording which files are opened and which keys read
        def __init__(self, path, **kwargs):
            opened.append(Path(path).name)
            self._handle = safe_open(path, **kwargs)

        def __enter__(self):
            self._handle.__enter__()
            return self

        def __exit__(self, *exc):
            return self._handle.__exit__(*exc)

        def keys(self):
            return self._handle.keys()

        def get_tensor(self, name):
            read.append(name)
            return self._handle.get_tensor(name)

    monkeypatch.setattr(checkpoint, "safe_open", Spy)
    stage = load_stage(ShardSpec(str(model_dir), 0, 2, NUM_LAYERS))

    want = ["model.embed_tokens.weight"] + [n for n in files if n.startswith(("model.layers.0.",
                                                                               "model.layers.1."))]
    assert sorted(read) == sorted(want)
    assert sorted(opened) == sorted({files[name] for name in want})   # each file once
    assert set(opened) < set(files.values())
    assert stage.parameter_bytes() == tensor_bytes(model_dir, want)
    assert not any(t.is_meta for t in [*stage.parameters(), *stage.buffers()])
    assert not stage.training and not any(p.requires_grad for p in stage.parameters())


def test_tied_last_stage_loads_the_embedding_as_its_head(tiny_model_dir):
    model_dir = tiny_model_dir("qwen2", tie_word_embeddings=True)
    assert "lm_head.weight" not in weight_map(model_dir)
    (last,) = load_split(model_dir, [(2, 4)])
    head = reference_model(model_dir).get_input_embeddings().weight
    torch.testing.assert_close(last.lm_head.weight, head, atol=0, rtol=0)
    layers = [n for n in weight_map(model_dir) if n.startswith(("model.layers.2.", "model.layers.3."))]
    want = tensor_bytes(model_dir, layers + ["model.norm.weight", "model.embed_tokens.weight"])
    assert last.parameter_bytes() == want


def test_single_tied_stage_shares_embedding_and_head(tiny_model_dir):
    model_dir = tiny_model_dir("llama", tie_word_embeddings=True)
    (stage,) = load_split(model_dir, SPLITS["1-stage"])
    assert stage.lm_head.weight.data_ptr() == stage.embed_tokens.weight.data_ptr()
    full = reference_model(model_dir)
    assert stage.parameter_bytes() == sum(p.numel() * 4 for p in full.parameters())


def damaged_copy(model_dir, tmp_path) -> Path:
    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    return copy


def test_missing_weight_file_names_the_file(tiny_model_dir, tmp_path):
    model_dir = damaged_copy(tiny_model_dir("llama"), tmp_path)
    files = weight_map(model_dir)
    missing = files["model.layers.3.mlp.down_proj.weight"]
    assert missing not in {files[n] for n in files if n.startswith("model.layers.0.")}
    (model_dir / missing).unlink()
    with pytest.raises(ModelError, match=f"{missing} does not exist .*model.layers.3"):
        load_stage(ShardSpec(str(model_dir), 2, 4, NUM_LAYERS))
    load_stage(ShardSpec(str(model_dir), 0, 1, NUM_LAYERS))   # the file is not stage 0's business


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_weight_file_names_the_file(tiny_model_dir, tmp_path, damage):
    model_dir = damaged_copy(tiny_model_dir("llama"), tmp_path)
    name = weight_map(model_dir)["model.layers.1.self_attn.q_proj.weight"]
    data = (model_dir / name).read_bytes()
    (model_dir / name).write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x07" * 64)
    with pytest.raises(ModelError, match=f"{name} .*corrupt"):
        load_stage(ShardSpec(str(model_dir), 0, 2, NUM_LAYERS))


def test_tensor_missing_from_index_is_named(tiny_model_dir, tmp_path):
    model_dir = damaged_copy(tiny_model_dir("llama"), tmp_path)
    index_path = model_dir / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    del index["weight_map"]["model.layers.1.mlp.gate_proj.weight"]
    index_path.write_text(json.dumps(index))
    with pytest.raises(ModelError, match="model.layers.1.mlp.gate_proj.weight"):
        load_stage(ShardSpec(str(model_dir), 0, 2, NUM_LAYERS))


def test_single_file_checkpoint_without_index_loads(tmp_path):
    config = AutoConfig.for_model("llama", vocab_size=100, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=NUM_LAYERS, num_attention_heads=2,
                                  num_key_value_heads=1, eos_token_id=None)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    assert not (tmp_path / "model.safetensors.index.json").exists()
    stages = load_split(tmp_path, SPLITS["2-stage"])
    prompt = make_prompt(tmp_path, 5)
    assert generate(stages, prompt) == reference_tokens(tmp_path, prompt)


@pytest.mark.parametrize("fields, message", [
    (dict(start_layer=2, stop_layer=2), r"\[2, 2\) is not a non-empty part"),
    (dict(start_layer=0, stop_layer=5), r"0 <= start_layer < stop_layer <= 4"),
    (dict(dtype="float64"), "float32, bfloat16, float16"),
])
def test_bad_shard_specs_are_model_errors(fields, message):
    values = dict(model_dir="x", start_layer=0, stop_layer=2, num_layers=NUM_LAYERS)
    values.update(fields)
    with pytest.raises(ModelError, match=message):
        ShardSpec(**values)


def test_spec_that_disagrees_with_config_is_a_model_error(tiny_model_dir, tmp_path):
    with pytest.raises(ModelError, match="says 6 layers .*num_hidden_layers=4"):
        load_stage(ShardSpec(str(tiny_model_dir("llama")), 0, 2, 6))
    with pytest.raises(ModelError, match="config.json does not exist"):
        load_stage(ShardSpec(str(tmp_path / "nowhere"), 0, 2, NUM_LAYERS))


def test_spec_flags_first_and_last():
    specs = [ShardSpec("m", a, b, NUM_LAYERS) for a, b in SPLITS["3-stage"]]
    assert [(s.is_first, s.is_last) for s in specs] == [(True, False), (False, False), (False, True)]


# ----------------------------------------------------------------------------- lean layers

@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_lean_layers_compute_what_the_layers_own_forward_computes(tiny_model_dir, architecture, dtype):
    """The Llama family runs exo_lab.model.lean: q/k/v and gate/up fused into one matrix each,
    held once (the layer's modules keep views of it, so transformers' forward runs on the same
    memory); prefill and decode logits equal those of the layers' own forward."""
    from exo_lab.model.profile import profile_from_config

    model_dir = tiny_model_dir(architecture)
    stages = load_split(model_dir, SPLITS["2-stage"], dtype=dtype, max_batch=2)
    assert all(stage.lean is not None for stage in stages)
    attention = stages[0].layers[0].self_attn
    fused = stages[0].lean.qkv[0].weight
    assert attention.q_proj.weight.data_ptr() == fused.data_ptr()
    assert attention.v_proj.weight.data_ptr() + attention.v_proj.weight.nbytes == fused.data_ptr() + fused.nbytes
    config = json.loads((Path(model_dir) / "config.json").read_text())
    layer_bytes = profile_from_config(config, dtype=dtype).layer_bytes
    assert sum(p.nbytes for p in stages[0].layers[0].parameters()) == layer_bytes

    prompts = torch.cat([make_prompt(model_dir, 12, seed=seed) for seed in range(2)])
    lean = [run_chain_rows(stages, [0, 1], prompts, [0, 0])]
    for stage in stages:
        stage.lean, stage.saved_lean = None, stage.lean
    own = [run_chain_rows(stages, [0, 1], prompts, [0, 0])]
    token = own[0].argmax(-1, keepdim=True)
    own.append(run_chain_rows(stages, [0, 1], token, [12, 12]))
    for stage in stages:
        stage.lean = stage.saved_lean
    lean.append(run_chain_rows(stages, [0, 1], token, [12, 12]))
    for a, b in zip(lean, own):
        assert torch.allclose(a, b, rtol=0, atol=1e-3 * b.abs().max().item()), (a - b).abs().max()


def test_a_forward_hook_on_any_layer_module_runs_the_layers_own_forward(tiny_model_dir):
    """Experiments hook the layers (exo_lab.notebook); the lean forward skips module calls, so
    any hook switches it off for as long as it is registered."""
    model_dir = tiny_model_dir("llama")
    (stage,) = load_split(model_dir, SPLITS["1-stage"])
    seen = []
    handle = stage.layers[2].mlp.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    prompt = make_prompt(model_dir, 6)
    hooked = stage.forward(prompt, [0], [0])
    handle.remove()
    assert seen == [torch.Size([1, 6, 64])]
    assert torch.allclose(stage.forward(prompt, [0], [0]), hooked, rtol=0, atol=1e-5) and seen == [torch.Size([1, 6, 64])]
