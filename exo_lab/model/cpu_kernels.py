"""exo-lab's own CPU kernels (``cpu_kernels.c``), built on the PC that runs them.

``gemv_int8(x, q, scales)`` and ``gemv_bf16(x, w)`` compute ``x @ W.T`` for up to
:data:`MAX_ROWS` rows of bfloat16 activations, streaming int8 (per-row scales) or bfloat16
weights at close to the memory's speed; the C file says how and what was measured.
``rms_norm(x, weight, eps)`` (bfloat16) and ``rotary_(x, cos, sin)`` (float32, bfloat16) do in
one call what transformers' Llama-family code does in 8 and 16 small torch calls, rounding as it
rounds.
:func:`available` says whether they can run here; when they cannot, the stage keeps torch's own
kernels (same results up to summation order, slower at decode).

How they get here: the first call compiles ``cpu_kernels.c`` with the C compiler (``$CC``, else
``cc``; flags ``-O3 -march=native -fopenmp``, so each PC builds for its own CPU: AVX-512 or
AVX2) into ``<cache>/kernels/`` (:func:`exo_lab.paths.cache_dir`), once per source, compiler
and CPU, in about a second; ctypes loads it. They are left out, with one log line saying why
and how to get them, when:
- ``EXO_LAB_KERNELS=0`` is set (to compare against torch's kernels: ``exo-lab bench``);
- the PC runs Windows: they are not built there (no ``cc``, and torch's Windows wheels run on
  another OpenMP than the GNU one whose threads the kernels share);
- there is no C compiler, or the CPU has neither AVX-512 nor AVX2 with FMA;
- torch does not run on GNU OpenMP (libgomp): the kernels' threads must be torch's threads,
  or the two pools would fight over the cores (torch's Linux wheels use libgomp).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from .. import envvars
from ..paths import cache_dir, temp_name

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernels.c")
MAX_ROWS = 16          # rows of activations the kernels take (beyond: prefill, torch's GEMMs win)
ENV_SWITCH = envvars.KERNELS
_BUILD_TIMEOUT_S = 120


def available() -> bool:
    """Whether exo-lab's CPU kernels run in this process (builds them on first call)."""
    return _library() is not None


