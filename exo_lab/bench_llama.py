"""llama.cpp (llama-cpp-python) for `exo-lab bench --compare`, always in a child process.

llama.cpp is native code: when it crashes (a build made with ``-DGGML_NATIVE=ON`` on a host with
AMX segfaults in ``llama_decode`` on Q4_1 files) it takes its whole process with it. So nothing
here imports ``llama_cpp`` in the caller's process: each call starts
``python -m exo_lab.bench_llama REQUEST.json``, waits for it with a timeout, and turns a nonzero
exit, a signal or a timeout into a :class:`RuntimeError` that names the GGUF file; the bench (and
the torch in its process) goes on. Results come back through files in a temporary folder (JSON;
logits as a ``.npy`` file), never through stdout, which llama.cpp's own logging may share.

Parent side: :func:`available`, :func:`probe`, :func:`decode`, :func:`decode_speed`,
:func:`logits`, :func:`quantize`. Child side: :func:`main`.

Build llama-cpp-python for the CPUs the bench compares on, not natively (pyproject.toml's
``bench`` extra says how).
"""
from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time

PROBE_TIMEOUT_S = 120.0
RUN_TIMEOUT_S = 900.0           # a decode or a logits pass: loading the model included
QUANTIZE_TIMEOUT_S = 3600.0
STDERR_LINES = 8                # lines of the child's stderr quoted in an error


# ----------------------------------------------------------------------------- parent side

def probe(timeout: float = PROBE_TIMEOUT_S) -> dict:
    """``{"version": ..., "system_info": ...}`` of the llama_cpp a child imports.

    Raises:
        RuntimeError: the child cannot import llama_cpp, crashes or times out.
    """
    return _run("probe", None, {}, timeout)


def available(timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """None when ``llama_cpp`` imports in a child process, else why not (one line)."""
    try:
        probe(timeout)
    except RuntimeError as exc:
        return str(exc)
    return None


def decode(path, prompt_ids: list[int], new_tokens: int, threads: int,
           timeout: float = RUN_TIMEOUT_S) -> dict:
    """Greedy decode with llama.cpp on ``path``: prefill ``prompt_ids``, then ``new_tokens``
    tokens. Returns ``{"tokens": [...], "tokens_per_s": float}``; tok/s counts from the first new
    token to the last (decode only, prefill not included).

    Raises:
        ValueError: an empty prompt or fewer than 2 new tokens.
        RuntimeError: the child failed (exit status, signal or timeout in the message).
    """
    if not prompt_ids or new_tokens < 2:
        raise ValueError("decode needs a prompt and at least 2 new tokens")
    return _run("decode", path, {"prompt": [int(t) for t in prompt_ids], "new_tokens": int(new_tokens),
                                 "threads": int(threads)}, timeout)


def decode_speed(path, prompt_ids: list[int], new_tokens: int, threads: int,
                 timeout: float = RUN_TIMEOUT_S) -> float:
    """Greedy decode tok/s of llama.cpp on ``path`` after prefilling ``prompt_ids`` (see
    :func:`decode`)."""
    return decode(path, prompt_ids, new_tokens, threads, timeout)["tokens_per_s"]


def logits(path, ids: list[int], threads: int, timeout: float = RUN_TIMEOUT_S):
    """llama.cpp's logits at every position of ``ids`` (teacher-forced, one pass), as a float32
    numpy array of shape ``(len(ids), vocab)``: row ``i`` predicts the token after ``ids[i]``.

    Raises:
        ValueError: ``ids`` is empty.
        RuntimeError: the child failed.
    """
    import numpy as np

    if not ids:
        raise ValueError("logits needs at least one token id")
    with tempfile.TemporaryDirectory(prefix="exo-lab-llama-") as work:
        out = pathlib.Path(work) / "logits.npy"
        _run("logits", path, {"ids": [int(t) for t in ids], "threads": int(threads), "out": str(out)},
             timeout, work=pathlib.Path(work))
        return np.load(out).astype(np.float32, copy=False)


def quantize(source_gguf, dest_gguf, ftype: str = "Q4_K_M", threads: int = 0,
             timeout: float = QUANTIZE_TIMEOUT_S) -> pathlib.Path:
    """Write ``dest_gguf``: ``source_gguf`` quantized by llama.cpp to ``ftype`` (a
    ``LLAMA_FTYPE_MOSTLY_*`` name: "Q4_K_M", "Q8_0", ...), whole or not at all (a temporary name
    beside it, then a rename). ``threads`` 0: llama.cpp's default. Returns ``dest_gguf``.

    Raises:
        RuntimeError: the child failed, or llama.cpp refused (an unknown ``ftype`` included).
    """
    from .paths import temp_name

    dest = pathlib.Path(dest_gguf)
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = temp_name(dest)
    try:
        _run("quantize", source_gguf, {"dest": str(partial), "ftype": str(ftype), "threads": int(threads)},
             timeout)
        os.replace(partial, dest)
    finally:
        partial.unlink(missing_ok=True)
    return dest


def _child_argv(request_file: pathlib.Path) -> list[str]:
    return [sys.executable, "-m", "exo_lab.bench_llama", str(request_file)]


def _run(op: str, path, request: dict, timeout: float | None, work: pathlib.Path | None = None) -> dict:
    """Run ``op`` in a child; its result dict, or RuntimeError saying how the child failed."""
    if work is None:
        with tempfile.TemporaryDirectory(prefix="exo-lab-llama-") as folder:
            return _run(op, path, request, timeout, pathlib.Path(folder))
    what = f"llama.cpp {op}" + (f" on {path}" if path is not None else "")
    result_file = work / "result.json"
    request_file = work / "request.json"
    request = {**request, "op": op, "result": str(result_file)}
    if path is not None:
        request["path"] = str(pathlib.Path(path).resolve())
    request_file.write_text(json.dumps(request))
    try:
        done = subprocess.run(_child_argv(request_file), capture_output=True, text=True, errors="replace",
                              timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"{what}: the child process did not finish in {timeout:g} s and was "
                           f"killed{_tail(exc.stderr)}") from None
    result = _read_result(result_file)
    if done.returncode < 0:
        raise RuntimeError(f"{what}: the child process was killed by {_signal_name(-done.returncode)} "
                           f"(a crash, most likely in llama.cpp; this process goes on){_tail(done.stderr)}")
    if done.returncode != 0:
        if result and "error" in result:
            raise RuntimeError(f"{what} failed: {result['error']}{_tail(done.stderr)}")
        raise RuntimeError(f"{what}: the child process exited with status {done.returncode}"
                           f"{_tail(done.stderr)}")
    if result is None or "error" in result:
        detail = result["error"] if result else "the child process wrote no result"
        raise RuntimeError(f"{what} failed: {detail}{_tail(done.stderr)}")
    return result


def _read_result(result_file: pathlib.Path) -> dict | None:
    try:
        return json.loads(result_file.read_text())
    except (OSError, ValueError):
        return None


def _signal_name(number: int) -> str:
    try:
        return f"{signal.Signals(number).name} (signal {number})"
    except ValueError:
        return f"signal {number}"


def _tail(stderr) -> str:
    if isinstance(stderr, bytes):
        stderr = stderr.decode(errors="replace")
    lines = [line.rstrip() for line in (stderr or "").splitlines() if line.strip()]
    if not lines:
        return ""
    return "; its stderr ends:\n  " + "\n  ".join(lines[-STDERR_LINES:])


# ----------------------------------------------------------------------------- child side

def main(argv: list[str] | None = None) -> int:
    """Child entry: ``python -m exo_lab.bench_llama REQUEST.json``. Runs the request's ``op``
    and writes its result (or ``{"error": ...}``) as JSON to the request's ``result`` file.
    Exit status 0 on success, 1 on an error llama-cpp-python reported; a crash in llama.cpp
    ends the process by its signal (faulthandler prints the Python stack to stderr)."""
    import faulthandler

    faulthandler.enable()
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m exo_lab.bench_llama REQUEST.json", file=sys.stderr)
        return 2
    request = json.loads(pathlib.Path(argv[0]).read_text())
    try:
        result = _OPS[request["op"]](request)
        status = 0
    except Exception as exc:            # noqa: BLE001 - reported to the parent, which raises
        result, status = {"error": _describe(exc)}, 1
    _write_json(pathlib.Path(request["result"]), result)
    return status


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ImportError):
        return (f"llama-cpp-python does not import ({exc}); install it with "
                f"pip install 'exo-lab[bench]' (pyproject.toml says how to build it)")
    return f"{type(exc).__name__}: {exc}"


