"""Group-quantized weights: GGUF's blocks (Q4_0, Q4_1, Q4_K, Q8_0, Q6_K) and exo-lab's ``int4``,
held in the two layouts exo-lab's CPU kernels read (``exo_gemm_q4`` / ``exo_gemm_q8`` in
``cpu_kernels.c``, which documents them):

- **q4**: 4-bit codes ``u`` in groups of 32, ``w = scale * u + min`` (scale and min float16).
  Q4_0 (``min = -8 scale``) and Q4_1 keep their blocks' values exactly; Q4_K's sub-block
  scales ``d * sc`` and mins ``dmin * m`` are rounded once to float16 (relative error at most
  2**-11, against a 4-bit step of 1/15 of the range). 5 bits per weight (Q4_K: 4.5 in the file).
- **q8**: 8-bit codes in groups of 16, ``w = scale * (u - zero)``, one zero point per matrix:
  Q8_0 (``zero = 128``, its block scale for both halves) and Q5_0 (``zero = 16``) exactly,
  Q6_K (``zero = 32``, ``d * sc`` rounded to float16). 9 bits per weight (Q8_0: 8.5, Q6_K:
  6.56, Q5_0: 5.5 in the file: llama.cpp's Q4_K_M puts Q5_0 where rows are not a multiple of 256).

Repacking reads the file's blocks and writes codes and scales; no weight passes through float32.
``int4`` quantizes a float matrix the way Q4_1 does (per group of 32: min and max of the group).

:class:`QuantLinear` runs either layout: exo-lab's kernel on CPUs where it builds (decode and
prefill: activations quantized per block of 32 to int8, as llama.cpp's Q8 activations), else
the weight dequantized on the fly to the compute dtype (Windows, CPUs without AVX2, GPUs; on a
CUDA stage it is dequantized once, at load, to float16/bfloat16: ``to_dense``).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_kernels as kernels

Q4_GROUP = 32
# From this many positions a row on (a prefill chunk: (B, T, in) with T >= this; so a row's results
# never depend on the other rows of its batch), a product dequantizes its matrix to bfloat16 (one
# kernel call) and runs torch's GEMM: SmolLM2, 512-token prompt, 2 threads: 523 tok/s on the integer kernels,
# 1085 with the dequantized matrices (bfloat16 stages: 1110).
PREFILL_ROWS = 64
Q8_GROUP = 16
QK_K = 256

# bytes of one GGUF block and the weights it holds, per type (ggml's ggml-common.h)
GGUF_BLOCKS = {"Q4_0": (18, 32), "Q4_1": (20, 32), "Q5_0": (22, 32), "Q8_0": (34, 32), "Q4_K": (144, 256),
               "Q6_K": (210, 256), "F32": (4, 1), "F16": (2, 1), "BF16": (2, 1)}
QUANTIZED_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q8_0", "Q4_K", "Q6_K")
LAYOUT_OF = {"Q4_0": "q4", "Q4_1": "q4", "Q4_K": "q4", "Q5_0": "q8", "Q8_0": "q8", "Q6_K": "q8"}


class QuantWeight:
    """One matrix (out_features, in_features) in the q4 or q8 layout: ``codes`` uint8 (q4: two
    codes a byte), ``scales`` float16, ``mins`` float16 (q4) or None, ``zero`` (q8)."""

    def __init__(self, layout: str, shape: tuple[int, int], codes: torch.Tensor, scales: torch.Tensor,
                 mins: torch.Tensor | None = None, zero: int = 0):
        self.layout, self.shape = layout, (int(shape[0]), int(shape[1]))
        self.codes, self.scales, self.mins, self.zero = codes, scales, mins, int(zero)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scales, self.mins) if t is not None)

    def to(self, device) -> "QuantWeight":
        """The matrix on ``device`` (a GPU stage holds its blocks there)."""
        return QuantWeight(self.layout, self.shape, self.codes.to(device), self.scales.to(device),
                           None if self.mins is None else self.mins.to(device), self.zero)

    def rows(self, index) -> "QuantWeight":
        """The matrix with its rows reordered by ``index`` (rows are independent: exact)."""
        return QuantWeight(self.layout, self.shape, self.codes[index].contiguous(), self.scales[index].contiguous(),
                           None if self.mins is None else self.mins[index].contiguous(), self.zero)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The matrix the codes stand for (computed in float32; tests' reference, and the fallback)."""
        out, inner = self.shape
        if self.layout == "q4":
            packed = self.codes.view(out, inner // Q4_GROUP, 16)
            codes = torch.cat([packed & 0x0F, packed >> 4], dim=2).float()          # (out, groups, 32)
            w = codes * self.scales.float()[..., None] + self.mins.float()[..., None]
        else:
            codes = self.codes.view(out, inner // Q8_GROUP, Q8_GROUP).float() - self.zero
            w = codes * self.scales.float()[..., None]
        return w.reshape(out, inner).to(dtype)


def bits_per_weight(layout: str) -> float:
    """Bits a weight costs in memory in ``layout`` (codes, scales and mins)."""
    return 4 + 32 / Q4_GROUP if layout == "q4" else 8 + 16 / Q8_GROUP


def layout_bytes(gguf_type: str, shape: tuple[int, int]) -> int:
    """Bytes a GGUF tensor of ``gguf_type`` and ``shape`` (out, in) takes once loaded: its layout's
    for quantized matrices, 2 per value (bfloat16) for the float ones."""
    count = int(shape[0]) * int(shape[1]) if len(shape) > 1 else int(shape[0])
    if gguf_type in LAYOUT_OF:
        return int(count * bits_per_weight(LAYOUT_OF[gguf_type]) // 8)
    return 2 * count


def file_bytes(gguf_type: str, count: int) -> int:
    size, per = GGUF_BLOCKS[gguf_type]
    return count // per * size


# ----------------------------------------------------------------------------- repacking GGUF blocks

def repack(gguf_type: str, raw: np.ndarray, shape: tuple[int, int]) -> QuantWeight:
    """A GGUF tensor's raw bytes (uint8, row-major blocks) as a :class:`QuantWeight` of ``shape``
    (out_features, in_features)."""
    out, inner = shape
    size, per = GGUF_BLOCKS[gguf_type]
    if inner % per or raw.size != out * inner // per * size:
        raise ValueError(f"{gguf_type} tensor of shape {shape} must have a multiple of {per} columns and "
                         f"{out * inner // per * size} bytes, got {raw.size}")
    blocks = raw.reshape(out, inner // per, size)
    return _REPACK[gguf_type](blocks, out, inner)


def _f16(blocks: np.ndarray, start: int) -> np.ndarray:
    return np.ascontiguousarray(blocks[..., start:start + 2]).view(np.float16)[..., 0]


def _q4(out, inner, codes_packed, scales, mins) -> QuantWeight:
    return QuantWeight("q4", (out, inner), torch.from_numpy(np.ascontiguousarray(codes_packed).reshape(out, inner // 2)),
                       torch.from_numpy(np.ascontiguousarray(scales, dtype=np.float16).reshape(out, -1)),
                       torch.from_numpy(np.ascontiguousarray(mins, dtype=np.float16).reshape(out, -1)))


def _repack_q4_0(blocks, out, inner):
    d = _f16(blocks, 0)
    return _q4(out, inner, blocks[..., 2:], d, -8 * d)


def _repack_q4_1(blocks, out, inner):
    return _q4(out, inner, blocks[..., 4:], _f16(blocks, 0), _f16(blocks, 2))


def _k_scales(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K's 8 (scale, min) 6-bit pairs from its 12 bytes (ggml's get_scale_min_k4)."""
    q = packed.astype(np.uint8)
    sc = np.empty(q.shape[:-1] + (8,), np.uint8)
    mn = np.empty_like(sc)
    sc[..., :4] = q[..., 0:4] & 63
    mn[..., :4] = q[..., 4:8] & 63
    sc[..., 4:] = (q[..., 8:12] & 0x0F) | ((q[..., 0:4] >> 6) << 4)
    mn[..., 4:] = (q[..., 8:12] >> 4) | ((q[..., 4:8] >> 6) << 4)
    return sc, mn


def _repack_q4_k(blocks, out, inner):
    d, dmin = _f16(blocks, 0).astype(np.float32), _f16(blocks, 2).astype(np.float32)
    sc, mn = _k_scales(blocks[..., 4:16])
    qs = blocks[..., 16:144].reshape(out, -1, 4, 32)           # 4 chunks of 32 bytes: 64 weights each
    codes = np.stack([qs & 0x0F, qs >> 4], axis=3)              # (out, blocks, 4, 2, 32): sub-block 2c, 2c+1
    codes = codes.reshape(out, -1, 32)                          # sub-blocks of 32 codes, in order
    packed = codes[..., :16] | (codes[..., 16:] << 4)           # the q4 layout: u[i] | u[i+16] << 4
    scales = (d[..., None] * sc).reshape(out, -1)
    mins = -(dmin[..., None] * mn).reshape(out, -1)
    return _q4(out, inner, packed, scales, mins)


def _q8(out, inner, codes, scales, zero) -> QuantWeight:
    return QuantWeight("q8", (out, inner), torch.from_numpy(np.ascontiguousarray(codes, dtype=np.uint8).reshape(out, inner)),
                       torch.from_numpy(np.ascontiguousarray(scales, dtype=np.float16).reshape(out, -1)), None, zero)


def _repack_q8_0(blocks, out, inner):
    d = _f16(blocks, 0)
    codes = (blocks[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
    return _q8(out, inner, codes, np.repeat(d, 2, axis=-1), 128)


def _repack_q5_0(blocks, out, inner):
    d = _f16(blocks, 0)
    high = np.ascontiguousarray(blocks[..., 2:6]).view("<u4")                 # (out, blocks, 1)
    bits = ((high >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)    # bit j: code j's fifth bit
    qs = blocks[..., 6:22]
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1) | (bits << 4)
    return _q8(out, inner, codes, np.repeat(d, 2, axis=-1), 16)


def _repack_q6_k(blocks, out, inner):
    ql = blocks[..., 0:128].reshape(out, -1, 2, 64)             # two halves of 128 weights
    qh = blocks[..., 128:192].reshape(out, -1, 2, 32)
    sc = blocks[..., 192:208].view(np.int8).astype(np.float32)  # 16 scales, one per 16 weights
    d = _f16(blocks, 208).astype(np.float32)
    lo, hi = ql[..., :32], ql[..., 32:]
    parts = [(lo & 0x0F) | (((qh >> 0) & 3) << 4), (hi & 0x0F) | (((qh >> 2) & 3) << 4),
             (lo >> 4) | (((qh >> 4) & 3) << 4), (hi >> 4) | (((qh >> 6) & 3) << 4)]
    codes = np.stack(parts, axis=3).reshape(out, inner)        # (out, blocks, 2, 4, 32) in order
    return _q8(out, inner, codes, (d[..., None] * sc).reshape(out, -1), 32)


_REPACK = {"Q4_0": _repack_q4_0, "Q4_1": _repack_q4_1, "Q4_K": _repack_q4_k,
           "Q5_0": _repack_q5_0, "Q8_0": _repack_q8_0, "Q6_K": _repack_q6_k}


# ----------------------------------------------------------------------------- int4 from float weights

def quantize_int4(weight: torch.Tensor) -> QuantWeight:
    """A float matrix as Q4_1 quantizes it: per group of 32, ``scale = (max - min) / 15`` and
    ``min``, both rounded to float16 first, codes ``round((w - min) / scale)`` clamped to 0..15."""
    out, inner = weight.shape
    if inner % Q4_GROUP:
        raise ValueError(f"int4 needs in_features divisible by {Q4_GROUP}, got {inner}")
    w = weight.detach().float().reshape(out, inner // Q4_GROUP, Q4_GROUP)
    low, high = w.amin(dim=2), w.amax(dim=2)
    scales = ((high - low) / 15).to(torch.float16)
    mins = low.to(torch.float16)
    step = scales.float().clamp(min=1e-12)[..., None]
    codes = torch.round((w - mins.float()[..., None]) / step).clamp(0, 15).to(torch.uint8)
    packed = codes[..., :16] | (codes[..., 16:] << 4)
    return QuantWeight("q4", (out, inner), packed.reshape(out, inner // 2).contiguous(), scales, mins)


# ----------------------------------------------------------------------------- the module

def _hold(module: nn.Module, weight: QuantWeight, dtype: torch.dtype) -> None:
    """Give ``module`` the matrix's codes, scales and mins as frozen parameters (counted in the
    stage's bytes), its layout, zero point and compute dtype."""
    module.layout, module.zero, module.dtype = weight.layout, weight.zero, dtype
    module.codes = nn.Parameter(weight.codes, requires_grad=False)
    module.scales = nn.Parameter(weight.scales, requires_grad=False)
    module.mins = None if weight.mins is None else nn.Parameter(weight.mins, requires_grad=False)


class QuantLinear(nn.Module):
    """``y = x @ W.T (+ bias)`` with ``W`` a :class:`QuantWeight`; activations and results in
    ``dtype`` (bfloat16 on CPUs). Codes, scales and mins are frozen parameters, so the stage's
    byte counts include them."""

    def __init__(self, weight: QuantWeight, bias: torch.Tensor | None = None, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        _hold(self, weight, dtype)
        self.bias = None if bias is None else nn.Parameter(bias.to(dtype), requires_grad=False)
        self.kernel = (weight.codes.device.type == "cpu" and dtype == torch.bfloat16
                       and self.in_features % Q4_GROUP == 0 and kernels.available())

    @property
    def quant(self) -> QuantWeight:
        """The matrix (views of this module's parameters)."""
        return QuantWeight(self.layout, (self.out_features, self.in_features), self.codes.data, self.scales.data,
                           None if self.mins is None else self.mins.data, self.zero)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(self.dtype)
        tokens = x.shape[-2] if x.dim() > 2 else rows.shape[0]   # a row's own positions, not the batch's
        if self.kernel and tokens >= PREFILL_ROWS:       # prefill: torch's bfloat16 GEMM wins
            y = F.linear(rows, kernels.dequantize(self.quant))
        elif self.kernel:
            y = kernels.gemm_quant(rows.contiguous(), self.quant)
        else:
            y = F.linear(rows, self.quant.dequantize(self.dtype))
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, {self.layout} "
                f"({'exo-lab CPU kernel' if self.kernel else 'dequantized per call'})")


class QuantEmbedding(nn.Module):
    """A token embedding held quantized (GGUF's ``token_embd``): a lookup dequantizes only the
    rows it reads (rows are independent), to ``dtype``. A tied head shares its parameters."""

    def __init__(self, weight: QuantWeight, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.num_embeddings, self.embedding_dim = weight.shape
        _hold(self, weight, dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        rows = QuantWeight(self.layout, (flat.numel(), self.embedding_dim), self.codes[flat], self.scales[flat],
                           None if self.mins is None else self.mins[flat], self.zero)
        return rows.dequantize(self.dtype).reshape(*ids.shape, self.embedding_dim)

    def head(self) -> QuantLinear:
        """The tied output head: a :class:`QuantLinear` over the same parameters."""
        head = QuantLinear(QuantWeight(self.layout, (self.num_embeddings, self.embedding_dim), self.codes.data,
                                       self.scales.data, None if self.mins is None else self.mins.data, self.zero),
                           None, self.dtype)
        head.codes, head.scales, head.mins = self.codes, self.scales, self.mins
        return head


def quantize_linears_int4(stage: nn.Module) -> nn.Module:
    """Replace each ``nn.Linear`` of ``stage.layers`` by a :class:`QuantLinear` of its int4 weight."""
    from .quant import replace_layer_linears

    def replace(linear: nn.Linear):
        if linear.in_features % Q4_GROUP:
            return None      # stays bfloat16
        bias = None if linear.bias is None else linear.bias.data
        return QuantLinear(quantize_int4(linear.weight.data), bias, linear.weight.dtype
                           if linear.weight.dtype != torch.float32 else torch.bfloat16)

    return replace_layer_linears(stage, replace)
