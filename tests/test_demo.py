"""The demo / test model builder: a real tokenizer and sharded random-weight checkpoints."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from exo_lab.weights.demo import (
    ARCHITECTURES, BUILD_RECORD, build_random_model, build_tokenizer, demo_model_dir,
)
from exo_lab.errors import ModelError

torch.set_num_threads(1)

MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Hello! How does the cluster run a language model?"},
]


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _tensors(folder):
    tensors = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as handle:
            tensors.update({name: handle.get_tensor(name) for name in handle.keys()})
    return tensors


def _greedy_new_tokens(folder, count=20):
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=count, min_new_tokens=count, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


def test_tokenizer_build_is_byte_identical(tmp_path):
    build_tokenizer(tmp_path / "a")
    build_tokenizer(tmp_path / "b")
    first, second = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert "tokenizer.json" in first and "tokenizer_config.json" in first
    assert first == second


def test_tokenizer_is_a_real_bpe_with_chatml(tmp_path):
    build_tokenizer(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert 1000 <= len(tokenizer) <= 2000
    assert tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [0, 1, 2]
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    text = "The cluster runs a language model in Jupyter; ünïcødé and 日本語 survive too."
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert len(ids) < len(text.encode()) / 2   # real merges, not one token per byte
    prompt = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert prompt == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHello! How does the cluster run a language model?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    ids = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)["input_ids"]
    assert ids[0] == 1 and ids.count(2) == 2


def test_random_model_folder_is_a_sharded_checkpoint(tiny_model_dir):
    folder = tiny_model_dir()
    shards = sorted(p.name for p in folder.glob("*.safetensors"))
    assert len(shards) > 1
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert set(index["weight_map"]) == set(model.state_dict())
    config = json.loads((folder / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert (config["model_type"], config["num_hidden_layers"], config["hidden_size"]) == ("llama", 4, 64)
    assert config["vocab_size"] == len(tokenizer)
    assert config["eos_token_id"] == tokenizer.eos_token_id == 2
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [2, 0]


def test_same_seed_same_weights_other_seed_other_weights(tmp_path, tiny_model_dir):
    reference = _tensors(tiny_model_dir())
    again = _tensors(build_random_model(tmp_path / "again"))
    other = _tensors(build_random_model(tmp_path / "other", seed=1))
    assert reference.keys() == again.keys() == other.keys()
    assert all(torch.equal(reference[name], again[name]) for name in reference)
    weight = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(reference[weight], other[weight])


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("tied", [False, True])
def test_every_architecture_loads_and_generates_varied_tokens(tiny_model_dir, architecture, tied):
    folder = tiny_model_dir(architecture, tie_word_embeddings=tied)
    config = AutoConfig.from_pretrained(folder)
    assert config.model_type == architecture and config.tie_word_embeddings is tied
    assert config.hidden_size // config.num_attention_heads == getattr(config, "head_dim", 16) == 16
    new_tokens = _greedy_new_tokens(folder)
    assert len(set(new_tokens)) >= 5, new_tokens


def test_finished_build_is_reused_not_rebuilt(tiny_model_dir):
    folder = tiny_model_dir()
    stamp = (folder / BUILD_RECORD).stat().st_mtime_ns
    assert build_random_model(folder) == folder
    assert (folder / BUILD_RECORD).stat().st_mtime_ns == stamp


def test_cached_folder_with_other_settings_is_an_error(tiny_model_dir):
    folder = tiny_model_dir()
    with pytest.raises(ModelError, match=r"num_layers: 4 there, 6 asked.*delete the folder"):
        build_random_model(folder, num_layers=6)


def test_unrelated_folder_is_never_overwritten(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ModelError, match="not a finished exo-lab random model"):
        build_random_model(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_bad_settings_are_errors(tmp_path):
    with pytest.raises(ModelError, match="unknown architecture 'gpt2'.*llama, mistral, qwen2, qwen3"):
        build_random_model(tmp_path / "m", architecture="gpt2")
    with pytest.raises(ModelError, match="hidden_size 60 is not a multiple of num_attention_heads 8"):
        build_random_model(tmp_path / "m", hidden_size=60, num_attention_heads=8)
    assert not (tmp_path / "m").exists()


BUILD_SCRIPT = "import sys; from exo_lab.weights.demo import build_random_model; print(build_random_model(sys.argv[1]))"


def test_concurrent_builders_all_get_the_one_finished_folder(tmp_path):
    target = tmp_path / "shared" / "model"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", BUILD_SCRIPT, str(target)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [proc.communicate(timeout=120) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], [err for _, err in results]
    assert [out.strip() for out, _ in results] == [str(target)] * 2
    assert sorted(p.name for p in target.parent.iterdir()) == ["model"]   # no staging left over
    assert (target / BUILD_RECORD).is_file()
    AutoModelForCausalLM.from_pretrained(target)


def test_demo_model_is_built_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EXO_LAB_CACHE", str(tmp_path / "cache"))
    started = time.perf_counter()
    folder = demo_model_dir()
    assert time.perf_counter() - started < 30   # target < 5 s; generous for a loaded CI box
    assert folder == tmp_path / "cache" / "models" / "demo-v1"
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llama" and config["tie_word_embeddings"] is False
    assert 4 <= config["num_hidden_layers"] <= 8 and 128 <= config["hidden_size"] <= 256
    size_bytes = sum(p.stat().st_size for p in folder.iterdir())
    assert 1_000_000 < size_bytes < 30_000_000
    assert len(list(folder.glob("*.safetensors"))) > 1
    stamp = (folder / BUILD_RECORD).stat().st_mtime_ns
    assert demo_model_dir() == folder and (folder / BUILD_RECORD).stat().st_mtime_ns == stamp
    assert len(set(_greedy_new_tokens(folder))) >= 5
