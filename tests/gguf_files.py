"""Small GGUF files written here, with no llama.cpp: random-weight llama models of every tensor
type exo-lab reads (F32, F16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K), for tests.

gguf-py quantizes Q4_0, Q4_1 and Q8_0 itself; :func:`quantize_q4_k` and :func:`quantize_q6_k`
write ggml's K-quant blocks (``block_q4_K``, ``block_q6_K`` of ggml-common.h) with a simple
quantizer: per sub-block min and max (Q4_K) or largest magnitude (Q6_K), the 6-/8-bit
sub-block scales rounded *up* so that every weight of the sub-block is on the grid, codes
rounded to nearest. It is not llama.cpp's search, but every weight is within half a step of
its value. With ``exact_scales=True`` the block scales ``d``/``dmin`` keep few enough significant
bits (5 for Q4_K, 4 for Q6_K) that each sub-block's ``d * sc`` (and ``dmin * m``) is exactly a
float16: then exo-lab's repacking (which rounds those products to float16) loses nothing, and
what it loads equals gguf-py's dequantization bit for bit.

:func:`write_llama_gguf` writes a llama model as llama.cpp's converter and ``llama-quantize``
would: llama.cpp's tensor names, q/k rows permuted for its rotary layout, norms in F32, and the
tokenizer (metadata and vocabulary) of SmolLM2-135M-Instruct's GGUF; it returns the float32
weights the file holds (dequantized, q/k rows back in Hugging Face's order) by Hugging Face
name, the reference a test compares a loaded model against.

Import it as ``import gguf_files`` (pytest puts tests/ on the path, as for ``netlab``).
"""
from __future__ import annotations

import dataclasses
import functools
import pathlib

import numpy as np

QK_K = 256
RECIPES = ("F32", "F16", "Q8_0", "Q4_0", "Q4_1", "Q4_K_M")
_FILE_TYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q4_K_M": 15}   # gguf.LlamaFileType
_HF_LAYER = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
             "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
             "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


# ----------------------------------------------------------------------------- K-quant blocks

def _f16_up(x: np.ndarray, bits: int = 11) -> np.ndarray:
    """float16 values >= ``x`` (x >= 0) with at most ``bits`` significant bits (0 stays 0)."""
    x = np.asarray(x, np.float64)
    exponent = np.floor(np.log2(np.where(x > 0, x, 1.0)))
    quantum = np.exp2(exponent - (bits - 1))
    up = np.where(x > 0, np.ceil(x / quantum) * quantum, 0.0)
    half = up.astype(np.float16)
    low = half.astype(np.float64) < up
    half[low] = np.nextafter(half[low], np.float16(np.inf))
    return half


