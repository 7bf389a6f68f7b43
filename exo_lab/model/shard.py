"""One pipeline stage of a Hugging Face causal LM: its architecture, its weights put in place, run it.

Pure model code in the manner of gpt-fast's ``model.py``: it knows nothing of sockets,
ipyparallel or files; the engine (``exo_lab.engine``) wraps it and moves its tensors over the
network, and :mod:`exo_lab.weights.checkpoint` reads its config and exactly its tensors from the
model's files (``load_stage``).

How a stage is built (the approach, and why)
--------------------------------------------
A stage owns the half-open layer range ``[start_layer, stop_layer)``; the first stage also owns
the token embedding, the last the final norm and ``lm_head``.

1. *A stage-local config.* The model's config is copied with ``num_hidden_layers = n`` (the
   stage's layer count) and ``layer_types`` sliced to ``[start:stop]`` when the architecture has
   them (Qwen2/Qwen3 with sliding windows). Everything Hugging Face derives from the config then
   speaks in stage-local layer indices: each attention module's ``layer_idx`` (which indexes the
   KV cache and picks the layer's sliding window), ``DynamicCache(config=...)`` with one cache
   layer of the right kind per stage layer, and the mask builders, which size masks from the
   cache. No index is patched after the fact.
2. *A skeleton on the meta device.* ``AutoModelForCausalLM.from_config(stage_config)`` under
   ``torch.device("meta")`` costs no memory. The stage keeps the modules it needs (its decoder
   layers, and embed_tokens / norm / lm_head as its role requires) and drops the rest.
3. *Exactly this stage's tensors.* The index's weight map says which safetensors files hold the
   stage's keys (global layer ``i`` is stored as ``model.layers.{i}.*`` and becomes local layer
   ``i - start``); only those files are opened and only those keys read, converted to the dtype
   on load, and put in place with ``load_state_dict(assign=True)``, which swaps the meta
   parameters for the loaded tensors without allocating the skeleton first. A tied model saves
   no ``lm_head.weight``; its last stage reads ``model.embed_tokens.weight`` as its head.
4. *Rotary embedding on the real device.* Its ``inv_freq`` is computed at construction and never
   stored in a checkpoint, so it is built fresh from the config, outside the meta context.

``Stage.forward`` then runs what the base model's ``forward`` runs, in the same order, with the
model's own modules: embed (first stage) -> one causal mask per attention kind in the stage,
built from the cache *before* the layers append to it -> rotary cos/sin -> the decoder layers ->
final norm and ``lm_head`` on the last position only (last stage). Running the loop here rather
than calling the base model with ``inputs_embeds`` keeps embedding and norm explicit: a base
model that rescales ``inputs_embeds`` (Gemma does) would silently corrupt later stages. For the
Llama family the decoder layers run through :mod:`exo_lab.model.lean` (the same arithmetic with
fused q/k/v and gate/up products and fewer calls); other layers run their own ``forward``.

Supported: architectures whose decoder layers take ``(hidden, attention_mask, position_ids,
cache, use_cache, position_embeddings)`` and whose layers are full or sliding-window attention:
Llama, Mistral, Qwen2 and Qwen3 are tested. transformers is pinned (pyproject) because that
signature changed within 5.x.
"""
from __future__ import annotations

import copy
import logging

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from ..control_types import ShardSpec   # shared with the control plane; still importable from here
from ..errors import ModelError, RequestError
from ..settings import DEFAULT_MAX_CONTEXT  # KV positions per slot when the spec names none
from ..units import COMPUTE_DTYPES, DTYPES
from .kv_slots import SlotCache
from .lean import LeanLayers
from .packed import packed_bytes

logger = logging.getLogger(__name__)

# The torch dtype each stage dtype named in exo_lab.units computes in (int8 stages: bfloat16)
TORCH_DTYPES = {name: getattr(torch, COMPUTE_DTYPES[name]) for name in DTYPES}

# Attention kinds the stage runner can mask; anything else (linear attention, chunked, ...)
# needs its own mask or state and is refused at load time rather than run wrong.
ATTENTION_KINDS = ("full_attention", "sliding_attention")


