"""ModelProfile: the byte counts the planner needs, computed from a model's config.json alone."""
from __future__ import annotations

import logging
from dataclasses import dataclass

from ..errors import ModelError
from ..units import COMPUTE_DTYPES, DTYPE_BYTES, DTYPES, GGUF_RECIPES

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelProfile:
    """Sizes of one causal LM for one dtype. All sizes in bytes; no weights are read.

    A tied model shares its input embedding with lm_head; when the first and last stage sit on
    different nodes the last stage still needs its own copy, so ``lm_head_bytes`` is always the
    size of the head matrix and ``tied_embeddings`` tells whether a single stage may share it.
    """

    model_id: str
    model_type: str                 # config.json "model_type": llama, mistral, qwen2, qwen3, ...
    dtype: str                      # "float32", "bfloat16", "float16", "int8" (weight-only)
    num_layers: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    layer_bytes: int                # parameter bytes of ONE decoder layer
    embedding_bytes: int            # input embedding matrix
    final_norm_bytes: int
    lm_head_bytes: int              # the head matrix (+ bias), also when tied
    tied_embeddings: bool
    kv_bytes_per_token_per_layer: int   # K and V for one token in one layer, at dtype
    activation_bytes_per_token: int     # transient workspace per token in flight (one layer at a time)

    @property
    def total_parameter_bytes(self) -> int:
        """Bytes of the whole model as transformers holds it (the head counted once when tied)."""
        head = 0 if self.tied_embeddings else self.lm_head_bytes
        return self.embedding_bytes + self.num_layers * self.layer_bytes + self.final_norm_bytes + head



# Model types whose layer layout is checked against transformers in tests/test_profile.py.
# Others that carry the same config keys are profiled with the Llama layout and a warning.
VERIFIED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")

# Config keys that mark layouts the decoder-layer formula below does not describe.
_UNSUPPORTED_KEYS = {
    "num_local_experts": "mixture-of-experts",
    "num_experts": "mixture-of-experts",
    "n_routed_experts": "mixture-of-experts",
    "kv_lora_rank": "multi-head latent attention",
}

# Transient math is done in float32 whatever the weights' dtype (norms and softmax upcast).
_ACTIVATION_BYTES = 4


def profile_from_config(config: dict, *, dtype: str = "float32", model_id: str = "model",
                        tensors: dict[str, dict] | None = None) -> ModelProfile:
    """Compute a :class:`ModelProfile` from a config.json dict, without reading weights.

    Parameters:
        config: the parsed config.json (see :func:`exo_lab.models.read_model_config`).
        dtype: the dtype the weights and KV cache will be held in: one of ``DTYPE_BYTES``.
        model_id: recorded in the profile, for messages.
        tensors: for dtype "gguf", the GGUF model's tensor table (``gguf.json``'s, or
            :func:`recipe_table`'s): each tensor counted at its real bytes
            once loaded; a layer is planned at the largest layer's bytes (Q4_K_M files give some
            layers Q6_K matrices).

    Raises:
        ModelError: unknown dtype (listing the allowed ones), a missing or bad config key, or a
            model type whose layers do not follow the Llama-style decoder pattern.
    """
    from ..weights.resolve import check_config_keys

    _dtype_bytes(dtype)
    # int8 is weight-only: the layers' matrices shrink, the rest stays in the compute dtype.
    dtype_bytes = DTYPE_BYTES[COMPUTE_DTYPES[dtype]]
    check_config_keys(config, source=f"config.json of {model_id}")
    _check_layout(config)
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    sizes = {}
    if dtype == "gguf":
        sizes = _gguf_sizes(config, tensors, model_id)
    return ModelProfile(
        model_id=model_id,
        model_type=config["model_type"],
        dtype=dtype,
        num_layers=config["num_hidden_layers"],
        hidden_size=hidden,
        intermediate_size=config["intermediate_size"],
        vocab_size=vocab,
        max_position_embeddings=int(config.get("max_position_embeddings") or 0),
        layer_bytes=sizes.get("layer") or layer_bytes(config, dtype),
        embedding_bytes=sizes.get("embedding") or vocab * hidden * dtype_bytes,
        final_norm_bytes=sizes.get("norm") or hidden * dtype_bytes,
        lm_head_bytes=sizes.get("head") or vocab * hidden * dtype_bytes,   # no supported type has a head bias
        tied_embeddings=bool(config.get("tie_word_embeddings", False)),
        kv_bytes_per_token_per_layer=2 * _num_kv_heads(config) * head_dim(config) * dtype_bytes,
        activation_bytes_per_token=activation_bytes_per_token(config),
    )