def gemv_int8(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``x (M, K) bf16 @ (q (N, K) int8 * scales (N,) bf16).T`` -> (M, N) bf16, M <= MAX_ROWS.
    Call only when :func:`available`."""
    return _call(_library().exo_gemv_int8, x, q, scales)


def gemv_bf16(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x (M, K) bf16 @ w (N, K) bf16 .T`` -> (M, N) bf16, M <= MAX_ROWS. Call only when
    :func:`available`."""
    return _call(_library().exo_gemv_bf16, x, w, None)


def gemm_quant(x: torch.Tensor, weight) -> torch.Tensor:
    """``x (M, K) bf16 @ W.T`` -> (M, N) bf16 for a group-quantized ``weight``
    (:class:`exo_lab.model.quant4.QuantWeight`, q4 or q8 layout), any M: decode and prefill.
    Call only when :func:`available`."""
    rows, inner = x.shape
    out, width = weight.shape
    if width != inner or inner % 32 or not x.is_contiguous() or x.dtype != torch.bfloat16 or rows < 1:
        raise ValueError(f"gemm_quant takes contiguous bfloat16 rows of {width} values (a multiple of "
                         f"32), got {tuple(x.shape)} {x.dtype}")
    y = torch.empty(rows, out, dtype=torch.bfloat16)
    library = _library()
    if weight.layout == "q4":
        status = library.exo_gemm_q4(x.data_ptr(), rows, inner, weight.codes.data_ptr(), weight.scales.data_ptr(),
                                     weight.mins.data_ptr(), out, y.data_ptr())
    else:
        status = library.exo_gemm_q8(x.data_ptr(), rows, inner, weight.codes.data_ptr(), weight.scales.data_ptr(),
                                     weight.zero, out, y.data_ptr())
    if status != 0:
        raise MemoryError(f"exo-lab's CPU kernel failed (status {status}) on {tuple(x.shape)} x {weight.shape}")
    return y


def dequantize(weight) -> torch.Tensor:
    """The bfloat16 matrix a :class:`exo_lab.model.quant4.QuantWeight` stands for, as its own
    ``dequantize(torch.bfloat16)`` computes it, in one call. Call only when :func:`available`."""
    out = torch.empty(weight.shape, dtype=torch.bfloat16)
    status = _library().exo_dequantize(4 if weight.layout == "q4" else 8, weight.codes.data_ptr(), weight.scales.data_ptr(),
                                       weight.mins.data_ptr() if weight.mins is not None else None, weight.zero,
                                       weight.shape[0], weight.shape[1], out.data_ptr())
    if status != 0:
        raise ValueError(f"cannot dequantize a {weight.layout} matrix of shape {weight.shape}")
    return out


class Matrix(ctypes.Structure):
    """A group-quantized matrix as ``exo_decode_layer`` takes it (pointers into its tensors)."""
    _fields_ = [("layout", ctypes.c_int64), ("codes", ctypes.c_void_p), ("scales", ctypes.c_void_p),
                ("mins", ctypes.c_void_p), ("zero", ctypes.c_int64), ("n", ctypes.c_int64), ("k", ctypes.c_int64)]


def decode_layer_function():
    """``exo_decode_layer`` (one decode step of a quantized Llama-family layer; cpu_kernels.c)."""
    return _library().exo_decode_layer


def integer_products() -> str:
    """How the quantized kernels multiply here: "AVX512_VNNI" or "AVX2"."""
    return "AVX512_VNNI" if _library().exo_gemm_vnni() else "AVX2"


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm over the last dim of contiguous bfloat16 ``x`` and ``weight``
    (float32 stages keep transformers' norm: see exo_lab.model.lean). Call only when
    :func:`available`."""
    if x.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16:
        raise ValueError(f"rms_norm takes bfloat16, got {x.dtype} and {weight.dtype}")
    y = torch.empty_like(x)
    _library().exo_rms_norm_bf16(x.data_ptr(), x.numel() // x.shape[-1], x.shape[-1], weight.data_ptr(), eps, y.data_ptr())
    return y


def rotary_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate contiguous ``x`` (B, T, heads, dim) in place by ``cos``/``sin`` (B, T, dim) as
    transformers' ``apply_rotary_pos_emb`` does; returns ``x``. Call only when :func:`available`."""
    function = _library().exo_rotary_bf16 if x.dtype == torch.bfloat16 else _library().exo_rotary_f32
    function(x.data_ptr(), x.shape[0] * x.shape[1], x.shape[2], x.shape[3], cos.data_ptr(), sin.data_ptr())
    return x


def takes(*tensors: torch.Tensor) -> bool:
    """Whether ``rotary_`` takes these tensors (``rms_norm`` too, when bfloat16): contiguous, on
    the CPU, all float32 or all bfloat16 (and the kernels run here)."""
    dtype = tensors[0].dtype
    return (dtype in (torch.float32, torch.bfloat16) and available()
            and all(t.dtype == dtype and t.device.type == "cpu" and t.is_contiguous() for t in tensors))


def team_size() -> int:
    """The number of threads a kernel call from this thread uses (torch's, on this thread)."""
    return int(_library().exo_gemv_threads())


def _call(function, x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor | None) -> torch.Tensor:
    rows, inner = x.shape
    if not (0 < rows <= MAX_ROWS) or w.shape[1] != inner or not (x.is_contiguous() and w.is_contiguous()):
        raise ValueError(f"gemv takes 1-{MAX_ROWS} contiguous rows of {w.shape[1]} values, got "
                         f"{tuple(x.shape)}")
    y = torch.empty(rows, w.shape[0], dtype=torch.bfloat16)
    status = function(x.data_ptr(), rows, inner, w.data_ptr(),
                      None if scales is None else scales.data_ptr(), w.shape[0], y.data_ptr())
    if status != 0:
        raise MemoryError(f"exo-lab's CPU kernel failed (status {status}) on {tuple(x.shape)} x {tuple(w.shape)}")
    return y


@functools.cache
def _library() -> ctypes.CDLL | None:
    reason = _unavailable_reason()
    if reason is None:
        try:
            library = _load(_build())
        except (OSError, subprocess.SubprocessError, RuntimeError) as error:
            reason = f"building {SOURCE.name} failed: {error}"
        else:
            if library.exo_gemv_isa() == 0:
                reason = "the CPU has neither AVX-512 nor AVX2 with FMA"
            else:
                logger.info("exo-lab CPU kernels: %s (%d-bit vectors)", library._name,
                            library.exo_gemv_isa())
                return library
    logger.warning("exo-lab's CPU kernels are off (%s); decode uses torch's slower kernels", reason)
    return None


def _unavailable_reason() -> str | None:
    if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "off", "false", "no"):
        return f"{ENV_SWITCH}={os.environ[ENV_SWITCH]}"
    if sys.platform == "win32":
        return ("they are not built on Windows (torch's Windows wheels do not run on GNU OpenMP); "
                "a Linux PC with gcc or clang has the fast path")
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"they are written for x86-64 CPUs, this is {platform.machine()}"
    if _compiler() is None:
        return (f"no C compiler ({os.environ.get('CC') or 'cc'}) was found: install gcc or clang (e.g. "
                f"`sudo apt install gcc`), or set CC, for the fast path")
    if not _torch_uses_libgomp():
        return "torch does not run on GNU OpenMP (libgomp) here; torch's Linux wheels from PyPI do"
    return None


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CC") or "cc")


def _torch_uses_libgomp() -> bool:
    try:
        return "libgomp" in Path("/proc/self/maps").read_text()
    except OSError:
        return False


def build_for(march: str) -> ctypes.CDLL:
    """The kernels compiled for ``-march=march`` (e.g. "haswell": the AVX2 code without
    AVX-512 or VNNI), loaded: how tests check each vector path on one CPU."""
    return _load(_build(march))


def _build(march: str = "native") -> Path:
    """The shared library for this source, compiler and CPU, compiled once into the cache."""
    compiler = _compiler()
    flags = ["-O3", f"-march={march}", "-fopenmp", "-shared", "-fPIC", "-std=c11"]
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), compiler, version, *flags, _cpu_flags()])
                         .encode()).hexdigest()[:16]
    target = cache_dir() / "kernels" / f"cpu_kernels-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    built = temp_name(target)            # engines on one PC may build at once
    try:
        result = subprocess.run([compiler, *flags, str(SOURCE), "-o", str(built), "-lm"],
                                capture_output=True, text=True, timeout=_BUILD_TIMEOUT_S)
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} exited {result.returncode}: {result.stderr.strip()[-400:]}")
        os.replace(built, target)
    finally:
        built.unlink(missing_ok=True)
    return target


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def _load(path: Path) -> ctypes.CDLL:
    library = ctypes.CDLL(str(path))
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    for name in ("exo_gemv_int8", "exo_gemv_bf16"):
        function = getattr(library, name, None)
        if function is not None:
            function.argtypes = [pointer, size, size, pointer, pointer, size, pointer]
            function.restype = ctypes.c_int
    if hasattr(library, "exo_rms_norm_bf16"):
        library.exo_rms_norm_bf16.argtypes = [pointer, size, size, pointer, ctypes.c_float, pointer]
        library.exo_rms_norm_bf16.restype = ctypes.c_int
    for name in ("exo_rotary_bf16", "exo_rotary_f32"):
        function = getattr(library, name, None)
        if function is not None:
            function.argtypes = [pointer, size, size, size, pointer, pointer]
            function.restype = ctypes.c_int
    if hasattr(library, "exo_gemm_q4"):
        library.exo_gemm_q4.argtypes = [pointer, size, size, pointer, pointer, pointer, size, pointer]
        library.exo_gemm_q8.argtypes = [pointer, size, size, pointer, pointer, size, size, pointer]
        library.exo_gemm_q4.restype = library.exo_gemm_q8.restype = ctypes.c_int
        library.exo_gemm_vnni.restype = ctypes.c_int
    if hasattr(library, "exo_dequantize"):
        library.exo_dequantize.argtypes = [size, pointer, pointer, pointer, size, size, size, pointer]
        library.exo_dequantize.restype = ctypes.c_int
    if hasattr(library, "exo_decode_layer"):
        matrix = ctypes.POINTER(Matrix)
        library.exo_decode_layer.argtypes = [pointer, size, size, pointer, pointer, ctypes.c_float, matrix, size,
                                             matrix, matrix, size, matrix, pointer, pointer, pointer, pointer, size,
                                             size, size, size, ctypes.c_float, pointer, pointer]
        library.exo_decode_layer.restype = ctypes.c_int
    library.exo_gemv_isa.restype = ctypes.c_int
    library.exo_gemv_threads.restype = ctypes.c_int
    return library