class Stage(nn.Module):
    """A contiguous slice of a causal LM's decoder layers with its KV slots.

    Build one with :func:`load_stage`. Attributes: ``spec``, ``device``, ``dtype``, ``config``
    (the whole model's HF config), ``stage_config`` (the stage-local copy), ``layers``,
    ``embed_tokens`` (first stage, else None), ``norm`` and ``lm_head`` (last stage, else None),
    ``rotary_emb``, ``kv`` (the :class:`~exo_lab.model.kv_slots.SlotCache`, once loaded).
    """

    def __init__(self, spec: ShardSpec, config):
        super().__init__()
        self.spec = spec
        self.device = torch.device(spec.device)
        self.dtype = TORCH_DTYPES[spec.dtype]
        self.config = config
        self.stage_config = _stage_config(config, spec)
        self.layer_types = _layer_types(self.stage_config)
        self.whole_attention = all(kind == "full_attention" for kind in self.layer_types)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(
                self.stage_config, attn_implementation="sdpa", dtype=self.dtype)
        base = skeleton.base_model
        self.checkpoint_prefix = skeleton.base_model_prefix   # "model" in model.layers.3.mlp...
        self.layers = base.layers
        self.embed_tokens = base.embed_tokens if spec.is_first else None
        self.norm = base.norm if spec.is_last else None
        self.lm_head = skeleton.lm_head if spec.is_last else None
        # Computed, never stored in a checkpoint: build it for real (float32, as HF does).
        self.rotary_emb = type(base.rotary_emb)(config=self.stage_config).to(self.device)
        self.sliding_window = getattr(self.stage_config, "sliding_window", None)
        self.max_context = min(spec.max_context or DEFAULT_MAX_CONTEXT,
                               getattr(config, "max_position_embeddings", None) or DEFAULT_MAX_CONTEXT)
        self.kv: SlotCache | None = None
        self.lean: LeanLayers | None = None      # set by load_stage where it applies

    def allocate_kv(self) -> None:
        """Allocate the KV slots the plan reserved: max_batch sequences x max_context positions."""
        self.kv = self.new_cache(self.spec.max_batch, self.max_context)

    def resize_slots(self, num_slots: int) -> None:
        """Hold ``num_slots`` KV slots from now on (what they held is forgotten: the requests
        replay): the old cache is freed before the new one is allocated, so shedding slots never
        needs both at once."""
        self.kv = None
        import gc

        gc.collect()
        release_free_memory()
        self.spec = self.spec.with_batch(num_slots)
        self.allocate_kv()

    def step_bytes(self, rows: int, tokens: int, length: int, keep: int = 1) -> int:
        """The most memory a forward of ``rows`` rows of ``tokens`` new tokens attending over
        ``length`` positions allocates beyond the stage's weights and KV slots (an upper bound
        the engine checks against its PC's free memory before every step): one layer's
        activations at a time, the step's masks, the rows' keys and values gathered when their
        slots are not consecutive, SDPA's scores and probabilities, and on the last stage the
        logits kept. float32 throughout: norms and softmax upcast."""
        config = self.stage_config
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        # per token in one layer: the residual, normed and output hidden states, the fused q/k/v
        # and attention output, and the MLP's gate/up product, activation and their product
        # alive together, with room for the allocator's free blocks of the previous layer
        # (tests/test_step_memory.py measures a forward's peak resident memory against it)
        per_token = (8 * config.hidden_size + 4 * heads * head_dim + 6 * config.intermediate_size) * 4
        element = self.kv.keys[0].element_size() if self.kv is not None else 4
        masks = len(set(self.layer_types)) * rows * tokens * length * element
        gathered = 2 * rows * kv_heads * length * head_dim * element
        scores = 2 * rows * heads * tokens * length * 4
        logits = rows * keep * config.vocab_size * 4 if self.spec.is_last else 0
        return rows * tokens * per_token + masks + gathered + scores + logits

    def new_cache(self, num_slots: int, max_context: int) -> SlotCache:
        """A KV cache of this stage's shape (experiments use a private one of their own)."""
        return SlotCache.for_config(self.stage_config, len(self.layers), num_slots, max_context,
                                    self.dtype, self.device)

    @torch.inference_mode()
    def forward(self, inputs: torch.Tensor, slots, positions, cache: SlotCache | None = None,
                hidden: bool = False, keep: int = 1, adapters=None) -> torch.Tensor:
        """Run this stage on a batch of rows, writing their keys and values into their KV slots.

        ``inputs``: token ids (B, T) int64 on the first stage, else hidden states (B, T, hidden).
        ``slots``: the KV slot of each row (B,); ``positions``: the sequence position of each
        row's first input token (B,), so row b covers positions [positions[b], positions[b] + T)
        and attends to what its slot holds before that. ``cache``: default the stage's own slots.
        Returns hidden states (B, T, hidden) in the stage dtype, or on the last stage the float32
        logits of each row's last position only (B, vocab); with ``hidden=True`` the last stage
        returns the final-norm hidden states of every position instead (B, T, hidden), float32
        (embeddings; :meth:`head` turns a position of them into logits); with ``keep`` > 1 the
        last stage returns the logits of each row's last ``keep`` positions (B, keep, vocab)
        (speculative decoding's verify rows). ``adapters``: the LoRA adapter id of each row (0:
        the base model; :mod:`exo_lab.model.lora`), rows of different adapters in one batch.

        Raises:
            RequestError: rows and slots/positions disagree, a slot outside the cache, or
                positions past the planned context.
        """
        cache = cache if cache is not None else self.kv
        final_hidden, hidden = hidden, None     # the flag; ``hidden`` names the states below
        slots_t, position_ids = self._check_rows(inputs, slots, positions, cache)
        hidden = self._embed(inputs)                                      # (B, T, hidden)
        cache.bind(slots_t, position_ids)
        cos_sin = self.rotary_emb(hidden, position_ids=position_ids)      # 2 x (B, T, head_dim)
        # The lean forward (exo_lab.model.lean: same arithmetic, fewer calls) skips the layers'
        # module calls, so a forward hook (an experiment's, exo_lab.notebook) switches it off.
        lean = self.lean if self.lean is not None and not self.lean.hooked() else None
        context = getattr(self, "lora_context", None)
        if adapters is not None and any(adapters):
            if context is None:
                raise RequestError("this stage holds no LoRA adapter")
            ids = torch.as_tensor(adapters)
            context.rows = [(int(a), (ids == a).nonzero().flatten()) for a in ids.unique().tolist() if a]
            lean = None               # the fused q/k/v products would skip the adapters
        try:
            if lean is not None and lean.one_call and inputs.shape[1] == 1 and self.whole_attention:
                hidden = lean.decode(hidden, cos_sin, cache, slots_t, position_ids[:, 0])   # one call a layer
            else:
                masks = {kind: cache.mask(position_ids, self.sliding_window if kind == "sliding_attention" else None)
                         for kind in set(self.layer_types)}               # (B, 1, T, L) each
                hidden = self._layers(hidden, masks, position_ids, cos_sin, cache, lean)
        finally:
            if context is not None:
                context.rows = []
        if not self.spec.is_last:
            return hidden
        if final_hidden:
            return self.norm(hidden).float()                              # (B, T, hidden)
        if keep > 1:
            return self.lm_head(self.norm(hidden[:, -keep:, :]).to(self.dtype)).float()   # (B, keep, vocab)
        # Only the last position's logits are needed to pick the next token (nanoGPT, HF
        # logits_to_keep=1); RMSNorm is per position, so normalising just that one is exact.
        return self.head(self.norm(hidden[:, -1, :]))                     # (B, vocab)

    def _layers(self, hidden, masks, position_ids, cos_sin, cache, lean):
        for index, (layer, layer_type) in enumerate(zip(self.layers, self.layer_types)):
            if lean is not None:
                hidden = lean.forward(index, hidden, masks[layer_type], cos_sin, cache)
            else:
                hidden = layer(hidden, attention_mask=masks[layer_type], position_ids=position_ids,
                               cache=cache, use_cache=True, position_embeddings=cos_sin)
        return hidden

    def train_forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """A training forward (autograd on, no KV slots): rows of T positions from position 0,
        right-padded (a causal mask suffices: no real position attends to a later pad).

        ``inputs``: token ids (B, T) on the first stage, else hidden states (B, T, hidden) (the
        previous stage's output, requiring grad). Returns hidden states (B, T, hidden), or on
        the last stage float32 logits of every position (B, T, vocab). The LoRA context
        (:mod:`exo_lab.model.lora`) says which adapter trains."""
        B, T = inputs.shape[0], inputs.shape[1]
        if T > self.max_context:
            raise RequestError(f"a training row of {T} tokens exceeds the planned context of {self.max_context}")
        hidden = self._embed(inputs)
        position_ids = torch.arange(T, device=self.device).expand(B, T)
        causal = torch.ones(T, T, dtype=torch.bool, device=self.device).tril()
        masks = {}
        for kind in set(self.layer_types):
            mask = causal
            if kind == "sliding_attention" and self.sliding_window:
                mask = mask & ~torch.ones(T, T, dtype=torch.bool, device=self.device).tril(-self.sliding_window)
            masks[kind] = mask.expand(B, 1, T, T)
        cos_sin = self.rotary_emb(hidden, position_ids=position_ids)
        for layer, layer_type in zip(self.layers, self.layer_types):
            hidden = layer(hidden, attention_mask=masks[layer_type], position_ids=position_ids,
                           cache=None, use_cache=False, position_embeddings=cos_sin)
        if not self.spec.is_last:
            return hidden
        return self.lm_head(self.norm(hidden)).float()

    @torch.inference_mode()
    def head(self, normed: torch.Tensor) -> torch.Tensor:
        """float32 logits (B, vocab) of final-norm hidden states (B, hidden) (last stage)."""
        return self.lm_head(normed[:, None, :].to(self.dtype))[:, -1, :].float()

    @torch.inference_mode()
    def copy_kv(self, src_slot: int, dst_slot: int, length: int) -> None:
        """Copy the keys and values of positions [0, length) of ``src_slot`` into ``dst_slot``
        (n choices of one prompt share its prefill). Raises RequestError outside the cache."""
        kv = self.kv
        if kv is None or not (0 <= src_slot < kv.num_slots and 0 <= dst_slot < kv.num_slots) \
                or not 0 <= length <= kv.max_context:
            raise RequestError(f"cannot copy {length} positions from slot {src_slot} to slot {dst_slot}: "
                               f"the cache has {kv.num_slots if kv else 0} slots of "
                               f"{kv.max_context if kv else 0} positions")
        for tensor in (*kv.keys, *kv.values):                             # (slots, kv_heads, L, head_dim)
            tensor[dst_slot, :, :length] = tensor[src_slot, :, :length]

    def kv_cache_bytes(self) -> int:
        """Bytes of this stage's KV slots (allocated once at load; flat afterwards)."""
        return self.kv.nbytes() if self.kv is not None else 0

    def parameter_bytes(self) -> int:
        """Bytes of this stage's weights (a tensor shared by two modules counts once), packed
        ones (exo_lab.model.packed) included."""
        unique = {p.data_ptr(): p.numel() * p.element_size() for p in self.parameters()}
        return sum(unique.values()) + packed_bytes(self)

    def checkpoint_names(self) -> dict[str, list[str]]:
        """Stage-local parameter name -> checkpoint names to try, in order of preference."""
        return {name: self._checkpoint_candidates(name) for name in self.state_dict()}

    def load_weights(self, tensors: dict[str, torch.Tensor], *, strict: bool = True) -> None:
        """Put loaded tensors (by stage-local name) in place of the meta parameters (``strict``
        False: modules already loaded, e.g. quantized ones, are not among ``tensors``)."""
        self.load_state_dict(tensors, strict=strict, assign=True)
        # Inference only: no dropout, and no autograd bookkeeping if called outside forward().
        self.eval().requires_grad_(False)
        left = [name for name, t in [*self.named_parameters(), *self.named_buffers()] if t.is_meta]
        if left:
            raise ModelError(
                f"stage [{self.spec.start_layer}, {self.spec.stop_layer}) of {self.spec.model_dir} "
                f"still has {len(left)} tensors without data after loading (first: {left[0]}); "
                f"this architecture keeps state exo-lab does not know how to load"
            )

    def _checkpoint_candidates(self, local_name: str) -> list[str]:
        if local_name.startswith("lm_head."):
            tied = getattr(self.config, "tie_word_embeddings", False)
            # A tied checkpoint stores the head only as the input embedding.
            fallback = [f"{self.checkpoint_prefix}.embed_tokens.weight"] if tied else []
            return [local_name, *fallback]
        if local_name.startswith("layers."):
            _, local_index, rest = local_name.split(".", 2)
            local_name = f"layers.{int(local_index) + self.spec.start_layer}.{rest}"
        return [f"{self.checkpoint_prefix}.{local_name}"]

    def _check_rows(self, inputs: torch.Tensor, slots, positions, cache: SlotCache):
        """(slots (B,), position ids (B, T)) after checking them against the inputs and the plan."""
        if cache is None:
            raise RequestError("this stage has no KV slots yet: load it with load_stage()")
        if inputs.dim() < 2:
            raise RequestError(f"a stage takes a batch of rows (B, T, ...), got {tuple(inputs.shape)}")
        B, T = inputs.shape[0], inputs.shape[1]
        slots_t = torch.as_tensor(slots, dtype=torch.long, device=self.device).reshape(-1)
        starts = torch.as_tensor(positions, dtype=torch.long, device=self.device).reshape(-1)
        if slots_t.numel() != B or starts.numel() != B or T < 1:
            raise RequestError(f"{B} rows of {T} tokens need {B} slots and {B} positions, got "
                               f"{slots_t.numel()} and {starts.numel()}")
        if int(slots_t.min()) < 0 or int(slots_t.max()) >= cache.num_slots or int(starts.min()) < 0:
            raise RequestError(f"slots must be in [0, {cache.num_slots}) and positions >= 0")
        if int(starts.max()) + T > cache.max_context:
            raise RequestError(f"positions up to {int(starts.max()) + T} exceed the planned context of "
                               f"{cache.max_context} tokens")
        return slots_t, starts[:, None] + torch.arange(T, device=self.device)   # (B,), (B, T)

    def _embed(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.spec.is_first:
            if inputs.dim() != 2 or inputs.is_floating_point():
                raise ValueError(f"the first stage takes integer token ids (B, T), got "
                                 f"{inputs.dtype} {tuple(inputs.shape)}")
            return self.embed_tokens(inputs.to(self.device))
        if inputs.dim() != 3 or inputs.shape[-1] != self.stage_config.hidden_size:
            raise ValueError(f"stage {self.spec.start_layer} takes hidden states (B, T, "
                             f"{self.stage_config.hidden_size}), got {tuple(inputs.shape)}")
        return inputs.to(self.device, self.dtype)


def release_free_memory() -> None:
    """Give the allocator's free memory back to the OS (glibc's malloc_trim), so a freed KV
    cache leaves the PC's memory at once: glibc keeps large blocks freed in its heap for the next
    allocation (its mmap threshold rises after the first large free), and a PC short of memory
    would see none of it come back. A no-op off glibc (macOS, Windows, musl)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return
    trim.argtypes = [ctypes.c_size_t]
    trim(0)


def _stage_config(config, spec: ShardSpec):
    """A copy of ``config`` describing only this stage's layers, indexed from 0."""
    stage_config = copy.deepcopy(config)
    stage_config.num_hidden_layers = spec.stop_layer - spec.start_layer
    if getattr(config, "layer_types", None) is not None:
        stage_config.layer_types = list(config.layer_types[spec.start_layer:spec.stop_layer])
    return stage_config


def _layer_types(stage_config) -> list[str]:
    """The attention kind of each stage layer, as the base model picks its mask."""
    n = stage_config.num_hidden_layers
    types = getattr(stage_config, "layer_types", None)
    if types is None:
        # Llama: full attention; Mistral: every layer slides when sliding_window is set.
        sliding = getattr(stage_config, "sliding_window", None) is not None
        types = ["sliding_attention" if sliding else "full_attention"] * n
    unknown = sorted(set(types) - set(ATTENTION_KINDS))
    if unknown:
        raise ModelError(f"layer types {unknown} of model_type {stage_config.model_type!r} are not "
                         f"supported by exo-lab stages (only {', '.join(ATTENTION_KINDS)})")
    return list(types)
