"""LoRA adapters on a stage's frozen layers: trained through the pipeline, served per row.

Pure model code like :mod:`exo_lab.model.shard`: no sockets, no files beyond peft's format.

A LoRA adapter adds ``B @ A`` (rank ``r``) to a frozen linear's weight, scaled by
``alpha / r``; peft computes it as ``base(x) + lora_B(lora_A(dropout(x))) * scaling`` and so
does :class:`LoraLinear`, in the same order, so a float32 stage trains as a single-process
transformers + peft model does (tests/test_finetune.py compares them step by step).

- **Wrapping.** :func:`wrap` replaces each target linear of the stage's layers (``q_proj``,
  ``v_proj``, ...) by a :class:`LoraLinear` holding the original module as ``base``; the
  original keeps its weights (views of the lean path's fused matrices included), so inference
  without an adapter runs exactly as before. Every wrapper of a stage shares one
  :class:`LoraContext`, which says per forward what applies: the adapter being trained (to
  every row, with autograd), or an adapter per row (serving: rows of different adapters share
  one batch; a row with adapter 0 is the base model).
- **Base kinds.** The frozen base may be float32, bfloat16 (oneDNN or exo-lab kernels) or int8:
  the wrapper's :class:`_Frozen` runs the base module as it is and, backward, multiplies the
  incoming gradient by the base's dense weight (dequantized for int8): the gradient with
  respect to the activations, which is all a frozen layer passes upstream. For ``nn.Linear``
  the module runs under autograd itself (what peft does; bit-for-bit the same graph).
- **Initialisation** does not depend on where the layers run: adapter ``A`` of (global layer
  ``i``, module ``name``) is drawn from a generator seeded with (seed, i, name) with peft's
  bound (``kaiming_uniform_(a=sqrt(5))``: U(-1/sqrt(in), 1/sqrt(in))), ``B`` is zeros. A
  re-planned pipeline, or a resumed job, gives every layer the same adapter.
- **Names** are peft's: ``base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight``
  (:func:`peft_key`), so a saved adapter loads with ``PeftModel.from_pretrained``.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..control_types import LORA_TARGETS, LoraSettings
from ..errors import ModelError

# The linears a LoRA may target in the Llama family's decoder layers, by the name peft uses.
TARGETS = {name: ("mlp" if name in ("gate_proj", "up_proj", "down_proj") else "self_attn") for name in LORA_TARGETS}
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass
class LoraContext:
    """What the stage's wrappers apply in the forward under way (one per stage).

    ``train``: the adapter id trained now (applied to every row, with dropout and autograd);
    ``rows``: serving, the adapter id of each row (0: none) as ``[(adapter, row indices)]``;
    ``generator``: dropout's draws for this micro-batch."""

    train: int | None = None
    rows: list = field(default_factory=list)
    generator: torch.Generator | None = None
    dropout: float = 0.0


class _Frozen(torch.autograd.Function):
    """``base(x)`` whose backward is ``grad @ W`` (the frozen base's dense weight): any module
    kind (bfloat16 kernels, int8) passes the activations' gradient upstream."""

    @staticmethod
    def forward(ctx, x, module):
        ctx.module = module
        with torch.no_grad():
            return module(x)

    @staticmethod
    def backward(ctx, grad):
        weight = dense_weight(ctx.module).to(grad.dtype)
        return grad @ weight, None


def dense_weight(module: nn.Module) -> torch.Tensor:
    """A linear module's (out, in) weight in its compute dtype (int8, 4-bit and GGUF blocks:
    dequantized)."""
    if hasattr(module, "quant"):          # exo_lab.model.quant4.QuantLinear
        return module.quant.dequantize(module.dtype)
    scales = getattr(module, "scales", None)
    if scales is not None:
        return module.weight.to(scales.dtype) * scales[:, None]
    return module.weight


def base_device(module: nn.Module) -> torch.device:
    """Where a base linear's weights are (a group-quantized one holds codes, not a weight)."""
    return (module.codes if hasattr(module, "quant") else module.weight).device


