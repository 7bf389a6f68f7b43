"""exo_lab.bench_llama: llama.cpp always in a child process, so its crashes cannot take the bench
down.

The crash, timeout and missing-file tests need nothing. The others need llama-cpp-python (pip
install 'exo-lab[bench]'; pyproject.toml says how to build it) and SmolLM2's Q4_1 GGUF, fetched
once (about 93 MB) into the exo-lab cache ($EXO_LAB_CACHE, else ~/.cache/exo_lab) and found there
later; they are skipped without either. The quantize test also reuses the F32 GGUF that
`exo-lab bench --compare` keeps beside it (writing it takes about 5 s the first time).
"""
from __future__ import annotations

import collections
import importlib.util
import sys

import pytest

from exo_lab import bench_llama

HAVE_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
needs_llama_cpp = pytest.mark.skipif(not HAVE_LLAMA_CPP, reason="llama-cpp-python is not installed")

VOCAB = 49152               # SmolLM2's
PROMPT = [504]              # "The"
CRASH = ("import os, resource, signal; resource.setrlimit(resource.RLIMIT_CORE, (0, 0)); "
         "os.kill(os.getpid(), signal.SIGSEGV)")


@pytest.fixture(scope="module")
def gguf_dir():
    from exo_lab.paths import cache_dir

    return cache_dir() / "models" / "smollm2-gguf"     # where `exo-lab bench --compare` keeps them


@pytest.fixture(scope="module")
def q4_1(gguf_dir):
    """SmolLM2-135M-Instruct.Q4_1.gguf, from the exo-lab cache (fetched there once)."""
    from exo_lab.errors import ModelError
    from exo_lab.weights import smollm2

    try:
        return smollm2.fetch_gguf(gguf_dir)
    except ModelError as exc:
        pytest.skip(f"SmolLM2's GGUF is not in the cache and cannot be fetched: {exc}")


def _child(code: str):
    return lambda request_file: [sys.executable, "-c", code]


def test_a_crashing_child_raises_and_the_caller_goes_on(monkeypatch, tmp_path):
    monkeypatch.setattr(bench_llama, "_child_argv", _child(CRASH))
    model = tmp_path / "model.gguf"
    with pytest.raises(RuntimeError) as info:
        bench_llama.decode_speed(model, PROMPT, 4, 1)
    message = str(info.value)
    assert "killed by SIGSEGV" in message and "llama.cpp decode" in message and str(model) in message
    assert bench_llama.available() is not None         # the probe's child crashed too: a reason


def test_a_child_past_its_timeout_is_killed(monkeypatch, tmp_path):
    monkeypatch.setattr(bench_llama, "_child_argv", _child("import time; time.sleep(60)"))
    with pytest.raises(RuntimeError, match=r"did not finish in 0.5 s and was killed"):
        bench_llama.logits(tmp_path / "model.gguf", PROMPT, 1, timeout=0.5)


def test_a_missing_file_is_an_error_naming_it(tmp_path):
    missing = tmp_path / "nothing.gguf"
    with pytest.raises(RuntimeError, match=r"llama.cpp decode on .*nothing.gguf failed: "
                                           r"FileNotFoundError: no GGUF file .*nothing.gguf"):
        bench_llama.decode(missing, PROMPT, 4, 1)


@needs_llama_cpp
def test_logits_are_what_greedy_decode_picks(q4_1):
    assert bench_llama.available() is None
    picked = bench_llama.decode(q4_1, PROMPT, 8, 2)
    assert len(picked["tokens"]) == 8 and picked["tokens_per_s"] > 0
    ids = PROMPT + picked["tokens"][:-1]                 # teacher-forced on what decode chose
    scores = bench_llama.logits(q4_1, ids, 2)
    assert scores.shape == (8, VOCAB) and str(scores.dtype) == "float32"
    assert scores.argmax(axis=1).tolist() == picked["tokens"]


@needs_llama_cpp
def test_quantize_writes_q4_k_m(q4_1, gguf_dir, tmp_path):
    gguf = pytest.importorskip("gguf")
    from exo_lab.bench_speed import write_f32_gguf

    f32 = q4_1.with_name(q4_1.stem + ".F32.gguf")       # the bench's, reused
    if not f32.is_file():
        write_f32_gguf(q4_1, f32)
    dest = tmp_path / "SmolLM2-135M-Instruct.Q4_K_M.gguf"
    assert bench_llama.quantize(f32, dest, "Q4_K_M", threads=2) == dest
    types = collections.Counter(t.tensor_type.name for t in gguf.GGUFReader(str(dest)).tensors)
    assert types["Q4_K"] > 0 and types["Q6_K"] > 0, types
    assert sorted(p.name for p in tmp_path.iterdir()) == [dest.name]   # no temporary left
    assert len(bench_llama.decode(dest, PROMPT, 4, 2)["tokens"]) == 4

    with pytest.raises(RuntimeError, match="knows no file type 'Q9_X'"):
        bench_llama.quantize(f32, tmp_path / "bad.gguf", "Q9_X")
    assert sorted(p.name for p in tmp_path.iterdir()) == [dest.name]
