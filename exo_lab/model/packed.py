"""bfloat16 products on CPUs: exo-lab's decode kernel, else weights reordered once for oneDNN.

Where exo-lab's own CPU kernels run (:mod:`exo_lab.model.cpu_kernels`: a C compiler and an
AVX-512 or AVX2 CPU), :func:`pack_linears` gives a bfloat16 stage's decoder Linears and its head
a :class:`KernelLinear`: decode rows stream the plain bfloat16 weight through the kernel (a
tied head shares the embedding's matrix, nothing is copied), prefill runs ``F.linear``.
Measured on SmolLM2-135M, one decode step, 2 threads: 34.5 ms against 51.3 ms with the oneDNN
packing below. Elsewhere the oneDNN packing is the fallback:

torch's bfloat16 ``F.linear`` with one row of activations (decode) is compute-bound on CPUs:
over 425 MB of distinct 576 x 1536 matrices, 2 threads, it takes 19.0 ms where float32 takes
18.2 ms, although it reads half the bytes. With each weight reordered once into oneDNN's
blocked layout (``torch.ops.mkldnn._reorder_linear_weight``, what torch.compile's CPU freezing
pass does) the same products take 13.8-16.0 ms, and the results are bit-identical to
``F.linear``'s. :func:`pack_linears` applies that to a bfloat16 stage (int8 stages: their
bfloat16 ``lm_head``), where oneDNN has bfloat16 kernels for this CPU.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_kernels
from .quant import replace_layer_linears


class KernelLinear(nn.Module):
    """``nn.Linear`` in bfloat16 whose decode inputs (at most ``cpu_kernels.MAX_ROWS`` rows) run
    exo-lab's CPU kernel and longer ones (prefill) ``F.linear``. ``weight`` is the linear's own
    parameter, so a head tied to the embedding still shares its matrix."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).contiguous()
        if rows.shape[0] <= cpu_kernels.MAX_ROWS:
            y = cpu_kernels.gemv_bf16(rows, self.weight)
            if self.bias is not None:
                y = y + self.bias
        else:
            y = F.linear(rows, self.weight, self.bias)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bfloat16 exo-lab CPU kernel"


class PackedLinear(nn.Module):
    """``nn.Linear`` in bfloat16 with its weight in oneDNN's layout (``packed``, an opaque
    ``torch._mkldnn`` tensor that is neither a parameter nor a buffer; ``weight_bytes`` says
    what it holds)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.data, 1)
        self.weight_bytes = linear.weight.numel() * linear.weight.element_size()
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.data, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).contiguous()
        y = torch.ops.mkldnn._linear_pointwise(rows, self.packed, self.bias, "none", [], "")
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bfloat16 oneDNN-packed"


def can_pack(device: torch.device) -> bool:
    """Whether bfloat16 products on ``device`` gain from :func:`pack_linears`: a CPU where
    exo-lab's kernels run or oneDNN has bfloat16 kernels."""
    return device.type == "cpu" and (cpu_kernels.available() or _onednn_bf16())


def _onednn_bf16() -> bool:
    return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def pack_linears(stage: nn.Module, *, layers: bool = True) -> nn.Module:
    """Swap the bfloat16 ``nn.Linear`` modules of ``stage.layers`` (with ``layers``) and its
    ``lm_head`` for :class:`KernelLinear` where exo-lab's CPU kernels run, else for
    :class:`PackedLinear`, in place. A :class:`PackedLinear` head is not made of a matrix tied
    to the stage's own embedding (it would be held twice). Returns ``stage``."""
    make = KernelLinear if cpu_kernels.available() else PackedLinear
    if layers:
        replace_layer_linears(stage, lambda linear: make(linear) if _packable(linear) else None)
    head, embedding = stage.lm_head, stage.embed_tokens
    tied = (isinstance(getattr(embedding, "weight", None), torch.Tensor) and isinstance(getattr(head, "weight", None), torch.Tensor)
            and head.weight.data_ptr() == embedding.weight.data_ptr())
    if head is not None and _packable(head) and not (tied and make is PackedLinear):
        stage.lm_head = make(head)
    return stage


def _packable(module: nn.Module) -> bool:
    return type(module) is nn.Linear and module.weight.dtype == torch.bfloat16


def packed_bytes(stage: nn.Module) -> int:
    """Bytes held by the packed weights of ``stage`` (not among its parameters)."""
    return sum(m.weight_bytes for m in stage.modules() if isinstance(m, PackedLinear))
