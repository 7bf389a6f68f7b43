"""exo_lab.model.quant: int8 weight-only stages must generate exactly what transformers generates
with the same (dequantized) weights, on 1 and 2 stages; the profile and planner count their bytes."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from exo_lab.errors import ConfigError, ModelError
from exo_lab.model.profile import layer_parameter_count, linear_shapes, profile_from_config
from exo_lab.model.quant import Int8Linear, dequantize_weight, quantize_weight
from exo_lab.control_types import ShardSpec
from exo_lab.units import check_dtype

from stages import NEW_TOKENS, SPLITS, generate, load_split, make_prompt, run_chain_rows

NUM_LAYERS = 4


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def dequantized_reference(model_dir, stages) -> nn.Module:
    """The HF model in bfloat16 whose decoder Linear weights are the stages' int8 weights
    dequantized: what an int8 stage computes, run by transformers' own code."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    model.generation_config.eos_token_id = None
    for stage in stages:
        for local, layer in enumerate(stage.layers):
            hf_layer = model.base_model.layers[stage.spec.start_layer + local]
            for name, module in layer.named_modules():
                if isinstance(module, Int8Linear):
                    hf_linear = hf_layer.get_submodule(name)
                    hf_linear.weight.data = dequantize_weight(module.weight, module.scales).to(torch.bfloat16)
    return model


def hf_tokens(model, prompt) -> list[int]:
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW_TOKENS,
                         do_sample=False)
    return out[0, prompt.shape[1]:].tolist()


@pytest.mark.parametrize("split_name", ["1-stage", "2-stage"])
@pytest.mark.parametrize("architecture", ["llama", "mistral"])
def test_int8_stages_generate_what_hf_generates_with_the_dequantized_weights(tiny_model_dir, architecture,
                                                                             split_name):
    model_dir = tiny_model_dir(architecture)
    stages = load_split(model_dir, SPLITS[split_name], dtype="int8")
    prompt = make_prompt(model_dir, 30)
    assert generate(stages, prompt) == hf_tokens(dequantized_reference(model_dir, stages), prompt)


@pytest.mark.parametrize("architecture", ["qwen2", "qwen3"])
def test_int8_stages_match_hf_logits_within_bfloat16_rounding(tiny_model_dir, architecture):
    """The reference rounds each dequantized weight to bfloat16 while the kernel scales in float32,
    so on these tiny random models a near-tie eventually picks another token: the prompt's logits
    must agree to bfloat16 precision and the first tokens exactly."""
    model_dir = tiny_model_dir(architecture)
    stages = load_split(model_dir, SPLITS["2-stage"], dtype="int8")
    prompt = make_prompt(model_dir, 30)
    reference = dequantized_reference(model_dir, stages)
    with torch.no_grad():
        expected = reference(prompt).logits[:, -1].float()
    logits = stages[1].forward(stages[0].forward(prompt, [0], [0]), [0], [0])
    assert torch.allclose(logits, expected, atol=0.05 * expected.abs().max().item())
    assert generate(stages, prompt, new_tokens=4) == hf_tokens(reference, prompt)[:4]


def test_int8_stage_keeps_embeddings_norms_and_head_in_bfloat16(tiny_model_dir):
    model_dir = tiny_model_dir("qwen2", tie_word_embeddings=True)
    (stage,) = load_split(model_dir, SPLITS["1-stage"], dtype="int8")
    linears = [m for m in stage.layers.modules() if isinstance(m, Int8Linear)]
    assert len(linears) == 7 * NUM_LAYERS
    assert not any(isinstance(m, nn.Linear) for m in stage.layers.modules())
    assert {m.weight.dtype for m in linears} == {torch.int8}
    assert {m.scales.dtype for m in linears} == {torch.bfloat16}
    assert stage.embed_tokens.weight.dtype == stage.lm_head.weight.dtype == torch.bfloat16
    assert stage.kv.keys[0].dtype == torch.bfloat16
    assert stage.forward(make_prompt(model_dir, 5), [0], [0]).dtype == torch.float32