def profile_model(model_id: str, *, dtype: str | None = None, gguf_recipe: str | None = None) -> ModelProfile:
    """Profile ``model_id`` (``demo``, a folder or a cached hub id) from its config.json alone.

    ``dtype`` None means the config's ``dtype`` (or older ``torch_dtype``), else float32; "gguf"
    for a GGUF model. ``gguf_recipe`` (e.g. "Q4_K_M") profiles the model as the GGUF file
    llama.cpp would quantize it into (:func:`recipe_table`), dtype "gguf".

    Raises:
        ModelError: the model cannot be resolved, its config is malformed, or the dtype is unknown.
    """
    from ..weights.resolve import read_model_config, resolve_model

    from ..weights.gguf import tensor_table

    folder = resolve_model(model_id, need_weights=False)
    config = read_model_config(folder)
    tensors = tensor_table(folder)
    if gguf_recipe is not None:
        tensors, dtype = recipe_table(config, gguf_recipe), "gguf"
    if dtype is None and tensors is not None:
        dtype = "gguf"
    if dtype is None:
        dtype = config.get("dtype") or config.get("torch_dtype") or "float32"
        if dtype not in DTYPE_BYTES:
            raise ModelError(f"config.json of {model_id} says dtype {dtype!r}, which exo-lab does "
                             f"not run; pass dtype= one of {', '.join(DTYPE_BYTES)}")
    return profile_from_config(config, dtype=dtype, model_id=model_id, tensors=tensors)


def _dtype_bytes(dtype: str) -> int:
    if dtype not in DTYPES:
        raise ModelError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return DTYPE_BYTES.get(dtype, 1)


def _gguf_sizes(config: dict, tensors: dict[str, dict] | None, model_id: str) -> dict[str, int]:
    """Bytes of a GGUF model's layers (the largest), embedding, final norm and head, from its table."""
    from .quant4 import layout_bytes

    def bytes_of(entry: dict) -> int:
        return layout_bytes(entry["type"], tuple(entry["shape"]))

    if not tensors:
        raise ModelError(f"dtype 'gguf' keeps a GGUF file's own formats, but {model_id} is not a GGUF model; "
                         f"use dtype int4 (or int8, bfloat16, float32) for it")
    per_layer = [0] * config["num_hidden_layers"]
    for name, entry in tensors.items():
        parts = name.split(".")
        if "layers" in parts:
            per_layer[int(parts[parts.index("layers") + 1])] += bytes_of(entry)
    embedding = bytes_of(tensors["model.embed_tokens.weight"])
    head = tensors.get("lm_head.weight") or tensors["model.embed_tokens.weight"]
    return {"layer": max(per_layer), "embedding": embedding, "norm": bytes_of(tensors["model.norm.weight"]),
            "head": bytes_of(head)}


def _check_layout(config: dict) -> None:
    model_type = config["model_type"]
    for key, kind in _UNSUPPORTED_KEYS.items():
        if config.get(key):
            raise ModelError(f"model_type {model_type!r} is a {kind} model ({key}={config[key]}); "
                             f"exo-lab supports dense decoder layers like {', '.join(VERIFIED_MODEL_TYPES)}")
    if config["num_attention_heads"] % _num_kv_heads(config):
        raise ModelError(f"num_attention_heads {config['num_attention_heads']} is not a multiple of "
                         f"num_key_value_heads {_num_kv_heads(config)}; config.json is inconsistent")
    if model_type not in VERIFIED_MODEL_TYPES:
        logger.warning("model_type %r is profiled with the Llama layer layout; its byte counts "
                       "are not verified (verified: %s)", model_type, ", ".join(VERIFIED_MODEL_TYPES))


def head_dim(config: dict) -> int:
    """Per-head width: ``head_dim`` when set (Qwen3, Mistral), else hidden_size / heads."""
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def _num_kv_heads(config: dict) -> int:
    return config.get("num_key_value_heads") or config["num_attention_heads"]


def layer_bytes(config: dict, dtype: str) -> int:
    """Bytes of one decoder layer's parameters held as ``dtype``. For int8: each Linear matrix at
    1 byte per weight plus one compute-dtype scale per output row; norms and biases unquantized."""
    kept_bytes = DTYPE_BYTES[COMPUTE_DTYPES[dtype]]
    count = layer_parameter_count(config)
    if dtype == "int4":     # codes at 4 bits, a float16 scale and min per 32 (exo_lab.model.quant4)
        weights = sum(out * inner for out, inner in linear_shapes(config))
        return weights // 2 + weights // 32 * 4 + (count - weights) * kept_bytes
    if dtype != "int8":
        return count * kept_bytes
    matrices = linear_shapes(config)
    weights = sum(out * inner for out, inner in matrices)
    scales = sum(out for out, _ in matrices)
    return weights * DTYPE_BYTES["int8"] + (scales + count - weights) * kept_bytes


def linear_shapes(config: dict) -> list[tuple[int, int]]:
    """(out_features, in_features) of one decoder layer's Linear matrices: q, k, v, o, gate, up, down."""
    hidden, inner = config["hidden_size"], config["intermediate_size"]
    q_width = config["num_attention_heads"] * head_dim(config)
    kv_width = _num_kv_heads(config) * head_dim(config)
    return [(q_width, hidden), (kv_width, hidden), (kv_width, hidden), (hidden, q_width),
            (inner, hidden), (inner, hidden), (hidden, inner)]


