"""exo_lab.model.quant4 and the q4/q8 kernels: GGUF's blocks repacked without changing a value
(against gguf-py's own dequantization), and the kernels' products equal to the arithmetic they
promise (llama.cpp's: activations quantized per block of 32 to int8, integer sums, one scale per
group) on the AVX512_VNNI path and the AVX2 path, for decode and prefill row counts."""
from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from exo_lab.model import cpu_kernels
from exo_lab.model.quant4 import GGUF_BLOCKS, QuantLinear, QuantWeight, quantize_int4, repack

needs_kernels = pytest.mark.skipif(not cpu_kernels.available(), reason="exo-lab's CPU kernels do not run here")

# where each block type keeps its float16 fields (the rest: codes and 6-bit scales, any byte valid)
HALF_FIELDS = {"Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q8_0": [0], "Q4_K": [0, 2], "Q6_K": [208]}


def random_blocks(kind: str, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Random but valid GGUF bytes: every byte random, the float16 fields small positive numbers."""
    rng = np.random.default_rng(seed)
    size, per = GGUF_BLOCKS[kind]
    raw = rng.integers(0, 256, size=(rows, cols // per, size), dtype=np.uint8)
    for at in HALF_FIELDS[kind]:
        raw[..., at:at + 2] = rng.uniform(1e-3, 2e-2, size=raw.shape[:2]).astype(np.float16)[..., None].view(np.uint8)
    return raw.reshape(-1)


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q5_0", "Q8_0", "Q4_K", "Q6_K"])
def test_repacked_blocks_stand_for_the_same_weights_as_gguf_says(kind):
    rows, cols = 6, 512
    raw = random_blocks(kind, rows, cols)
    reference = dequantize(raw.reshape(rows, -1), getattr(GGMLQuantizationType, kind)).astype(np.float64)
    weight = repack(kind, raw, (rows, cols))
    got = weight.dequantize().double().numpy()
    if kind in ("Q4_K", "Q6_K"):       # d * sc rounded once to float16: 2^-11 of each group's scale
        assert np.abs(got - reference).max() <= 2**-10 * np.abs(reference).max()
    else:                              # Q4_0, Q4_1, Q5_0, Q8_0: exactly the file's values
        assert np.array_equal(got, reference)
    assert weight.nbytes == rows * cols * (5 if weight.layout == "q4" else 9) // 8


def test_bad_block_bytes_are_refused_with_the_sizes():
    with pytest.raises(ValueError, match="Q4_K tensor of shape .* must have a multiple of 256 columns"):
        repack("Q4_K", np.zeros(144, np.uint8), (1, 255))
    with pytest.raises(ValueError, match="20 bytes"):
        repack("Q4_1", np.zeros(19, np.uint8), (1, 32))


def llama_cpp_arithmetic(x: torch.Tensor, weight: QuantWeight) -> np.ndarray:
    """What the kernel promises, in float64: x quantized per block of 32 (float32 scale
    amax/127, round half to even), integer dot products per group, each scaled once."""
    xs = x.float().numpy().reshape(x.shape[0], -1, 32)
    amax = np.abs(xs).max(axis=2)
    d = (amax / np.float32(127)).astype(np.float32)
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    q = np.rint(xs * inv[..., None]).astype(np.float64)                 # (M, K/32, 32)
    out, inner = weight.shape
    if weight.layout == "q4":
        packed = weight.codes.numpy().reshape(out, inner // 32, 16)
        codes = np.concatenate([packed & 15, packed >> 4], axis=2).astype(np.float64)
        dots = np.einsum("ngk,mgk->mng", codes, q)
        sums = q.sum(axis=2)                                             # (M, K/32)
        scales = weight.scales.float().numpy().astype(np.float64)
        mins = weight.mins.float().numpy().astype(np.float64)
        return (dots * scales[None] * d[:, None, :] + mins[None] * (d * sums)[:, None, :]).sum(axis=2)
    codes = weight.codes.numpy().reshape(out, inner // 16, 16).astype(np.float64)
    q16 = q.reshape(q.shape[0], -1, 16)
    d16 = np.repeat(d, 2, axis=1)
    dots = np.einsum("ngk,mgk->mng", codes, q16)
    scales = weight.scales.float().numpy().astype(np.float64)
    zero = (d16 * q16.sum(axis=2))[:, None, :] * scales[None] * weight.zero
    return (dots * scales[None] * d16[:, None, :] - zero).sum(axis=2)


def call(library, x: torch.Tensor, weight: QuantWeight) -> torch.Tensor:
    y = torch.empty(x.shape[0], weight.shape[0], dtype=torch.bfloat16)
    if weight.layout == "q4":
        status = library.exo_gemm_q4(x.data_ptr(), x.shape[0], x.shape[1], weight.codes.data_ptr(),
                                     weight.scales.data_ptr(), weight.mins.data_ptr(), weight.shape[0], y.data_ptr())
    else:
        status = library.exo_gemm_q8(x.data_ptr(), x.shape[0], x.shape[1], weight.codes.data_ptr(),
                                     weight.scales.data_ptr(), weight.zero, weight.shape[0], y.data_ptr())
    assert status == 0
    return y


@pytest.fixture(scope="module", params=["native", "haswell"])
def library(request) -> ctypes.CDLL:
    """The kernels as this PC builds them (AVX512_VNNI here) and as an AVX2-only PC would."""
    if not cpu_kernels.available():
        pytest.skip("exo-lab's CPU kernels do not run here")
    library = cpu_kernels.build_for(request.param)
    assert library.exo_gemm_vnni() == (request.param == "native" and cpu_kernels.integer_products() == "AVX512_VNNI")
    return library


@pytest.mark.parametrize("rows", [1, 3, 4, 5, 16, 17, 70])
@pytest.mark.parametrize("kind, out_features, in_features", [("Q4_1", 37, 64), ("Q4_K", 576, 1536),
                                                             ("Q8_0", 29, 96), ("Q6_K", 130, 512),
                                                             ("Q5_0", 576, 576)])
def test_kernel_products_equal_llama_cpps_arithmetic(library, rows, kind, out_features, in_features):
    """Rows in tiles of 4 with tails, prefill's 64-row passes (70), odd output counts."""
    generator = torch.Generator().manual_seed(rows + in_features)
    weight = repack(kind, random_blocks(kind, out_features, in_features, seed=rows), (out_features, in_features))
    x = torch.randn(rows, in_features, generator=generator).bfloat16()
    x[0, 5] = 40.0                                   # an outlier channel, as real activations have
    got = call(library, x, weight).double().numpy()
    exact = llama_cpp_arithmetic(x, weight)
    # one rounding to bfloat16 (2^-8 relative) plus float32 sums
    assert (np.abs(got - exact) <= np.abs(exact) * 2**-8 + 1e-5 * np.abs(exact).max()).all()
    # and the product itself, to the activations' 8-bit quantization (away from the outlier's
    # block, whose other values it quantizes coarsely)
    dense = x.double().numpy() @ weight.dequantize().double().numpy().T
    assert np.abs(got - dense)[1:].max(initial=0) <= 0.02 * np.abs(dense).max()


@needs_kernels
def test_quant_linear_takes_any_leading_shape_and_falls_back_to_the_dequantized_product():
    linear = QuantLinear(quantize_int4(torch.randn(48, 64)), torch.randn(48))
    x = torch.randn(2, 3, 64).bfloat16()
    fast = linear(x)
    linear.kernel = False
    slow = linear(x)
    assert fast.shape == slow.shape == (2, 3, 48)
    assert (fast.float() - slow.float()).abs().max() <= 0.03 * slow.float().abs().max()


def test_int4_quantizes_each_group_of_32_between_its_min_and_max():
    weight = torch.randn(8, 64)
    quantized = quantize_int4(weight)
    error = (quantized.dequantize() - weight).abs().reshape(8, 2, 32)
    step = (weight.reshape(8, 2, 32).amax(2) - weight.reshape(8, 2, 32).amin(2)) / 15
    assert (error <= step[..., None] * 0.5 + 1e-2 * step[..., None]).all()


@needs_kernels
@pytest.mark.parametrize("kind", ["Q4_1", "Q4_K", "Q8_0", "Q6_K"])
def test_prefill_rows_take_the_dequantized_matrix_exactly_as_the_reference_dequantizes_it(kind):
    """From PREFILL_ROWS rows on, a product runs torch's GEMM on the kernel-dequantized matrix:
    bit for bit QuantWeight.dequantize(bfloat16), so prefill computes with the file's values."""
    from exo_lab.model.quant4 import PREFILL_ROWS

    weight = repack(kind, random_blocks(kind, 40, 512), (40, 512))
    assert torch.equal(cpu_kernels.dequantize(weight), weight.dequantize(torch.bfloat16))
    linear = QuantLinear(weight)
    x = torch.randn(PREFILL_ROWS, 512).bfloat16()
    assert torch.equal(linear(x), torch.nn.functional.linear(x, weight.dequantize(torch.bfloat16)))
    few = linear(x[:PREFILL_ROWS - 1])              # decode-sized: the integer kernel, 8-bit activations
    dense = x[:PREFILL_ROWS - 1].float() @ weight.dequantize().T
    assert (few.float() - dense).abs().max() <= 0.03 * dense.abs().max()