def test_profile_counts_the_bytes_an_int8_stage_holds(tiny_model_dir):
    import json
    from pathlib import Path
    model_dir = tiny_model_dir("qwen2")
    config = json.loads((Path(model_dir) / "config.json").read_text())
    profile = profile_from_config(config, dtype="int8")
    (stage,) = load_split(model_dir, SPLITS["1-stage"], dtype="int8")
    layer = stage.layers[0]
    held = sum(p.numel() * p.element_size() for p in layer.parameters())
    assert profile.layer_bytes == held
    assert profile.embedding_bytes == stage.embed_tokens.weight.numel() * 2
    assert profile.kv_bytes_per_token_per_layer == profile_from_config(config, dtype="bfloat16").kv_bytes_per_token_per_layer


def test_int8_layer_bytes_are_one_per_weight_plus_scales():
    config = {"model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
              "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 128256,
              "max_position_embeddings": 131072, "rms_norm_eps": 1e-5}
    shapes = linear_shapes(config)
    weights = sum(o * i for o, i in shapes)
    assert weights + 2 * 8192 == layer_parameter_count(config)
    int8 = profile_from_config(config, dtype="int8")
    bf16 = profile_from_config(config, dtype="bfloat16")
    assert int8.layer_bytes == weights + 2 * sum(o for o, _ in shapes) + 2 * 2 * 8192
    assert int8.embedding_bytes == bf16.embedding_bytes and int8.lm_head_bytes == bf16.lm_head_bytes
    assert 0.5 < int8.layer_bytes / bf16.layer_bytes < 0.501


def test_quantize_weight_round_trips_within_half_a_step():
    w = torch.randn(16, 32)
    q, scales = quantize_weight(w)
    assert q.dtype == torch.int8 and scales.shape == (16,)
    step = scales.float()[:, None]
    assert ((dequantize_weight(q, scales) - w).abs() <= step * 0.5 + 1e-6).all()


def test_bad_dtypes_are_errors_naming_the_choices():
    with pytest.raises(ConfigError, match="use one of float32, bfloat16, float16, int8, int4, gguf or auto"):
        check_dtype("int3")
    with pytest.raises(ModelError, match="int3.*float32, bfloat16, float16, int8, int4, gguf"):
        ShardSpec("m", 0, 1, 1, dtype="int3")
    with pytest.raises(ModelError, match="unknown dtype 'q4'"):
        profile_from_config({}, dtype="q4")


def test_plan_int8_fits_the_70b_in_one_seed_pcs_ram(capsys, tmp_path):
    """int8 halves the bytes: the 70B fits in one seed PC's 128 GB of RAM (the seed's PCs as CPUs,
    gpu: false), where bfloat16 needs two."""
    import json
    from pathlib import Path

    from exo_lab.cli import main

    root = Path(__file__).resolve().parent.parent
    config = tmp_path / "config.yaml"
    config.write_text((root / "examples/config.yaml").read_text().replace("gpu: true", "gpu: false"))
    stages = {}
    for dtype in ("int8", "bfloat16"):
        assert main(["plan", "--config", str(config), "--model", str(root / "examples/models/llama-3.1-70b"),
                     "--dtype", dtype, "--json"]) == 0
        stages[dtype] = json.loads(capsys.readouterr().out)["stages"]
    assert [s["node"] for s in stages["int8"]] == ["system-b.local"]
    assert [s["node"] for s in stages["bfloat16"]] == ["system-b.local", "system-c.local"]


