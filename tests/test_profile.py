"""ModelProfile from config.json alone must match, byte for byte, what transformers builds."""
from __future__ import annotations

import json
import logging
import os

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from exo_lab.errors import ModelError
from exo_lab.model.profile import DTYPE_BYTES, ModelProfile, profile_from_config, profile_model

torch.set_num_threads(1)

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "models")


def _example(name):
    with open(os.path.join(EXAMPLES, name, "config.json")) as handle:
        return json.load(handle)


# Real models' shapes, one or more per supported architecture (values from their config.json).
REAL_CONFIGS = {
    "llama-3.1-70b": _example("llama-3.1-70b"),
    "llama-3.1-405b": _example("llama-3.1-405b"),
    "llama-biased": {**_example("llama-3.1-70b"), "num_hidden_layers": 2,
                     "attention_bias": True, "mlp_bias": True},
    "mistral-7b-v0.1": dict(model_type="mistral", hidden_size=4096, intermediate_size=14336,
                            num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                            vocab_size=32000, max_position_embeddings=32768, tie_word_embeddings=False),
    "mistral-nemo": dict(model_type="mistral", hidden_size=5120, intermediate_size=14336, head_dim=128,
                         num_hidden_layers=40, num_attention_heads=32, num_key_value_heads=8,
                         vocab_size=131072, max_position_embeddings=1024000, tie_word_embeddings=False),
    "qwen2.5-0.5b": _example("qwen2.5-0.5b"),
    "qwen2.5-7b": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944,
                       num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                       vocab_size=152064, max_position_embeddings=131072, tie_word_embeddings=False),
    "qwen3-0.6b": dict(model_type="qwen3", hidden_size=1024, intermediate_size=3072, head_dim=128,
                       num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                       vocab_size=151936, max_position_embeddings=40960, tie_word_embeddings=True),
    "qwen3-8b-biased": dict(model_type="qwen3", hidden_size=4096, intermediate_size=12288, head_dim=128,
                            num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                            vocab_size=151936, max_position_embeddings=40960, tie_word_embeddings=False,
                            attention_bias=True),
}


def _bytes(module_or_params):
    params = module_or_params.parameters() if hasattr(module_or_params, "parameters") else module_or_params
    return sum(p.numel() * p.element_size() for p in params)


def _assert_matches_model(profile: ModelProfile, model) -> None:
    """Every byte count of ``profile`` equals the parameters transformers built."""
    decoder = model.model
    assert profile.total_parameter_bytes == _bytes(model)
    assert profile.num_layers == len(decoder.layers)
    assert all(profile.layer_bytes == _bytes(layer) for layer in (decoder.layers[0], decoder.layers[-1]))
    assert profile.embedding_bytes == _bytes(decoder.embed_tokens)
    assert profile.final_norm_bytes == _bytes(decoder.norm)
    assert profile.lm_head_bytes == _bytes(model.lm_head)
    assert profile.tied_embeddings == (model.lm_head.weight is decoder.embed_tokens.weight)


def _meta_model(config: dict, dtype: str):
    hf_config = AutoConfig.for_model(**config)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(hf_config, dtype=getattr(torch, dtype))


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("name", sorted(REAL_CONFIGS))
def test_real_sized_profiles_match_transformers_exactly(name, tied):
    config = {**REAL_CONFIGS[name], "tie_word_embeddings": tied}
    dtype = "bfloat16" if tied else "float16"
    profile = profile_from_config(config, dtype=dtype, model_id=name)
    _assert_matches_model(profile, _meta_model(config, dtype))


def test_float32_doubles_the_bytes():
    config = REAL_CONFIGS["qwen3-0.6b"]
    wide, narrow = (profile_from_config(config, dtype=d) for d in ("float32", "bfloat16"))
    _assert_matches_model(wide, _meta_model(config, "float32"))
    assert wide.total_parameter_bytes == 2 * narrow.total_parameter_bytes
    assert wide.kv_bytes_per_token_per_layer == 2 * narrow.kv_bytes_per_token_per_layer
    assert wide.activation_bytes_per_token == narrow.activation_bytes_per_token   # fp32 math either way


