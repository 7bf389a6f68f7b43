"""tests/gguf_files.py: GGUF files written without llama.cpp. Its K-quant blocks are ggml's (gguf-py
reads back the weights, each within half a quantization step, and exo-lab's repacking agrees);
each recipe's file holds the tensor types llama.cpp gives it; and exo-lab loads every recipe to
the logits transformers computes from the weights the file holds.

Most files here use SmolLM2's first 1024 tokens (reading a 49152-token GGUF's metadata takes
seconds, and exo-lab reads it three times per file); one uses the whole vocabulary."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import Q4_K, dequantize

import gguf_files
from exo_lab.model.quant4 import repack

SMALL_VOCAB = 1024
TOKENS = [[1, 2, 3, 500, 17]]
# every recipe tied (as SmolLM2 is), and untied (an output.weight of its own) one K-quant and one legacy recipe
CASES = [(recipe, True) for recipe in gguf_files.RECIPES] + [("Q4_K_M", False), ("Q4_0", False)]
CASE_IDS = [f"{recipe}-{'tied' if tied else 'untied'}" for recipe, tied in CASES]


@pytest.fixture(scope="module")
def tokenizer_gguf():
    """SmolLM2's GGUF, found (or fetched) in exo-lab's own cache before the tests redirect it."""
    from exo_lab.errors import ModelError

    try:
        return gguf_files.tokenizer_source()
    except ModelError as exc:
        pytest.skip(f"SmolLM2's GGUF is not in the cache and cannot be fetched: {exc}")


@pytest.fixture(scope="module")
def written(tmp_path_factory, tokenizer_gguf):
    """``make(recipe, tied=True, vocab=SMALL_VOCAB)``: a file written once per module, with
    EXO_LAB_CACHE in a temporary folder (the sidecar folders exo-lab builds land there)."""
    folder = tmp_path_factory.mktemp("gguf-files")
    files = {}

    def make(recipe, tied=True, vocab=SMALL_VOCAB):
        key = (recipe, tied, vocab)
        if key not in files:
            name = f"m-{recipe}-{'tied' if tied else 'untied'}-{vocab or 'full'}.gguf"
            files[key] = gguf_files.write_llama_gguf(folder / name, recipe=recipe, tied=tied, vocab=vocab,
                                                     tokenizer_from=tokenizer_gguf)
        return files[key]

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EXO_LAB_CACHE", str(tmp_path_factory.mktemp("exo-lab-cache")))
        yield make


# ----------------------------------------------------------------------------- K-quant blocks

def _steps(kind: str, raw: np.ndarray) -> np.ndarray:
    """Each sub-block's quantization step as the bytes say (gguf-py's unpacking), per weight's group."""
    if kind == "Q4_K":
        blocks = raw.reshape(-1, 144)
        d = blocks[:, 0:2].copy().view(np.float16).astype(np.float64)
        sc, _ = Q4_K.get_scale_min(blocks[:, 4:16].copy())
        return d * sc                                                     # (blocks, 8) of 32
    blocks = raw.reshape(-1, 210)
    d = blocks[:, 208:210].copy().view(np.float16).astype(np.float64)
    return d * blocks[:, 192:208].view(np.int8).astype(np.float64)      # (blocks, 16) of 16


