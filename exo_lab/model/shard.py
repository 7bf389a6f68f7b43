"""One pipeline stage of a Hugging Face causal LM: build it, load exactly its weights, run it.

Pure model code in the manner of gpt-fast's ``model.py``: it knows nothing of sockets or
ipyparallel; the engine (``exo_lab.engine``) wraps it and moves its tensors over the network.

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
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from ..errors import ModelError, RequestError
from ..units import COMPUTE_DTYPES, DTYPES
from .kv_slots import SlotCache
from .lean import LeanLayers, lean_layers
from .packed import can_pack, pack_linears, packed_bytes
from .quant import quantize_linears

logger = logging.getLogger(__name__)

# The torch dtype each stage dtype named in exo_lab.units computes in (int8 stages: bfloat16)
TORCH_DTYPES = {name: getattr(torch, COMPUTE_DTYPES[name]) for name in DTYPES}

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# Attention kinds the stage runner can mask; anything else (linear attention, chunked, ...)
# needs its own mask or state and is refused at load time rather than run wrong.
ATTENTION_KINDS = ("full_attention", "sliding_attention")
DEFAULT_MAX_CONTEXT = 4096      # KV positions per slot when the spec names none (tests, notebooks)


@dataclass(frozen=True)
class ShardSpec:
    """Which part of which model one stage holds.

    ``[start_layer, stop_layer)`` is half-open, over ``num_layers`` decoder layers in total.
    ``dtype`` is "float32", "bfloat16", "float16" or "int8" (weight-only: exo_lab.model.quant);
    ``device`` a torch device string
    ("cpu", "cuda", "cuda:1"). ``max_batch`` KV slots of ``max_context`` positions each are
    allocated at load (None: min(the model's max positions, DEFAULT_MAX_CONTEXT)).
    """

    model_dir: str
    start_layer: int
    stop_layer: int
    num_layers: int
    dtype: str = "float32"
    device: str = "cpu"
    max_context: int | None = None      # the plan's tokens per request
    max_batch: int = 1                  # the plan's sequences at once: the stage's KV slots

    def __post_init__(self) -> None:
        if not 0 <= self.start_layer < self.stop_layer <= self.num_layers:
            raise ModelError(
                f"layer range [{self.start_layer}, {self.stop_layer}) is not a non-empty part of "
                f"the model's {self.num_layers} layers; use 0 <= start_layer < stop_layer <= "
                f"{self.num_layers}"
            )
        if not isinstance(self.max_batch, int) or self.max_batch < 1:
            raise ModelError(f"max_batch must be an integer >= 1, got {self.max_batch!r}")
        if self.dtype not in DTYPES:
            raise ModelError(f"dtype {self.dtype!r} is not supported; use one of {', '.join(DTYPES)}")

    @property
    def is_first(self) -> bool:
        return self.start_layer == 0

    @property
    def is_last(self) -> bool:
        return self.stop_layer == self.num_layers


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

    def new_cache(self, num_slots: int, max_context: int) -> SlotCache:
        """A KV cache of this stage's shape (experiments use a private one of their own)."""
        return SlotCache.for_config(self.stage_config, len(self.layers), num_slots, max_context,
                                    self.dtype, self.device)

    @torch.inference_mode()
    def forward(self, inputs: torch.Tensor, slots, positions, cache: SlotCache | None = None) -> torch.Tensor:
        """Run this stage on a batch of rows, writing their keys and values into their KV slots.

        ``inputs``: token ids (B, T) int64 on the first stage, else hidden states (B, T, hidden).
        ``slots``: the KV slot of each row (B,); ``positions``: the sequence position of each
        row's first input token (B,), so row b covers positions [positions[b], positions[b] + T)
        and attends to what its slot holds before that. ``cache``: default the stage's own slots.
        Returns hidden states (B, T, hidden) in the stage dtype, or on the last stage the float32
        logits of each row's last position only (B, vocab).

        Raises:
            RequestError: rows and slots/positions disagree, a slot outside the cache, or
                positions past the planned context.
        """
        cache = cache if cache is not None else self.kv
        slots_t, position_ids = self._check_rows(inputs, slots, positions, cache)
        hidden = self._embed(inputs)                                      # (B, T, hidden)
        cache.bind(slots_t, position_ids)
        masks = {kind: cache.mask(position_ids, self.sliding_window if kind == "sliding_attention" else None)
                 for kind in set(self.layer_types)}                       # (B, 1, T, L) each
        cos_sin = self.rotary_emb(hidden, position_ids=position_ids)      # 2 x (B, T, head_dim)
        # The lean forward (exo_lab.model.lean: same arithmetic, fewer calls) skips the layers'
        # module calls, so a forward hook (an experiment's, exo_lab.notebook) switches it off.
        lean = self.lean if self.lean is not None and not self.lean.hooked() else None
        for index, (layer, layer_type) in enumerate(zip(self.layers, self.layer_types)):
            if lean is not None:
                hidden = lean.forward(index, hidden, masks[layer_type], cos_sin, cache)
            else:
                hidden = layer(hidden, attention_mask=masks[layer_type], position_ids=position_ids,
                               cache=cache, use_cache=True, position_embeddings=cos_sin)
        if not self.spec.is_last:
            return hidden
        # Only the last position's logits are needed to pick the next token (nanoGPT, HF
        # logits_to_keep=1); RMSNorm is per position, so normalising just that one is exact.
        last = self.norm(hidden[:, -1:, :])                               # (B, 1, hidden)
        return self.lm_head(last)[:, -1, :].float()                       # (B, vocab)

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

    def load_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        """Put loaded tensors (by stage-local name) in place of the meta parameters."""
        self.load_state_dict(tensors, strict=True, assign=True)
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


def stage_skeleton(spec: ShardSpec) -> Stage:
    """The stage ``spec`` describes with no weights (meta tensors) and no KV slots: what the
    model's config and transformers classes cost before any weight is read."""
    return Stage(spec, _read_config(spec))


def load_stage(spec: ShardSpec, ensure_tensors=None) -> Stage:
    """Build the stage ``spec`` describes and load its weights, and only its weights.

    Reads ``config.json`` and the safetensors weight map in ``spec.model_dir``, opens only the
    files that hold this stage's tensors and reads only those tensors, converted to
    ``spec.dtype`` on ``spec.device``. No process that calls this ever holds the whole model.
    ``ensure_tensors(names)``, when given, is called first with the checkpoint names the stage
    reads (a PC without the model fetches them: :func:`exo_lab.engine.fetch.open_model`).

    Raises:
        ModelError: the folder, config or a weight file is missing or corrupt, a tensor is
            absent, the spec does not match the config, or the architecture is unsupported.
    """
    config = _read_config(spec)
    _check_device(spec)
    stage = Stage(spec, config)
    weight_map = _read_weight_map(Path(spec.model_dir))
    wanted = _resolve_names(stage.checkpoint_names(), weight_map, spec)
    if ensure_tensors is not None:   # a fetched folder: bring exactly these tensors first
        ensure_tensors(list(wanted.values()))
    by_checkpoint_name = _read_tensors(wanted.values(), weight_map, spec)
    stage.load_weights({local: by_checkpoint_name[name] for local, name in wanted.items()})
    if spec.dtype == "int8":   # weight-only: quantized from the loaded bfloat16 weights
        quantize_linears(stage)
    if stage.dtype == torch.bfloat16 and can_pack(stage.device):   # same results, less time
        pack_linears(stage, layers=spec.dtype == "bfloat16")
    stage.lean = lean_layers(stage.layers, stage.stage_config)
    stage.allocate_kv()
    logger.info("loaded layers [%d, %d) of %s: %.1f MB on %s", spec.start_layer, spec.stop_layer,
                spec.model_dir, stage.parameter_bytes() / 1e6, spec.device)
    return stage


# ----------------------------------------------------------------------------- config

def _read_config(spec: ShardSpec):
    folder = Path(spec.model_dir)
    if not (folder / "config.json").is_file():
        raise ModelError(f"{folder / 'config.json'} does not exist; point model_dir at a folder "
                         f"holding a Hugging Face model (config.json + safetensors)")
    try:
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:
        raise ModelError(f"cannot read {folder / 'config.json'}: {exc}; fix or re-download the "
                         f"model") from exc
    if config.num_hidden_layers != spec.num_layers:
        raise ModelError(
            f"the shard spec says {spec.num_layers} layers but {folder / 'config.json'} has "
            f"num_hidden_layers={config.num_hidden_layers}; plan the stages from this model's config"
        )
    if getattr(config, "is_heterogeneous", False):
        raise ModelError(f"{folder} has per-layer config overrides (per_layer_config), which "
                         f"exo-lab's stages do not support; use a homogeneous model")
    return config


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


def _check_device(spec: ShardSpec) -> None:
    device = torch.device(spec.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"device {spec.device!r} asked for, but this machine's torch sees no CUDA "
                         f"GPU; use device='cpu' or install a CUDA build of torch")


# ----------------------------------------------------------------------------- weights

def _read_weight_map(folder: Path) -> dict[str, Path]:
    """Checkpoint tensor name -> the safetensors file that holds it."""
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ModelError(f"{index} is not a valid safetensors index ({exc}); re-download the "
                             f"model or re-save it with save_pretrained") from exc
        return {name: folder / file for name, file in weight_map.items()}
    single = folder / SINGLE_FILE
    if single.is_file():
        return {name: single for name in _file_keys(single)}
    raise ModelError(f"{folder} holds neither {INDEX_FILE} nor {SINGLE_FILE}; exo-lab loads "
                     f"safetensors checkpoints only (re-save the model with save_pretrained)")


def _file_keys(path: Path) -> list[str]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            return list(handle.keys())
    except Exception as exc:
        raise ModelError(f"{path} is not a readable safetensors file ({exc}); it is truncated or "
                         f"corrupt: re-download the model") from exc


def _resolve_names(candidates: dict[str, list[str]], weight_map: dict[str, Path],
                   spec: ShardSpec) -> dict[str, str]:
    """Stage-local name -> the checkpoint name to read (the first candidate the map has)."""
    resolved = {}
    for local, names in candidates.items():
        found = next((name for name in names if name in weight_map), None)
        if found is None:
            raise ModelError(
                f"tensor {names[0]} (layers [{spec.start_layer}, {spec.stop_layer})) is not in the "
                f"weight map of {spec.model_dir}; the checkpoint does not match its config.json "
                f"(num_hidden_layers={spec.num_layers}): re-download or re-save the model"
            )
        resolved[local] = found
    return resolved


def _read_tensors(names, weight_map: dict[str, Path], spec: ShardSpec) -> dict[str, torch.Tensor]:
    """Read each checkpoint name once, opening each file that holds any of them once."""
    by_file: dict[Path, list[str]] = {}
    for name in dict.fromkeys(names):                   # a tied head may repeat a name
        by_file.setdefault(weight_map[name], []).append(name)
    tensors = {}
    for path, file_names in by_file.items():
        tensors.update(_read_file(path, file_names, spec))
    return tensors


def _read_file(path: Path, names: list[str], spec: ShardSpec) -> dict[str, torch.Tensor]:
    dtype = TORCH_DTYPES[spec.dtype]
    if not path.is_file():
        raise ModelError(f"{path} does not exist but holds tensor {names[0]} (and {len(names) - 1} "
                         f"more) for layers [{spec.start_layer}, {spec.stop_layer}); re-download "
                         f"the model so every file its index names is present")
    name = names[0]
    try:
        with safe_open(str(path), framework="pt", device=str(spec.device)) as handle:
            present = set(handle.keys())
            tensors = {}
            for name in names:
                if name not in present:
                    raise ModelError(f"{path} does not contain tensor {name}, though the index "
                                     f"says it does; re-download the model")
                tensors[name] = handle.get_tensor(name).to(dtype)
            return tensors
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(f"cannot read {path} (needed for tensor {name}): {exc}; the file is "
                         f"truncated or corrupt: re-download the model") from exc
