"""A lean forward for the decoder layers of the Llama family (Llama, Mistral, Qwen2, Qwen3).

A decode step of a small model is thousands of tiny torch calls; on CPUs their Python and
dispatch cost is as large as the weight stream (SmolLM2-135M int8: ~15 ms of a ~30 ms step).
:class:`LeanLayers` runs the same arithmetic as transformers' layer code with fewer calls:
- q, k and v are one product, and gate and up another (not in float32, see below): their
  weights are concatenated once at load into one matrix, and the layer's own q/k/v/gate/up modules keep *views* of it, so nothing
  is held twice and transformers' forward still works on the same memory;
- attention calls ``F.scaled_dot_product_attention`` directly (GQA in the kernel) with the mask
  the stage built once per step, instead of transformers' attention dispatch;
- where exo-lab's CPU kernels run (on CPUs; RMSNorm for bfloat16 only), each RMSNorm and each
  rotary embedding is one call (:func:`exo_lab.model.cpu_kernels.rms_norm`, ``rotary_``) rounding as
  transformers' 8 and 16 torch calls round; elsewhere they are the layer's own norm modules and
  the architecture's own ``apply_rotary_pos_emb``.
Activation, o/down products and the KV slots are the layer's own. The stage tests check every supported
architecture token-exact against transformers, through this path.

Where the layers are not of this family, or their products cannot be concatenated (oneDNN-packed
weights), :func:`lean_layers` returns None and the stage runs transformers' layer forward.
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_kernels
from .packed import KernelLinear
from .quant import Int8Linear
from .quant4 import QuantLinear, QuantWeight

LEAN_LAYERS = {"LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer"}
LEAN_NORMS = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"}   # w * x / rms(x)


class LeanLayers:
    """The stage's decoder layers with fused q/k/v and gate/up products. Not an ``nn.Module``:
    the fused matrices it holds are the same memory as the layers' parameters, counted there."""

    def __init__(self, layers: nn.ModuleList, config):
        self.layers = layers
        # for hooked(): each module's hook dicts, listed once (walking the tree costs ~0.5 ms,
        # asking each module ~0.3 ms; any() over the dicts themselves ~10 us)
        self._hooks = [hooks for m in layers.modules() for hooks in (m._forward_hooks, m._forward_pre_hooks)]
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        attention = layers[0].self_attn
        self.rotary = sys.modules[type(attention).__module__].apply_rotary_pos_emb
        self.qk_norm = hasattr(attention, "q_norm")          # Qwen3: RMSNorm per head on q and k
        self.qkv = [fuse([l.self_attn.q_proj, l.self_attn.k_proj, l.self_attn.v_proj]) for l in layers]
        # float32 products run on MKL, which is slower on one 2 x intermediate matrix than on two
        # at 8 rows (29.1 against 24.5 ms over SmolLM2's 30 layers): those stay apart.
        self.gate_up = [None if type(l.mlp.gate_proj) is nn.Linear else fuse([l.mlp.gate_proj, l.mlp.up_proj])
                        for l in layers]
        self.one_call = _one_call_layers(self, config)

    def decode(self, hidden: torch.Tensor, cos_sin, cache, slots: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Every layer on ``hidden`` (B, 1, hidden): one decode step of B rows, each layer one call
        of exo-lab's kernel (``exo_decode_layer``) where :attr:`one_call` says it applies."""
        B, _, width = hidden.shape
        x = hidden.reshape(B, width).contiguous().clone()
        cos, sin = (t.reshape(B, self.head_dim).contiguous() for t in cos_sin)
        slots, positions = slots.to(torch.int64).contiguous(), positions.to(torch.int64).contiguous()
        call = cpu_kernels.decode_layer_function()
        for index, (norm1, norm2, eps, matrices, scaling) in enumerate(self.one_call):   # matrices: 6 arguments
            status = call(x.data_ptr(), B, width, norm1, norm2, eps, *matrices, cache.keys[index].data_ptr(),
                          cache.values[index].data_ptr(), slots.data_ptr(), positions.data_ptr(), cache.max_context,
                          self.heads, self.kv_heads, self.head_dim, scaling, cos.data_ptr(), sin.data_ptr())
            if status != 0:
                raise MemoryError(f"exo-lab's decode kernel failed (status {status}) on layer {index}")
        return x.view(B, 1, width)

    def forward(self, index: int, hidden: torch.Tensor, mask: torch.Tensor, cos_sin, cache) -> torch.Tensor:
        """Decoder layer ``index`` on ``hidden`` (B, T, hidden), as transformers' layer computes it."""
        layer = self.layers[index]
        attention, mlp = layer.self_attn, layer.mlp
        B, T, _ = hidden.shape
        H, Hk, D = self.heads, self.kv_heads, self.head_dim
        q, k, v = self.qkv[index](self._norm(layer.input_layernorm, hidden)).split([H * D, Hk * D, Hk * D], dim=-1)
        q, k, v = q.view(B, T, H, D), k.view(B, T, Hk, D), v.view(B, T, Hk, D)
        if cpu_kernels.takes(*cos_sin):        # one call per rotary (and q/k norm) instead of ~16
            q, k = q.contiguous(), k.contiguous()
            if self.qk_norm:
                q, k = self._norm(attention.q_norm, q), self._norm(attention.k_norm, k)
            q = cpu_kernels.rotary_(q, *cos_sin).transpose(1, 2)
            k = cpu_kernels.rotary_(k, *cos_sin).transpose(1, 2)
        else:
            if self.qk_norm:
                q, k = attention.q_norm(q), attention.k_norm(k)
            q, k = self.rotary(q.transpose(1, 2), k.transpose(1, 2), *cos_sin)
        k, v = cache.update(k, v.transpose(1, 2), index)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attention.scaling,
                                             enable_gqa=H != Hk)
        hidden = hidden + attention.o_proj(out.transpose(1, 2).reshape(B, T, H * D))
        x = self._norm(layer.post_attention_layernorm, hidden)
        gate_up = self.gate_up[index]
        gate, up = gate_up(x).chunk(2, dim=-1) if gate_up is not None else (mlp.gate_proj(x), mlp.up_proj(x))
        return hidden + mlp.down_proj(mlp.act_fn(gate) * up)

    def hooked(self) -> bool:
        """Whether a forward hook or pre-hook is registered on the layers, any module in them, or
        globally (this forward skips module calls, so a hook must switch it off)."""
        from torch.nn.modules import module as torch_module

        if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
            return True
        return any(self._hooks)

    @staticmethod
    def _norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The RMSNorm module ``norm`` on ``x``: one kernel call where exo-lab's CPU kernels take it
        and x is bfloat16. float32 keeps transformers' norm: the kernel's sums run in another
        order, ~1e-6 apart, and float32 stages are the reference that matches transformers to 1e-5."""
        if x.dtype == torch.bfloat16 and cpu_kernels.takes(x, norm.weight):
            return cpu_kernels.rms_norm(x, norm.weight, norm.variance_epsilon)
        return norm(x)


def lean_layers(layers: nn.ModuleList, config) -> LeanLayers | None:
    """:class:`LeanLayers` over ``layers`` (their q/k/v and gate/up weights become views of one
    matrix each), or None where the lean forward does not apply."""
    if not len(layers) or any(type(layer).__name__ not in LEAN_LAYERS for layer in layers):
        return None
    for layer in layers:
        a, m = layer.self_attn, layer.mlp
        norms = [layer.input_layernorm, layer.post_attention_layernorm, *([a.q_norm, a.k_norm] if hasattr(a, "q_norm") else [])]
        if not all(type(n).__name__ in LEAN_NORMS for n in norms):
            return None
        if not (_fusable([a.q_proj, a.k_proj, a.v_proj]) and _fusable([m.gate_proj, m.up_proj])):
            return None
    return LeanLayers(layers, config)


def _fusable(modules: list[nn.Module]) -> bool:
    kind = type(modules[0])
    if kind not in (nn.Linear, KernelLinear, Int8Linear, QuantLinear) or any(type(m) is not kind for m in modules):
        return False
    return len({m.in_features for m in modules}) == 1 and len({m.bias is None for m in modules}) == 1


def fuse(modules: list[nn.Module]) -> nn.Module:
    """One module computing ``cat([m(x) for m in modules], -1)``; each of ``modules`` is left
    holding views of the fused tensors (so the memory is held once)."""
    kind = type(modules[0])
    if kind is QuantLinear:
        return _fuse_quant(modules)
    names = ("weight", "scales", "bias") if kind is Int8Linear else ("weight", "bias")
    fused = {name: None if getattr(modules[0], name) is None
             else torch.cat([getattr(m, name).data for m in modules]) for name in names}
    if kind is Int8Linear:
        one = Int8Linear(fused["weight"], fused["scales"], fused["bias"])
    else:
        linear = nn.Linear(fused["weight"].shape[1], fused["weight"].shape[0], bias=fused["bias"] is not None,
                           device="meta")
        linear.weight = nn.Parameter(fused["weight"], requires_grad=False)
        if fused["bias"] is not None:
            linear.bias = nn.Parameter(fused["bias"], requires_grad=False)
        one = KernelLinear(linear) if kind is KernelLinear else linear
    offset = 0
    for m in modules:
        rows = m.weight.shape[0]
        for name in names:
            if fused[name] is not None:
                setattr(m, name, nn.Parameter(fused[name][offset:offset + rows], requires_grad=False))
        offset += rows
    return one


class Stacked(nn.Module):
    """``cat([m(x) for m in parts], -1)``: the products of matrices held in different layouts
    (a Q4_K_M file's q/k in Q4_K and v in Q6_K), which cannot be one matrix."""

    def __init__(self, parts: list[nn.Module]):
        super().__init__()
        self.parts = list(parts)        # not registered: the layer owns them

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([part(x) for part in self.parts], dim=-1)


def _fuse_quant(modules: list[QuantLinear]) -> nn.Module:
    """:func:`fuse` for :class:`QuantLinear` modules of one layout (and zero point); else a
    :class:`Stacked` of them."""
    first = modules[0]
    if any(m.layout != first.layout or m.zero != first.zero or m.dtype != first.dtype for m in modules):
        return Stacked(modules)
    names = [n for n in ("codes", "scales", "mins", "bias") if getattr(first, n) is not None]
    if any((getattr(m, n) is None) for m in modules for n in names):
        return Stacked(modules)
    fused = {n: torch.cat([getattr(m, n).data for m in modules]) for n in names}
    one = QuantLinear(QuantWeight(first.layout, (fused["codes"].shape[0], first.in_features), fused["codes"],
                                  fused["scales"], fused.get("mins"), first.zero), fused.get("bias"), first.dtype)
    offset = 0
    for m in modules:
        for n in names:
            setattr(m, n, nn.Parameter(fused[n][offset:offset + m.out_features], requires_grad=False))
        offset += m.out_features
    return one


def _one_call_layers(lean: LeanLayers, config) -> list | None:
    """Per layer (norm weights' pointers, eps, its four matrices as cpu_kernels.Matrix, attention
    scaling) for :meth:`LeanLayers.decode`, or None where one call per layer does not apply:
    every product a group-quantized :class:`QuantLinear` on exo-lab's kernel without bias (GGUF
    and int4 stages), bfloat16 RMSNorms, SiLU, no q/k norms (the stage checks that its layers
    attend over whole sequences)."""
    if lean.qk_norm or lean.head_dim > 512:
        return None
    layers = []
    for index, layer in enumerate(lean.layers):
        groups = [_parts(lean.qkv[index]), [layer.self_attn.o_proj], _parts(lean.gate_up[index]), [layer.mlp.down_proj]]
        norms = (layer.input_layernorm, layer.post_attention_layernorm)
        if not all(type(p) is QuantLinear and p.kernel and p.bias is None for group in groups for p in group):
            return None
        if not all(n.weight.dtype == torch.bfloat16 and n.weight.is_contiguous() for n in norms) or \
                type(layer.mlp.act_fn).__name__ != "SiLUActivation" and not isinstance(layer.mlp.act_fn, nn.SiLU):
            return None
        qkv, o, gate_up, down = (_matrices(group) for group in groups)
        layers.append((norms[0].weight.data_ptr(), norms[1].weight.data_ptr(), norms[0].variance_epsilon,
                       [qkv, len(groups[0]), o, gate_up, len(groups[2]), down], layer.self_attn.scaling))
    return layers


def _parts(module: nn.Module | None) -> list:
    """The products a fused module computes: a :class:`Stacked` module's parts, else itself."""
    return list(module.parts) if isinstance(module, Stacked) else [module]


def _matrices(products: list[QuantLinear]):
    """``products`` as a ctypes array of cpu_kernels.Matrix (their tensors' pointers)."""
    array = (cpu_kernels.Matrix * len(products))()
    for slot, p in zip(array, products):
        slot.layout, slot.codes, slot.scales = 4 if p.layout == "q4" else 8, p.codes.data_ptr(), p.scales.data_ptr()
        slot.mins, slot.zero = (p.mins.data_ptr() if p.mins is not None else None), p.zero
        slot.n, slot.k = p.out_features, p.in_features
    return array