class LoraLinear(nn.Module):
    """A frozen linear (``base``) with the LoRA adapters of a stage: ``adapters[id]`` is
    ``(A (r, in), B (out, r), scaling)``; the trained one's A and B are parameters."""

    def __init__(self, base: nn.Module, context: LoraContext):
        super().__init__()
        self.base = base
        self.context = context
        self.in_features, self.out_features = base.in_features, base.out_features
        self.adapters: dict[int, tuple[torch.Tensor, torch.Tensor, float]] = {}

    # the base's parameters as the layer's own (byte counts, the lean path's views)
    weight = property(lambda self: self.base.weight)
    bias = property(lambda self: self.base.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        context = self.context
        if context.train is not None and context.train in self.adapters:
            A, B, scaling = self.adapters[context.train]
            y = self.base(x) if type(self.base) is nn.Linear else _Frozen.apply(x, self.base)
            h = x.to(A.dtype)
            if context.dropout:
                keep = (torch.rand(h.shape, generator=context.generator, dtype=h.dtype) >= context.dropout).to(h.device)
                h = h * keep / (1.0 - context.dropout)
            return (y + F.linear(F.linear(h, A), B) * scaling).to(y.dtype)   # as peft: the base's dtype
        y = self.base(x)
        for adapter, rows in context.rows:
            entry = self.adapters.get(adapter)
            if entry is not None:
                A, B, scaling = entry
                h = x[rows].to(A.dtype)
                y[rows] += (F.linear(F.linear(h, A), B) * scaling).to(y.dtype)
        return y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, adapters={sorted(self.adapters)}"


def wrap(stage) -> LoraContext:
    """Wrap every LoRA-targetable linear of ``stage``'s layers once (idempotent); the stage's
    shared :class:`LoraContext`."""
    context = getattr(stage, "lora_context", None)
    if context is not None:
        return context
    context = LoraContext()
    for layer in stage.layers:
        for name, parent in TARGETS.items():
            owner = getattr(layer, parent, None)
            module = getattr(owner, name, None) if owner is not None else None
            if module is None:
                continue
            if not hasattr(module, "in_features"):
                raise ModelError(f"{parent}.{name} of {type(layer).__name__} is not a linear layer; "
                                 "LoRA needs the Llama family's layers")
            setattr(owner, name, LoraLinear(module, context))
    stage.lora_context = context
    return context


def wrapped(stage, settings: LoraSettings):
    """[(global layer index, module name, LoraLinear)] that ``settings`` targets, in layer order."""
    wrap(stage)
    out = []
    for local, layer in enumerate(stage.layers):
        for name in settings.targets:
            module = getattr(getattr(layer, TARGETS[name]), name, None)
            if not isinstance(module, LoraLinear):
                raise ModelError(f"layer {stage.spec.start_layer + local} has no {name} to adapt")
            out.append((stage.spec.start_layer + local, name, module))
    return out


def init_adapter(stage, adapter: int, settings: LoraSettings, seed: int, dtype=torch.float32) -> list[torch.Tensor]:
    """Give ``stage``'s target linears adapter ``adapter`` initialised as peft does (A uniform,
    B zeros; each from its own (seed, layer, module) generator). Returns the trainable tensors
    (A, B of each target, in layer order)."""
    params = []
    for layer, name, module in wrapped(stage, settings):
        generator = torch.Generator().manual_seed(_seed_of(seed, layer, name))
        bound = 1.0 / math.sqrt(module.in_features)
        A = (torch.rand(settings.r, module.in_features, generator=generator, dtype=torch.float64) * 2 - 1) * bound
        device = base_device(module.base)
        A = nn.Parameter(A.to(device, dtype))
        B = nn.Parameter(torch.zeros(module.out_features, settings.r, dtype=dtype, device=device))
        module.adapters[adapter] = (A, B, settings.scaling)
        params += [A, B]
    return params


def set_adapter(stage, adapter: int, settings: LoraSettings, tensors: dict[str, torch.Tensor],
                trainable: bool = False, dtype=torch.float32) -> list[torch.Tensor]:
    """Give ``stage`` adapter ``adapter`` from ``tensors`` (peft names; only this stage's layers
    are read). Returns its tensors (A, B per target, layer order). Raises ModelError naming a
    missing or misshapen tensor."""
    params = []
    for layer, name, module in wrapped(stage, settings):
        pair = []
        for part, shape in (("lora_A", (settings.r, module.in_features)), ("lora_B", (module.out_features, settings.r))):
            key = peft_key(layer, name, part)
            tensor = tensors.get(key)
            if tensor is None or tuple(tensor.shape) != shape:
                found = "missing" if tensor is None else f"of shape {tuple(tensor.shape)}"
                raise ModelError(f"adapter tensor {key} is {found}; this stage needs {shape} (rank {settings.r})")
            tensor = tensor.detach().to(base_device(module.base), dtype).clone()
            pair.append(nn.Parameter(tensor) if trainable else tensor)
        module.adapters[adapter] = (pair[0], pair[1], settings.scaling)
        params += pair
    return params


def drop_adapter(stage, adapter: int) -> None:
    """Forget adapter ``adapter`` on every wrapper of ``stage``."""
    for layer in stage.layers:
        for module in layer.modules():
            if isinstance(module, LoraLinear):
                module.adapters.pop(adapter, None)


def adapter_keys(stage, settings: LoraSettings) -> list[str]:
    """The peft names of this stage's adapter tensors: A, B of each target, in layer order (the
    order :func:`init_adapter` and :func:`set_adapter` return them in)."""
    return [peft_key(layer, name, part) for layer, name, _ in wrapped(stage, settings) for part in ("lora_A", "lora_B")]


def adapter_tensors(stage, adapter: int, settings: LoraSettings) -> dict[str, torch.Tensor]:
    """This stage's part of adapter ``adapter`` by peft name (detached float32 copies)."""
    tensors = [t for _, _, module in wrapped(stage, settings) for t in module.adapters[adapter][:2]]
    return {key: t.detach().float().clone() for key, t in zip(adapter_keys(stage, settings), tensors)}


def peft_key(layer: int, module: str, part: str) -> str:
    """peft's saved name of a LoRA tensor (``part``: lora_A or lora_B)."""
    return f"base_model.model.model.layers.{layer}.{TARGETS[module]}.{module}.{part}.weight"


def _seed_of(seed: int, layer: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}/{layer}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def dropout_generator(seed: int, batch: int, micro: int, start_layer: int) -> torch.Generator:
    """The generator of one micro-batch's dropout draws on one stage (the same on a replay)."""
    return torch.Generator().manual_seed(_seed_of(seed, start_layer, f"dropout/{batch}/{micro}"))


# ----------------------------------------------------------------------------- peft's format

def save_adapter(path, tensors: dict[str, torch.Tensor], settings: LoraSettings, base_model: str) -> Path:
    """Write ``tensors`` (peft names) and an adapter_config.json as peft saves them, each file
    whole or not at all (:func:`exo_lab.paths.write_atomic`); the folder."""
    from safetensors.torch import save

    from ..paths import write_atomic

    path = Path(path)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": settings.r, "lora_alpha": settings.alpha, "lora_dropout": settings.dropout,
        "target_modules": sorted(settings.targets), "bias": "none", "fan_in_fan_out": False,
        "inference_mode": True, "init_lora_weights": True, "use_rslora": False, "use_dora": False,
        "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": {}, "alpha_pattern": {}, "revision": None,
    }
    write_atomic(path / ADAPTER_WEIGHTS, save({k: v.contiguous() for k, v in sorted(tensors.items())},
                                              metadata={"format": "pt"}))
    write_atomic(path / ADAPTER_CONFIG, json.dumps(config, indent=2) + "\n")
    return path