def _write_json(path: pathlib.Path, data: dict) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(data))
    os.replace(partial, path)


def _model_file(request: dict) -> str:
    path = pathlib.Path(request["path"])
    if not path.is_file():
        raise FileNotFoundError(f"no GGUF file {path}")
    return str(path)


def _op_probe(request: dict) -> dict:
    import llama_cpp

    return {"version": llama_cpp.__version__,
            "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip()}


def _op_decode(request: dict) -> dict:
    path = _model_file(request)
    from llama_cpp import Llama

    prompt, new_tokens, threads = request["prompt"], request["new_tokens"], request["threads"]
    llm = Llama(model_path=path, n_ctx=len(prompt) + new_tokens + 8, n_threads=threads,
                n_threads_batch=threads, verbose=False)
    try:
        stamps, tokens = [], []
        for token in llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
            stamps.append(time.perf_counter())
            tokens.append(int(token))
            if len(stamps) >= new_tokens:
                break
        return {"tokens": tokens, "tokens_per_s": (len(stamps) - 1) / (stamps[-1] - stamps[0])}
    finally:
        llm.close()


def _op_logits(request: dict) -> dict:
    path = _model_file(request)
    import numpy as np
    from llama_cpp import Llama

    ids, threads = request["ids"], request["threads"]
    llm = Llama(model_path=path, n_ctx=len(ids) + 8, n_batch=min(len(ids), 512),
                logits_all=True, n_threads=threads, n_threads_batch=threads, verbose=False)
    try:
        llm.eval(ids)
        scores = np.ascontiguousarray(llm.scores[:len(ids)], dtype=np.float32)
    finally:
        llm.close()
    np.save(request["out"], scores)
    return {"shape": list(scores.shape)}


def _op_quantize(request: dict) -> dict:
    import ctypes

    import llama_cpp

    name = request["ftype"].upper()
    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{name}", None)
    if ftype is None:
        raise ValueError(f"llama.cpp knows no file type {request['ftype']!r} (LLAMA_FTYPE_MOSTLY_{name})")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = request["threads"]
    started = time.perf_counter()
    status = llama_cpp.llama_model_quantize(_model_file(request).encode(), request["dest"].encode(),
                                            ctypes.byref(params))
    if status != 0:
        raise RuntimeError(f"llama_model_quantize returned {status}")
    return {"seconds": time.perf_counter() - started}


_OPS = {"probe": _op_probe, "decode": _op_decode, "logits": _op_logits, "quantize": _op_quantize}


if __name__ == "__main__":
    sys.exit(main())
