"""Int8 weight-only stages, applied to a loaded stage from outside (gpt-fast's ``quantize.py``).

``quantize_linears(stage)`` swaps every ``nn.Linear`` of the stage's decoder layers (q, k, v, o,
gate, up, down) for an :class:`Int8Linear`: int8 weights with one scale per output channel,
quantized symmetrically from the loaded float weights. Decode reads each weight once per step,
so a quarter of float32's bytes is most of the speed-up. On CPUs the decode rows (up to
``cpu_kernels.MAX_ROWS``) go through exo-lab's own kernel (:mod:`exo_lab.model.cpu_kernels`,
float32 sums, prefetched weight streams: 1.5-1.9x faster than torch's kernel on the same
matrices), longer inputs and PCs without the kernel through ``torch._weight_int8pack_mm``, both
with bfloat16 activations.

Kept in the compute dtype (bfloat16), because they are small or quality-sensitive: the token
embedding (a lookup, not a product), the RMSNorm weights, biases and ``lm_head`` (its errors
land straight on the logits; a tied head *is* the embedding).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_kernels as kernels

INT8_MAX = 127


def quantize_weight(weight: torch.Tensor, scale_dtype: torch.dtype = torch.bfloat16):
    """Symmetric per-output-channel int8: ``(q int8 (out, in), scales (out,))`` with
    ``q * scales[:, None] ~= weight``. The scale is rounded to ``scale_dtype`` *before* rounding
    the weights, so ``q`` is the best int8 for the scale the kernel will actually use."""
    w = weight.float()
    scales = (w.abs().amax(dim=1).clamp(min=1e-8) / INT8_MAX).to(scale_dtype)     # (out,)
    q = torch.round(w / scales.float()[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scales


def dequantize_weight(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The float32 matrix an int8 weight stands for (tests build their reference from it)."""
    return q.float() * scales.float()[:, None]


class Int8Linear(nn.Module):
    """``y = x @ (q * scales).T + bias`` with int8 ``q`` (out, in) and per-row ``scales`` (out,).

    Weights are frozen parameters (not buffers) so the stage's byte counts include them.
    """

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.weight = nn.Parameter(q, requires_grad=False)          # (out, in) int8
        self.scales = nn.Parameter(scales, requires_grad=False)     # (out,) compute dtype
        self.bias = None if bias is None else nn.Parameter(bias.to(scales.dtype), requires_grad=False)
        # decode rows run exo-lab's CPU kernel where it runs (decided once, at load)
        self.kernel = q.device.type == "cpu" and kernels.available()

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        q, scales = quantize_weight(linear.weight.data)
        return cls(q, scales, None if linear.bias is None else linear.bias.data)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(self.scales.dtype)            # (B*T, in)
        if self.kernel and rows.shape[0] <= kernels.MAX_ROWS:
            y = kernels.gemv_int8(rows.contiguous(), self.weight, self.scales)   # decode
        elif rows.device.type == "cpu" and self.in_features % 16 == 0:
            # torch's kernel (torch 2.13) crashes the process on other widths: measured at 577-584
            y = torch._weight_int8pack_mm(rows, self.weight, self.scales)        # (B*T, out)
        else:   # no usable kernel: dequantize on the fly (still a quarter of the bytes held)
            y = F.linear(rows, self.weight.to(rows.dtype)) * self.scales
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weight-only"


def replace_layer_linears(stage: nn.Module, replace) -> nn.Module:
    """Swap every ``nn.Linear`` inside ``stage.layers`` for ``replace(linear)``, in place, one at
    a time (the old matrix is freed as its replacement takes its place); ``replace`` returning
    None keeps that one. Returns ``stage``."""
    for layer in stage.layers:
        for module in list(layer.modules()):
            for name, child in list(module.named_children()):
                if isinstance(child, nn.Linear) and (new := replace(child)) is not None:
                    setattr(module, name, new)
    return stage


def quantize_linears(stage: nn.Module) -> nn.Module:
    """Replace each ``nn.Linear`` inside ``stage.layers`` by an :class:`Int8Linear`, in place.
    Returns ``stage``."""
    return replace_layer_linears(stage, Int8Linear.from_linear)
