"""exo_lab.model.cpu_kernels: the decode products exo-lab builds on the PC that runs them must
give torch's results (to bfloat16 rounding) for any shape, share torch's threads, and step aside
cleanly when they cannot run."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch

from exo_lab.model import cpu_kernels
from exo_lab.model.quant import dequantize_weight, quantize_weight


def _cpu_can() -> bool:
    flags = Path("/proc/cpuinfo").read_text()
    return bool(shutil.which("cc")) and (" avx512f" in flags or (" avx2" in flags and " fma" in flags))


def test_the_kernels_build_and_load_wherever_a_compiler_and_avx2_are_present():
    assert cpu_kernels.available() == _cpu_can()


needs_kernels = pytest.mark.skipif(not cpu_kernels.available(), reason="exo-lab's CPU kernels do not run here")


@needs_kernels
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 13, 16])
@pytest.mark.parametrize("out_features, in_features", [(576, 576), (7, 40), (1541, 577), (3, 1)])
def test_products_equal_the_float64_product_to_bfloat16_rounding(rows, out_features, in_features):
    """Shapes with tails everywhere: rows not a multiple of 4, output rows not a multiple of the
    4-row block, inputs not a multiple of the vector width."""
    generator = torch.Generator().manual_seed(rows * 1000 + in_features)
    x = torch.randn(rows, in_features, generator=generator).bfloat16()
    weight = torch.randn(out_features, in_features, generator=generator)
    q, scales = quantize_weight(weight)
    for got, matrix in ((cpu_kernels.gemv_int8(x, q, scales), dequantize_weight(q, scales)),
                        (cpu_kernels.gemv_bf16(x, weight.bfloat16()), weight.bfloat16().float())):
        exact = x.double() @ matrix.double().T
        assert got.dtype == torch.bfloat16 and got.shape == (rows, out_features)
        # one rounding to bfloat16 (2^-8 relative) plus float32 sums
        assert ((got.double() - exact).abs() <= exact.abs() * 2**-8 + 1e-4 * exact.abs().max()).all()


@needs_kernels
def test_bad_shapes_are_refused_before_reaching_c():
    x = torch.randn(cpu_kernels.MAX_ROWS + 1, 8).bfloat16()
    with pytest.raises(ValueError, match="1-16 contiguous rows"):
        cpu_kernels.gemv_bf16(x, torch.randn(4, 8).bfloat16())
    with pytest.raises(ValueError, match="rows of 8 values"):
        cpu_kernels.gemv_bf16(x[:2, :4].contiguous(), torch.randn(4, 8).bfloat16())


@needs_kernels
def test_the_kernels_run_on_torchs_threads():
    """One OpenMP runtime: torch.set_num_threads on the calling thread sets the kernels' team."""
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            assert cpu_kernels.team_size() == threads
    finally:
        torch.set_num_threads(before)


def test_switched_off_they_step_aside_with_one_line_saying_why(monkeypatch, caplog):
    monkeypatch.setenv(cpu_kernels.ENV_SWITCH, "0")
    cpu_kernels._library.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="exo_lab.model.cpu_kernels"):
            assert not cpu_kernels.available()
        assert "kernels are off (EXO_LAB_KERNELS=0)" in caplog.text
    finally:
        monkeypatch.delenv(cpu_kernels.ENV_SWITCH)
        cpu_kernels._library.cache_clear()
    assert cpu_kernels.available() == _cpu_can()


def test_a_build_failure_is_reported_not_raised(monkeypatch, caplog, tmp_path):
    monkeypatch.setenv("EXO_LAB_CACHE", str(tmp_path))
    broken = tmp_path / "broken.c"
    broken.write_text("this is not C\n")
    monkeypatch.setattr(cpu_kernels, "SOURCE", broken)
    cpu_kernels._library.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="exo_lab.model.cpu_kernels"):
            assert not cpu_kernels.available()
        assert "building broken.c failed" in caplog.text or "no C compiler" in caplog.text
    finally:
        monkeypatch.undo()
        cpu_kernels._library.cache_clear()


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_rounds_exactly_as_transformers_rotary(dtype):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    generator = torch.Generator().manual_seed(3)
    q, k = (torch.randn(2, 5, heads, 64, generator=generator).to(dtype) for heads in (9, 3))
    cos, sin = (torch.randn(2, 5, 64, generator=generator).to(dtype) for _ in range(2))
    want_q, want_k = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    assert torch.equal(cpu_kernels.rotary_(q.clone(), cos, sin).transpose(1, 2), want_q)
    assert torch.equal(cpu_kernels.rotary_(k.clone(), cos, sin).transpose(1, 2), want_k)


@needs_kernels
def test_rms_norm_matches_transformers_rms_norm():
    """Same formula and roundings; only the order of the sum of squares differs."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    generator = torch.Generator().manual_seed(4)
    norm = LlamaRMSNorm(576, eps=1e-5).to(torch.bfloat16)
    norm.weight.data = torch.randn(576, generator=generator).to(torch.bfloat16)
    x = (torch.randn(7, 3, 576, generator=generator) * 3).to(torch.bfloat16)
    got, want = cpu_kernels.rms_norm(x, norm.weight, norm.variance_epsilon), norm(x)
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    # one bfloat16 rounding step; the rounding hides the sums' order almost everywhere
    assert ((got.float() - want.float()).abs() <= want.float().abs() * 2**-7 + 1e-6).all()
    assert (got == want).float().mean() > 0.9
    with pytest.raises(ValueError, match="rms_norm takes bfloat16"):
        cpu_kernels.rms_norm(x.float(), norm.weight.float(), norm.variance_epsilon)