@pytest.mark.parametrize("exact", [False, True], ids=["any-scales", "exact-scales"])
@pytest.mark.parametrize("kind", ["Q4_K", "Q6_K"])
def test_k_quant_blocks_round_trip(kind, exact):
    rng = np.random.default_rng(7)
    rows, cols = 8, 512
    w = rng.normal(0, 0.02, size=(rows, cols)).astype(np.float32)
    w[1] += 0.03                                   # all positive: Q4_K's min clamps at 0
    w[2] -= 0.05                                   # all negative
    w[3, :256] = 0                                 # a block of zeros: scales 0
    w[4, 32:64] *= 20                              # one loud sub-block
    quantize = gguf_files.quantize_q4_k if kind == "Q4_K" else gguf_files.quantize_q6_k
    raw = quantize(w, exact_scales=exact)
    size, group = (144, 32) if kind == "Q4_K" else (210, 16)
    assert raw.dtype == np.uint8 and raw.shape == (rows, cols // 256 * size)

    back = dequantize(raw, getattr(GGMLQuantizationType, kind))
    assert back.shape == w.shape
    error = np.abs(back.astype(np.float64) - w).reshape(-1, group)
    step = _steps(kind, raw).reshape(-1)
    assert np.all(error.max(axis=1) <= step / 2 * (1 + 1e-5) + 1e-9)      # every weight on the grid
    groups = w.astype(np.float64).reshape(-1, 256 // group, group)
    if kind == "Q4_K":       # step <= (max - min (min clamped at 0) + dmin) / 15 + d
        blocks = raw.reshape(-1, 144)
        d = blocks[:, 0:2].copy().view(np.float16).astype(np.float64)
        dmin = blocks[:, 2:4].copy().view(np.float16).astype(np.float64)
        span = groups.max(axis=2) - np.minimum(groups.min(axis=2), 0)
        bound = (np.maximum(span, 0) + dmin) / 15 + d
    else:                    # step <= max |w| / 31 + d
        d = raw.reshape(-1, 210)[:, 208:210].copy().view(np.float16).astype(np.float64)
        bound = np.abs(groups).max(axis=2) / 31 + d
    assert np.all(step <= bound.reshape(-1) * (1 + 1e-6))
    assert np.all(back[3, :256] == 0)

    loaded = repack(kind, raw.reshape(-1), (rows, cols)).dequantize().numpy()
    if exact:                # sub-block scales exactly float16: exo-lab's values are gguf-py's, bit for bit
        assert np.array_equal(loaded, back)
    else:                    # exo-lab rounds d * sc to float16
        assert np.abs(loaded - back).max() <= 1e-3 * np.abs(back).max()


def test_k_quants_refuse_other_widths():
    with pytest.raises(ValueError, match="multiple of 256 columns"):
        gguf_files.quantize_q4_k(np.zeros((2, 384), np.float32))
    with pytest.raises(ValueError, match="multiple of 256 columns"):
        gguf_files.quantize_q6_k(np.zeros(256, np.float32))


def test_permute_is_llama_cpps_and_unpermute_undoes_it():
    w = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
    # llama.cpp: per head of 8 rows, the first half's rows and the second half's interleaved
    assert gguf_files.permute(w, 2)[:, 0].tolist() == [0, 12, 3, 15, 6, 18, 9, 21, 24, 36, 27, 39, 30, 42, 33, 45]
    assert np.array_equal(gguf_files.unpermute(gguf_files.permute(w, 2), 2), w)


# ----------------------------------------------------------------------------- recipes

def test_q4_k_m_gives_more_bits_where_llama_cpp_does():
    # llama.cpp's use_more_bits: the first and last eighth of the layers and every third between
    assert [i for i in range(4) if gguf_files.use_more_bits(i, 4)] == [2, 3]
    assert [i for i in range(8) if gguf_files.use_more_bits(i, 8)] == [0, 3, 6, 7]
    assert [i for i in range(32) if gguf_files.use_more_bits(i, 32)] == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24,
                                                                        27, 28, 29, 30, 31]


def expected_types(recipe: str, layers: int, tied: bool) -> dict[str, str]:
    """The layout spelled out, as llama.cpp writes it for a small llama."""
    matrix = {"F32": "F32", "F16": "F16", "Q8_0": "Q8_0", "Q4_0": "Q4_0", "Q4_1": "Q4_1", "Q4_K_M": "Q4_K"}[recipe]
    head = matrix if recipe in ("F32", "F16", "Q8_0") else "Q6_K"
    more = {"Q4_K_M": {2, 3}}.get(recipe, set())            # use_more_bits(i, 4)
    types = {"token_embd.weight": head if tied else matrix, "output_norm.weight": "F32"}
    if not tied:
        types["output.weight"] = head
    for i in range(layers):
        types.update({f"blk.{i}.attn_norm.weight": "F32", f"blk.{i}.ffn_norm.weight": "F32",
                      f"blk.{i}.attn_q.weight": matrix, f"blk.{i}.attn_k.weight": matrix,
                      f"blk.{i}.attn_v.weight": "Q6_K" if i in more else matrix,
                      f"blk.{i}.attn_output.weight": matrix, f"blk.{i}.ffn_gate.weight": matrix,
                      f"blk.{i}.ffn_up.weight": matrix, f"blk.{i}.ffn_down.weight": "Q6_K" if i in more else matrix})
    return types


@pytest.mark.parametrize("recipe, tied", CASES, ids=CASE_IDS)
def test_recipe_files_hold_llama_cpps_tensor_types(written, recipe, tied):
    model = written(recipe, tied=tied)
    reader = GGUFReader(str(model.path))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types == expected_types(recipe, 4, tied) == model.types
    shapes = {t.name: [int(n) for n in reversed(list(t.shape))] for t in reader.tensors}
    assert shapes["token_embd.weight"] == [SMALL_VOCAB, 256]
    assert shapes["blk.0.attn_k.weight"] == [128, 256] and shapes["blk.0.ffn_down.weight"] == [256, 512]
    fields = reader.fields
    assert fields["general.architecture"].contents() == "llama"
    assert fields["general.file_type"].contents() == {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7,
                                                      "Q4_K_M": 15}[recipe]
    assert fields["llama.attention.head_count_kv"].contents() == 2
    assert fields["llama.rope.dimension_count"].contents() == 64
    assert len(fields["tokenizer.ggml.tokens"].contents()) == SMALL_VOCAB == fields["llama.vocab_size"].contents()
    # what the file holds is what the helper says it holds (q rows in llama.cpp's order in the file)
    q = next(t for t in reader.tensors if t.name == "blk.1.attn_q.weight")
    values = dequantize(np.asarray(q.data), q.tensor_type) if types[q.name] not in ("F32", "F16") \
        else np.asarray(q.data, np.float32)
    assert np.array_equal(gguf_files.unpermute(values.reshape(256, 256), 4),
                          model.weights["model.layers.1.self_attn.q_proj.weight"])


# ----------------------------------------------------------------------------- exo-lab loads them

def exo_lab_logits(model):
    from exo_lab.control_types import ShardSpec
    from exo_lab.weights.checkpoint import load_stage
    from exo_lab.weights.resolve import resolve_model

    folder = resolve_model(str(model.path))
    layers = model.layers
    stage = load_stage(ShardSpec(str(folder), 0, layers, layers, dtype="float32", max_context=64, max_batch=1))
    with torch.no_grad():
        logits = stage.forward(torch.tensor(TOKENS), [0], [0])
    return folder, logits


def transformers_logits(model, folder):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig.from_pretrained(str(folder))
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads,
            config.intermediate_size, config.vocab_size, config.max_position_embeddings) == \
        (model.hidden, model.layers, model.heads, model.kv_heads, model.intermediate, model.vocab, 512)
    assert config.tie_word_embeddings == model.tied
    assert config.rms_norm_eps == pytest.approx(1e-5)
    torch.manual_seed(0)
    reference = LlamaForCausalLM(config).eval()
    missing, unexpected = reference.load_state_dict({k: torch.from_numpy(v) for k, v in model.weights.items()},
                                                    strict=False)
    assert not unexpected and set(missing) == ({"lm_head.weight"} if model.tied else set())
    if model.tied:
        assert reference.lm_head.weight.data_ptr() == reference.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        return reference(torch.tensor(TOKENS)).logits[:, -1]


def check_loads_like_transformers(model):
    folder, got = exo_lab_logits(model)
    want = transformers_logits(model, folder)
    assert got.shape == (1, model.vocab)
    assert torch.allclose(got, want, rtol=0, atol=1e-4), (got - want).abs().max()
    table = json.loads((folder / "gguf.json").read_text())["tensors"]
    assert {entry["gguf_name"]: entry["type"] for entry in table.values()} == model.types
    return folder


@pytest.mark.parametrize("recipe, tied", CASES, ids=CASE_IDS)
def test_exo_lab_loads_each_recipe_as_transformers_computes_it(written, recipe, tied):
    check_loads_like_transformers(written(recipe, tied=tied))


def test_whole_smollm2_vocabulary_and_tokenizer(written):
    from transformers import AutoTokenizer

    model = written("Q4_K_M", vocab=None)
    assert model.vocab == 49152 and model.types == expected_types("Q4_K_M", 4, True)
    folder = check_loads_like_transformers(model)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    assert len(tokenizer) == 49152
    ids = tokenizer("Hello, world!").input_ids
    assert tokenizer.decode(ids) == "Hello, world!"
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                           add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