def _divide(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a / b, 0 where b is 0."""
    return np.where(b > 0, a / np.where(b > 0, b, 1), 0)


def _rows_of_blocks(w: np.ndarray, kind: str) -> tuple[np.ndarray, int, int]:
    w = np.asarray(w, np.float32)
    if w.ndim != 2 or w.shape[1] % QK_K:
        raise ValueError(f"{kind} needs a 2-D matrix with a multiple of {QK_K} columns, got shape {w.shape}")
    rows, cols = w.shape
    return w.reshape(rows * cols // QK_K, QK_K).astype(np.float64), rows, cols


def quantize_q4_k(w: np.ndarray, *, exact_scales: bool = False) -> np.ndarray:
    """``w`` (rows, cols), float32, cols a multiple of 256, as ggml's Q4_K blocks: uint8
    (rows, cols // 256 * 144). Each block of 256: float16 ``d`` and ``dmin``, 12 bytes of 8
    six-bit (scale, min) pairs (get_scale_min_k4's packing), 128 bytes of 4-bit codes (per 64
    weights, 32 bytes: low nibbles sub-block 2c, high nibbles 2c + 1); ``w = d*sc*q - dmin*m``."""
    x, rows, cols = _rows_of_blocks(w, "Q4_K")
    bits = 5 if exact_scales else 11
    sub = x.reshape(-1, 8, 32)
    need_min = np.maximum(-sub.min(axis=2), 0)                               # (n, 8): m * dmin >= this
    dmin = _f16_up(need_min.max(axis=1) / 63, bits)
    m = np.clip(np.ceil(_divide(need_min, dmin.astype(np.float64)[:, None])), 0, 63)
    offset = dmin.astype(np.float64)[:, None] * m
    need_scale = np.maximum(sub.max(axis=2) + offset, 0) / 15                # (n, 8): sc * d >= this
    d = _f16_up(need_scale.max(axis=1) / 63, bits)
    sc = np.clip(np.ceil(_divide(need_scale, d.astype(np.float64)[:, None])), 0, 63)
    step = d.astype(np.float64)[:, None] * sc
    q = np.clip(np.rint(_divide(sub + offset[..., None], step[..., None])), 0, 15).astype(np.uint8)
    sc, m = sc.astype(np.uint8), m.astype(np.uint8)
    scales = np.empty((x.shape[0], 12), np.uint8)
    scales[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    scales[:, 4:8] = m[:, :4] | ((m[:, 4:] >> 4) << 6)
    scales[:, 8:12] = (sc[:, 4:] & 0x0F) | ((m[:, 4:] & 0x0F) << 4)
    pairs = q.reshape(-1, 4, 2, 32)
    qs = (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(-1, 128)
    blocks = np.concatenate([d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2), scales, qs], axis=1)
    return np.ascontiguousarray(blocks).reshape(rows, cols // QK_K * 144)


def quantize_q6_k(w: np.ndarray, *, exact_scales: bool = False) -> np.ndarray:
    """``w`` (rows, cols), float32, cols a multiple of 256, as ggml's Q6_K blocks: uint8
    (rows, cols // 256 * 210). Each block of 256: ``ql`` 128 bytes (low 4 bits), ``qh`` 64
    bytes (high 2 bits), 16 int8 scales (one per 16 weights), float16 ``d``; per half of 128
    weights, codes ``L`` (0..63) at l, l+32, l+64, l+96 share ``ql[l]``/``ql[l+32]`` and
    ``qh[l]`` as in dequantize_row_q6_K; ``w = d*sc[g]*(L - 32)``."""
    x, rows, cols = _rows_of_blocks(w, "Q6_K")
    bits = 4 if exact_scales else 11
    groups = x.reshape(-1, 16, 16)
    need = np.abs(groups).max(axis=2) / 31                                   # (n, 16): codes within -31..31
    d = _f16_up(need.max(axis=1) / 127, bits)
    sc = np.clip(np.ceil(_divide(need, d.astype(np.float64)[:, None])), 0, 127)
    step = d.astype(np.float64)[:, None] * sc
    q = np.clip(np.rint(_divide(groups, step[..., None])), -32, 31)
    codes = (q + 32).astype(np.uint8).reshape(-1, 2, 4, 32)                  # halves of 128, quarters of 32
    a, b, c, e = codes[:, :, 0], codes[:, :, 1], codes[:, :, 2], codes[:, :, 3]
    ql = np.concatenate([(a & 0x0F) | ((c & 0x0F) << 4), (b & 0x0F) | ((e & 0x0F) << 4)], axis=2)   # (n, 2, 64)
    qh = (a >> 4) | ((b >> 4) << 2) | ((c >> 4) << 4) | ((e >> 4) << 6)                               # (n, 2, 32)
    blocks = np.concatenate([ql.reshape(-1, 128), qh.reshape(-1, 64), sc.astype(np.int8).view(np.uint8),
                             d.view(np.uint8).reshape(-1, 2)], axis=1)
    return np.ascontiguousarray(blocks).reshape(rows, cols // QK_K * 210)


def quantize(w: np.ndarray, kind: str, *, exact_scales: bool = False) -> np.ndarray:
    """``w`` (rows, cols) float32 in GGUF type ``kind``: float32/float16 values, or the uint8
    blocks (rows, bytes per row) that ``GGUFWriter.add_tensor(..., raw_dtype=...)`` takes."""
    import gguf

    if kind == "F32":
        return np.asarray(w, np.float32)
    if kind == "F16":
        return np.asarray(w, np.float32).astype(np.float16)
    if kind == "Q4_K":
        return quantize_q4_k(w, exact_scales=exact_scales)
    if kind == "Q6_K":
        return quantize_q6_k(w, exact_scales=exact_scales)
    return gguf.quants.quantize(np.asarray(w, np.float32), getattr(gguf.GGMLQuantizationType, kind))


def dequantize(data: np.ndarray, kind: str) -> np.ndarray:
    """What gguf-py reads back from :func:`quantize`'s result, float32 (rows, cols)."""
    import gguf

    if kind in ("F32", "F16"):
        return np.asarray(data).astype(np.float32)
    return gguf.quants.dequantize(data, getattr(gguf.GGMLQuantizationType, kind)).astype(np.float32)


# ----------------------------------------------------------------------------- llama.cpp's conventions

def permute(w: np.ndarray, heads: int) -> np.ndarray:
    """Hugging Face q/k rows -> llama.cpp's (convert_hf_to_gguf.py LlamaModel.permute)."""
    rows = w.shape[0]
    return w.reshape(heads, 2, rows // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """The inverse of :func:`permute`."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def use_more_bits(layer: int, layers: int) -> bool:
    """llama.cpp's rule (llama-quant.cpp) for which attn_v / ffn_down get more bits in Q4_K_M."""
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


def tensor_type(recipe: str, name: str, *, layers: int, tied: bool) -> str:
    """The GGUF type llama.cpp gives tensor ``name`` in a ``recipe`` file (llama_tensor_get_type
    for a llama model whose matrix rows are multiples of 256 long): norms F32; the output head (the token
    embedding when it is tied) Q6_K in the 4-bit recipes; Q4_K_M's attn_v and ffn_down Q6_K in
    the layers :func:`use_more_bits` names, every other matrix the recipe's type."""
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; one of {', '.join(RECIPES)}")
    if name.endswith("norm.weight"):
        return "F32"
    if recipe in ("F32", "F16"):
        return recipe
    base = "Q4_K" if recipe == "Q4_K_M" else recipe
    if name == "output.weight" or (tied and name == "token_embd.weight"):
        return base if base == "Q8_0" else "Q6_K"
    if recipe == "Q4_K_M" and name.startswith("blk.") and name.endswith((".attn_v.weight", ".ffn_down.weight")):
        return "Q6_K" if use_more_bits(int(name.split(".")[1]), layers) else base
    return base


# ----------------------------------------------------------------------------- the model file

@functools.lru_cache(maxsize=2)
def _source_fields(source: str) -> tuple[tuple[str, object, object, object], ...]:
    """Every ``tokenizer.*`` key of the GGUF file ``source``: (key, value, type, sub type)."""
    import gguf

    reader = gguf.GGUFReader(source)
    fields = []
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        fields.append((key, field.contents(), kind, sub))
    return tuple(fields)


def tokenizer_fields(source, vocab: int | None = None) -> list[tuple[str, object, object, object]]:
    """``source``'s ``tokenizer.*`` keys (key, value, type, sub type); with ``vocab``, its first
    ``vocab`` tokens only, with the merges whose parts and result are among them (a smaller
    tokenizer that is still a valid byte-level BPE) and without token ids past them."""
    fields = list(_source_fields(str(source)))
    if vocab is None:
        return fields
    values = dict((key, value) for key, value, _, _ in fields)
    tokens = values["tokenizer.ggml.tokens"][:vocab]
    kept = set(tokens)
    out = []
    for key, value, kind, sub in fields:
        if key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.scores"):
            value = value[:vocab]
        elif key == "tokenizer.ggml.merges":
            value = [merge for merge in value
                     if (parts := merge.split(" ")) and len(parts) == 2 and parts[0] in kept and parts[1] in kept
                     and parts[0] + parts[1] in kept]
        elif key.endswith("_token_id") and int(value) >= vocab:
            continue
        out.append((key, value, kind, sub))
    return out


def tokenizer_source() -> pathlib.Path:
    """SmolLM2-135M-Instruct's GGUF (from exo-lab's cache; fetched once)."""
    from exo_lab.weights.smollm2 import smollm2_gguf_path

    return smollm2_gguf_path()


@dataclasses.dataclass
class LlamaGGUF:
    """A written file: ``path``; ``types``, GGUF tensor name -> GGUF type; ``weights``, Hugging
    Face name -> the float32 values the file holds (q/k rows in Hugging Face's order; no
    ``lm_head.weight`` when tied)."""

    path: pathlib.Path
    types: dict[str, str]
    weights: dict[str, np.ndarray]
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool


def write_llama_gguf(dest, *, hidden: int = 256, layers: int = 4, heads: int = 4, kv_heads: int = 2,
                     intermediate: int = 512, recipe: str = "Q4_K_M", seed: int = 0, tied: bool = True,
                     tokenizer_from=None, vocab: int | None = None) -> LlamaGGUF:
    """A random llama model (weights normal(0, 0.02), norms 1 + normal(0, 0.05)) written to the
    GGUF file ``dest`` in ``recipe`` (:data:`RECIPES`; types by :func:`tensor_type`), with the
    tokenizer and vocabulary of ``tokenizer_from`` (default: SmolLM2's GGUF, 49152 tokens), or
    with ``vocab`` its first ``vocab`` tokens only (:func:`tokenizer_fields`: a file that loads
    faster, as reading a GGUF's metadata takes seconds per 50k tokens).
    K-quant blocks use float16-exact sub-block scales (see the module docstring)."""
    import gguf

    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; one of {', '.join(RECIPES)}")
    dest = pathlib.Path(dest)
    source = str(tokenizer_from if tokenizer_from is not None else tokenizer_source())
    fields = tokenizer_fields(source, vocab)
    vocab = next(len(value) for key, value, _, _ in fields if key == "tokenizer.ggml.tokens")
    head_dim = hidden // heads
    rng = np.random.default_rng(seed)

    def matrix(rows, cols):
        return rng.normal(0.0, 0.02, size=(rows, cols)).astype(np.float32)

    def norm(size):
        return (1.0 + rng.normal(0.0, 0.05, size=size)).astype(np.float32)

    tensors = [("token_embd.weight", "model.embed_tokens.weight", matrix(vocab, hidden), 0)]
    for i in range(layers):
        prefix, hf = f"blk.{i}.", f"model.layers.{i}."
        for name, rows, cols, permuted in (("attn_norm", hidden, 0, 0), ("attn_q", heads * head_dim, hidden, heads),
                                           ("attn_k", kv_heads * head_dim, hidden, kv_heads),
                                           ("attn_v", kv_heads * head_dim, hidden, 0),
                                           ("attn_output", hidden, heads * head_dim, 0), ("ffn_norm", hidden, 0, 0),
                                           ("ffn_gate", intermediate, hidden, 0), ("ffn_up", intermediate, hidden, 0),
                                           ("ffn_down", hidden, intermediate, 0)):
            values = norm(rows) if name.endswith("norm") else matrix(rows, cols)
            tensors.append((f"{prefix}{name}.weight", f"{hf}{_HF_LAYER[name]}.weight", values, permuted))
    tensors.append(("output_norm.weight", "model.norm.weight", norm(hidden), 0))
    if not tied:
        tensors.append(("output.weight", "lm_head.weight", matrix(vocab, hidden), 0))

    writer = gguf.GGUFWriter(str(dest), "llama")
    writer.add_name("exo-lab test llama")
    writer.add_context_length(512)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(intermediate)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(vocab)
    writer.add_file_type(_FILE_TYPES[recipe])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, value, kind, sub in fields:
        writer.add_key_value(key, value, kind, sub_type=sub)

    types, weights = {}, {}
    for name, hf_name, values, permuted in tensors:
        kind = tensor_type(recipe, name, layers=layers, tied=tied)
        stored = permute(values, permuted) if permuted else values
        data = quantize(stored, kind, exact_scales=True)
        if data.dtype == np.uint8:
            writer.add_tensor(name, data, raw_dtype=getattr(gguf.GGMLQuantizationType, kind))
        else:
            writer.add_tensor(name, data)
        back = dequantize(data, kind)
        types[name] = kind
        weights[hf_name] = unpermute(back, permuted) if permuted else back
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return LlamaGGUF(dest, types, weights, hidden, layers, heads, kv_heads, intermediate, vocab, tied)