def read_adapter(path) -> tuple[LoraSettings, dict[str, torch.Tensor], str | None]:
    """(settings, tensors by peft name, base model) of a peft LoRA folder. Raises ModelError
    saying what is missing or not supported."""
    from safetensors.torch import load_file

    path = Path(path)
    config_path, weights_path = path / ADAPTER_CONFIG, path / ADAPTER_WEIGHTS
    if not config_path.is_file() or not weights_path.is_file():
        raise ModelError(f"{path} is not a LoRA adapter folder: it needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} "
                         "(what cluster.finetune and peft's save_pretrained write)")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"{config_path} is not readable JSON: {exc}") from None
    if config.get("peft_type", "LORA") != "LORA" or config.get("use_dora") or config.get("use_rslora") \
            or config.get("rank_pattern") or config.get("alpha_pattern") or config.get("bias", "none") != "none":
        raise ModelError(f"{config_path}: only plain LoRA adapters are served (no DoRA, rsLoRA, rank or alpha "
                         "patterns, or trained biases)")
    targets = config.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else list(targets)
    settings = LoraSettings(r=int(config.get("r", 8)), alpha=float(config.get("lora_alpha", 8)),
                            dropout=float(config.get("lora_dropout", 0.0)), targets=tuple(targets))
    tensors = {key.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B."): value
               for key, value in load_file(str(weights_path)).items()}
    return settings, tensors, config.get("base_model_name_or_path")