@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_onednn_packed_products_give_the_same_logits_and_count_every_byte(tiny_model_dir, monkeypatch, dtype):
    """Without exo-lab's CPU kernels, bfloat16 decoder products (and an int8 stage's untied
    bfloat16 head) run on weights packed for oneDNN: bit-identical logits to F.linear's, and every
    byte still counted."""
    import exo_lab.weights.checkpoint as shard_module
    from exo_lab.model import cpu_kernels
    from exo_lab.model.packed import PackedLinear, can_pack

    monkeypatch.setattr(cpu_kernels, "available", lambda: False)
    if not can_pack(torch.device("cpu")):
        pytest.skip("this CPU has no oneDNN bfloat16 kernels")
    model_dir = tiny_model_dir("qwen2")            # q/k/v carry biases
    packed = load_split(model_dir, SPLITS["2-stage"], dtype=dtype, max_batch=2)
    monkeypatch.setattr(shard_module, "can_pack", lambda device: False)
    plain = load_split(model_dir, SPLITS["2-stage"], dtype=dtype, max_batch=2)
    kinds = {type(m) for m in packed[0].layers.modules()}
    assert (PackedLinear in kinds) == (dtype == "bfloat16")
    assert isinstance(packed[1].lm_head, PackedLinear)     # the last stage holds no embedding to share
    assert not any(isinstance(m, PackedLinear) for s in plain for m in s.modules())
    assert [s.parameter_bytes() for s in packed] == [s.parameter_bytes() for s in plain]
    prompt = make_prompt(model_dir, 40)
    rows = torch.cat([prompt, make_prompt(model_dir, 40, seed=1)])
    assert torch.equal(run_chain_rows(packed, [0, 1], rows, [0, 0]), run_chain_rows(plain, [0, 1], rows, [0, 0]))
    assert generate(packed, prompt) == generate(plain, prompt)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_kernel_stages_decode_what_torch_products_decode(tiny_model_dir, monkeypatch, dtype, tied):
    """With exo-lab's CPU kernels, a stage's decode products (bfloat16 Linears, int8 Linears, the
    bfloat16 head) run on them: the logits of every decode step agree with torch's own products
    to bfloat16 rounding, the greedy tokens are the same, no byte is added (a tied head still
    shares the embedding's matrix) and prefill keeps torch's products (but for the head, which
    sees only each row's last position)."""
    import exo_lab.weights.checkpoint as shard_module
    from exo_lab.model import cpu_kernels
    from exo_lab.model.packed import KernelLinear

    if not cpu_kernels.available():
        pytest.skip("exo-lab's CPU kernels do not run here (no C compiler or no AVX2)")
    model_dir = tiny_model_dir("qwen2", tie_word_embeddings=tied)
    split = SPLITS["1-stage" if tied else "2-stage"]
    fast = load_split(model_dir, split, dtype=dtype, max_batch=3)
    calls = []
    for name in ("gemv_int8", "gemv_bf16"):
        real = getattr(cpu_kernels, name)
        monkeypatch.setattr(cpu_kernels, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    assert isinstance(fast[-1].lm_head, KernelLinear)
    if tied:
        assert fast[0].lm_head.weight.data_ptr() == fast[0].embed_tokens.weight.data_ptr()
    assert all(isinstance(m, KernelLinear) == (dtype == "bfloat16") for m in fast[0].layers.modules()
               if isinstance(m, (KernelLinear, nn.Linear)))
    monkeypatch.setattr(shard_module, "can_pack", lambda device: False)
    monkeypatch.setattr(cpu_kernels, "available", lambda: False)
    plain = load_split(model_dir, split, dtype=dtype, max_batch=3)
    assert [s.parameter_bytes() for s in fast] == [s.parameter_bytes() for s in plain]

    prompts = torch.cat([make_prompt(model_dir, 24, seed=seed) for seed in range(3)])
    logits = [run_chain_rows(stages, [0, 1, 2], prompts, [0, 0, 0]) for stages in (fast, plain)]
    assert calls == ["gemv_bf16"]                          # prefill (72 rows): only the head's 3 rows
    for step in range(8):
        scale = logits[1].abs().max().item()
        assert torch.allclose(logits[0], logits[1], rtol=0, atol=0.02 * scale), f"step {step}"
        tokens = [lg.argmax(-1, keepdim=True) for lg in logits]
        assert torch.equal(*tokens), f"step {step}: the kernels picked other tokens"
        logits = [run_chain_rows(stages, [0, 1, 2], tokens[0], [24 + step] * 3) for stages in (fast, plain)]
    kinds = set(calls)
    assert kinds == ({"gemv_int8", "gemv_bf16"} if dtype == "int8" else {"gemv_bf16"})


def test_int8_prefill_of_a_width_torchs_kernel_cannot_take_runs(tiny_model_dir):
    """torch._weight_int8pack_mm kills the process (SIGSEGV) when in_features is not a multiple
    of 16; such layers dequantize instead, and prefill and decode still match transformers."""
    model_dir = tiny_model_dir("llama", hidden_size=72, intermediate_size=136, num_attention_heads=4,
                               num_key_value_heads=2)
    stages = load_split(model_dir, SPLITS["2-stage"], dtype="int8")
    prompt = make_prompt(model_dir, 30)
    assert generate(stages, prompt) == hf_tokens(dequantized_reference(model_dir, stages), prompt)