def layer_parameter_count(config: dict) -> int:
    """Parameters of one decoder layer: attention, MLP and the two RMSNorms."""
    return _attention_parameter_count(config) + _mlp_parameter_count(config) + 2 * config["hidden_size"]


def _attention_parameter_count(config: dict) -> int:
    hidden, model_type = config["hidden_size"], config["model_type"]
    q_width = config["num_attention_heads"] * head_dim(config)
    kv_width = _num_kv_heads(config) * head_dim(config)
    weights = hidden * q_width * 2 + hidden * kv_width * 2     # q, o; k, v
    qkv_bias, o_bias = _attention_biases(config)
    count = weights + qkv_bias * (q_width + 2 * kv_width) + o_bias * hidden
    if model_type == "qwen3":
        count += 2 * head_dim(config)                            # q_norm, k_norm (per head width)
    return count


def _attention_biases(config: dict) -> tuple[bool, bool]:
    """(q/k/v have a bias, o has a bias), as each architecture's transformers code builds them."""
    model_type = config["model_type"]
    if model_type == "mistral":
        return False, False                                      # no bias, whatever the config says
    if model_type == "qwen2":
        return True, False                                       # always, not configurable
    bias = bool(config.get("attention_bias", False))
    return bias, bias


def _mlp_parameter_count(config: dict) -> int:
    hidden, inner = config["hidden_size"], config["intermediate_size"]
    bias = config["model_type"] not in ("mistral", "qwen2", "qwen3") and bool(config.get("mlp_bias", False))
    return 3 * hidden * inner + bias * (2 * inner + hidden)     # gate, up, down


def activation_bytes_per_token(config: dict) -> int:
    """Estimated transient workspace of one token passing one decoder layer, in bytes.

    ``(2 * hidden + 2 * q_width + 2 * intermediate) * 4``: the residual stream and the normed
    input (hidden each), the attention output before and after o_proj (q_width = heads x
    head_dim, equal to hidden in most models), and the MLP's gate and up projections alive
    together (intermediate each), all counted as float32 since norms and softmax upcast.
    For the usual q_width == hidden this is ``(4 * hidden + 2 * intermediate) * 4``.
    Not counted: attention scores (SDPA works through them in blocks) and logits (the last
    stage computes them for the last position only, vocab x 4 bytes per sequence).
    """
    q_width = config["num_attention_heads"] * head_dim(config)
    return (2 * config["hidden_size"] + 2 * q_width + 2 * config["intermediate_size"]) * _ACTIVATION_BYTES


def recipe_table(config: dict, recipe: str) -> dict[str, dict]:
    """The tensor table a GGUF file of ``config``'s model quantized by llama.cpp with ``recipe``
    would have (types and shapes; no file): how ``exo-lab plan --gguf Q4_K_M`` plans a model of
    which only config.json is at hand. As llama.cpp's llama_tensor_get_type: the output matrix
    (or the tied embedding) Q6_K in the 4-bit recipes; Q4_K_M: Q6_K for attn_v and ffn_down in
    the layers its use_more_bits picks (the first and last eighth, every third between), Q4_K for
    every other matrix; F32 norms."""
    if recipe not in GGUF_RECIPES:
        raise ModelError(f"unknown GGUF recipe {recipe!r}; use one of {', '.join(GGUF_RECIPES)}")

    layers, hidden, vocab = config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]
    names = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")

    def more_bits(i: int, n: int) -> bool:
        return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2

    tied = bool(config.get("tie_word_embeddings", False))
    four_bit = recipe in ("Q4_K_M", "Q4_0", "Q4_1")

    def kind(name: str, layer: int | None) -> str:
        if (name == "lm_head" or (name == "embed" and tied)) and four_bit:
            return "Q6_K"           # llama.cpp's output matrix (a tied embedding is it)
        if recipe != "Q4_K_M":
            return recipe
        if name in ("self_attn.v_proj", "mlp.down_proj") and more_bits(layer, layers):
            return "Q6_K"
        return "Q4_K"

    table = {"model.embed_tokens.weight": {"type": kind("embed", None), "shape": [vocab, hidden]},
             "model.norm.weight": {"type": "F32", "shape": [hidden]}}
    if not tied:
        table["lm_head.weight"] = {"type": kind("lm_head", None), "shape": [vocab, hidden]}
    for layer in range(layers):
        prefix = f"model.layers.{layer}."
        for name, shape in zip(names, linear_shapes(config)):
            table[f"{prefix}{name}.weight"] = {"type": kind(name, layer), "shape": list(shape)}
        for norm in ("input_layernorm", "post_attention_layernorm"):
            table[f"{prefix}{norm}.weight"] = {"type": "F32", "shape": [hidden]}
    return table