@pytest.mark.parametrize("architecture", ["llama", "mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize("tied", [False, True])
def test_tiny_model_on_disk_matches_weights_and_kv_cache(tiny_model_dir, architecture, tied):
    folder = tiny_model_dir(architecture, tie_word_embeddings=tied)
    profile = profile_model(str(folder))
    assert profile.dtype == "float32" and profile.model_type == architecture
    model = AutoModelForCausalLM.from_pretrained(folder)
    _assert_matches_model(profile, model)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == profile.total_parameter_bytes
    tokens = 7
    with torch.no_grad():
        out = model(torch.arange(tokens)[None] + 10, use_cache=True)
    cache = out.past_key_values.layers[0]
    kv_bytes = cache.keys.numel() * cache.keys.element_size() + cache.values.numel() * cache.values.element_size()
    assert kv_bytes == tokens * profile.kv_bytes_per_token_per_layer


def test_examples_llama_70b_and_405b_totals():
    big = profile_model(os.path.join(EXAMPLES, "llama-3.1-70b"))
    assert big.dtype == "bfloat16"   # from the config's torch_dtype
    assert big.total_parameter_bytes == 2 * 70_553_706_496          # ~141 GB
    assert 140e9 < big.total_parameter_bytes < 142e9
    assert big.kv_bytes_per_token_per_layer == 2 * 8 * 128 * 2
    assert big.activation_bytes_per_token == (4 * 8192 + 2 * 28672) * 4
    huge = profile_model(os.path.join(EXAMPLES, "llama-3.1-405b"), dtype="bfloat16")
    assert huge.total_parameter_bytes == 2 * 405_853_388_800        # ~812 GB
    assert 810e9 < huge.total_parameter_bytes < 813e9
    small = profile_model(os.path.join(EXAMPLES, "qwen2.5-0.5b"), dtype="float32")
    assert small.total_parameter_bytes == 4 * 494_032_768 and small.tied_embeddings


def test_activation_estimate_uses_query_width_when_it_differs_from_hidden():
    config = REAL_CONFIGS["qwen3-0.6b"]   # 16 heads x 128 = 2048 wide, hidden 1024
    profile = profile_from_config(config)
    assert profile.activation_bytes_per_token == (2 * 1024 + 2 * 2048 + 2 * 3072) * 4


def test_bad_dtype_lists_the_allowed_ones():
    with pytest.raises(ModelError, match="unknown dtype 'int3'; use one of float32, bfloat16, float16, int8, int4, gguf"):
        profile_from_config(REAL_CONFIGS["qwen2.5-0.5b"], dtype="int3")
    assert set(DTYPE_BYTES) == {"float32", "bfloat16", "float16", "int8"}


def test_config_dtype_that_exo_lab_cannot_run(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**REAL_CONFIGS["qwen2.5-0.5b"], "torch_dtype": "float8_e4m3fn"}))
    with pytest.raises(ModelError, match="says dtype 'float8_e4m3fn'.*pass dtype= one of float32"):
        profile_model(str(tmp_path))
    assert profile_model(str(tmp_path), dtype="float16").dtype == "float16"


def test_moe_and_non_decoder_models_are_errors():
    mixtral = {**REAL_CONFIGS["mistral-7b-v0.1"], "model_type": "mixtral", "num_local_experts": 8}
    with pytest.raises(ModelError, match="model_type 'mixtral' is a mixture-of-experts model"):
        profile_from_config(mixtral)
    gpt2 = {"model_type": "gpt2", "n_layer": 12, "n_embd": 768, "vocab_size": 50257}
    with pytest.raises(ModelError, match="no 'num_hidden_layers' \\(model_type 'gpt2' does not follow"):
        profile_from_config(gpt2, model_id="gpt2")


def test_other_decoder_types_are_profiled_with_a_warning(caplog):
    config = {**REAL_CONFIGS["mistral-7b-v0.1"], "model_type": "olmo"}
    with caplog.at_level(logging.WARNING, logger="exo_lab.model.profile"):
        profile = profile_from_config(config, dtype="bfloat16")
    assert "'olmo' is profiled with the Llama layer layout" in caplog.text
    assert profile.model_type == "olmo"
    mistral = profile_from_config(REAL_CONFIGS["mistral-7b-v0.1"], dtype="bfloat16")
    assert profile.layer_bytes == mistral.layer_bytes


def test_profile_model_resolves_demo(tmp_path, monkeypatch):
    monkeypatch.setenv("EXO_LAB_CACHE", str(tmp_path))
    profile = profile_model("demo")
    assert (profile.model_id, profile.model_type, profile.dtype) == ("demo", "llama", "float32")
    assert profile.tied_embeddings is False and 4 <= profile.num_layers <= 8
