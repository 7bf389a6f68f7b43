"""`exo-lab bench --compare`: per-token speed and quality of each stage dtype, against transformers
``generate`` and llama.cpp, in one run (issue 15's table).

One stream, greedy, the same prompt ids everywhere. Rows: exo-lab per dtype on each engine count,
transformers ``generate`` (float32 and bfloat16, one process), and, when the optional
``llama-cpp-python`` is installed (``pip install exo-lab[bench]``), llama.cpp on an F32 GGUF of
the same weights and on a quantized GGUF (for SmolLM2, its original Q4_1 file: the float32
folder exo-lab runs *is* that file dequantized, so all rows run the same weights). Quality per
exo-lab dtype: how many of the first ``--quality-tokens`` greedy tokens equal float32's, and the
perplexity of the first ``--ppl-tokens`` tokens of exo_lab/data/corpus.txt (teacher-forced
through a real stage, one position at a time, as decode runs).
"""
from __future__ import annotations

import logging
import math
import os
import pathlib
import statistics
import time

from .engine.probe import usable_cores

logger = logging.getLogger(__name__)

CORPUS = pathlib.Path(__file__).parent / "data" / "corpus.txt"


def run_compare(args, model: str, model_dir, tokenizer, prompt: list[int]) -> dict:
    """Every row of the comparison; see the module docstring."""
    from .bench_measure import SingleProcess

    rows, tokens_by_dtype = [], {}
    for dtype in args.dtype:
        for engines in args.engines:
            row, tokens = _exo_lab_row(model, dtype, engines, prompt, args)
            rows.append(row)
            tokens_by_dtype.setdefault(dtype, tokens)
    for dtype in ("float32", "bfloat16"):
        single = SingleProcess(model_dir, dtype)
        try:
            runs = [single.measure([prompt], args.new_tokens) for _ in range(args.rounds)]
        finally:
            single.close()
        rows.append({"runtime": f"transformers generate, {dtype}", "dtype": dtype, "engines": 1,
                     "decode_tokens_per_s": statistics.median(r["decode_tokens_per_s"] for r in runs)})
    rows += llama_cpp_rows(model_dir, prompt, args)
    reference = tokens_by_dtype.get("float32")
    quality = []
    for dtype in args.dtype:
        same = None if reference is None else _agreeing_prefix(tokens_by_dtype[dtype], reference)
        quality.append({"dtype": dtype, "greedy_agreement": same, "of_tokens": args.quality_tokens,
                        "perplexity": perplexity(model_dir, dtype, tokenizer, args.ppl_tokens)})
    return {"model": str(model_dir), "new_tokens": args.new_tokens, "rows": rows, "quality": quality}


def _exo_lab_row(model: str, dtype: str, engines: int, prompt: list[int], args) -> tuple[dict, list[int]]:
    from .bench_measure import measure_cluster
    from .cluster import Cluster

    with Cluster.local(engines=engines, max_cores=args.max_cores) as cluster:
        cluster.load(model, dtype=dtype, min_stages=engines, max_batch=1, progress=False)
        measure_cluster(cluster, [prompt], 2)                                  # warm-up
        quality = measure_cluster(cluster, [prompt], args.quality_tokens)["tokens"][0]
        runs = [measure_cluster(cluster, [prompt], args.new_tokens) for _ in range(args.rounds)]
    row = {"runtime": f"exo-lab, {dtype}", "dtype": dtype, "engines": engines,
           "decode_tokens_per_s": statistics.median(r["decode_tokens_per_s"] for r in runs)}
    logger.warning("%s on %d engine(s): %.1f tok/s", dtype, engines, row["decode_tokens_per_s"])
    return row, quality


def _agreeing_prefix(tokens: list[int], reference: list[int]) -> int:
    same = 0
    for a, b in zip(tokens, reference):
        if a != b:
            break
        same += 1
    return same


# ----------------------------------------------------------------------------- perplexity

def perplexity(model_dir, dtype: str, tokenizer, num_tokens: int) -> float:
    """exp(mean NLL) of the corpus's first ``num_tokens`` tokens, one position per step through
    one whole-model stage of ``dtype`` (the decode path, KV slots included)."""
    import torch

    from .control_types import ShardSpec
    from .weights.checkpoint import load_stage
    from .weights.resolve import read_model_config

    ids = tokenizer(CORPUS.read_text(), add_special_tokens=False)["input_ids"][:num_tokens + 1]
    layers = read_model_config(model_dir)["num_hidden_layers"]
    stage = load_stage(ShardSpec(str(model_dir), 0, layers, layers, dtype=dtype,
                                 max_context=len(ids) + 1, max_batch=1))
    nll = 0.0
    for position in range(len(ids) - 1):
        logits = stage.forward(torch.tensor([[ids[position]]]), [0], [position])   # (1, vocab)
        nll -= float(torch.log_softmax(logits[0], dim=-1)[ids[position + 1]])
    return math.exp(nll / (len(ids) - 1))


# ----------------------------------------------------------------------------- llama.cpp

def llama_cpp_rows(model_dir, prompt: list[int], args) -> list[dict]:
    """llama.cpp's decode tok/s on the F32 GGUF of the same weights and on the quantized GGUF,
    or nothing (with a note) when llama-cpp-python is not installed or no GGUF is known."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        logger.warning("llama-cpp-python is not installed (pip install 'exo-lab[bench]'): "
                       "no llama.cpp rows")
        return []
    quantized = _quantized_gguf(model_dir)
    if quantized is None:
        logger.warning("no GGUF of %s is known (only SmolLM2's): no llama.cpp rows", model_dir)
        return []
    f32 = quantized.parent / "model-f32.gguf"     # next to it: the model folder stays as built
    if not f32.is_file():
        write_f32_gguf(quantized, f32)
    threads = args.max_cores or usable_cores()
    rows = []
    for label, path in (("F32 GGUF", f32), (f"{_gguf_type(quantized)} GGUF", quantized)):
        speeds = [llama_cpp_decode(path, prompt, args.new_tokens, threads) for _ in range(args.rounds)]
        rows.append({"runtime": f"llama.cpp, {label}, {threads} threads", "dtype": label, "engines": 1,
                     "decode_tokens_per_s": statistics.median(speeds)})
    return rows


def _quantized_gguf(model_dir) -> pathlib.Path | None:
    from .weights import smollm2

    if not smollm2.smollm2_is_built():
        return None
    if pathlib.Path(model_dir).resolve() != smollm2.smollm2_model_dir(progress=False).resolve():
        return None
    return smollm2.fetch_gguf(pathlib.Path(model_dir).parent / "smollm2-gguf")


def _gguf_type(path: pathlib.Path) -> str:
    return "Q4_1" if "Q4_1" in path.name else path.stem.rsplit(".", 1)[-1]


def llama_cpp_decode(path: pathlib.Path, prompt: list[int], new_tokens: int, threads: int) -> float:
    """Greedy decode tok/s of llama.cpp on ``path`` after prefilling ``prompt``."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=len(prompt) + new_tokens + 8, n_threads=threads,
                n_threads_batch=threads, verbose=False)
    try:
        stamps = []
        for _ in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
            stamps.append(time.perf_counter())
            if len(stamps) >= new_tokens:
                break
        return (len(stamps) - 1) / (stamps[-1] - stamps[0])
    finally:
        llm.close()


def write_f32_gguf(source: pathlib.Path, dest: pathlib.Path) -> None:
    """``source`` with every tensor dequantized to F32 and its metadata copied (file type F32)."""
    import numpy as np
    from gguf import GGUFReader, GGUFValueType, GGUFWriter, LlamaFileType
    from gguf.quants import dequantize

    reader = GGUFReader(str(source))
    arch = reader.fields["general.architecture"].contents()
    from .paths import temp_name

    partial = temp_name(dest)
    writer = GGUFWriter(str(partial), arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", "general.file_type"):
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), kind, sub_type=sub)
    writer.add_file_type(LlamaFileType.ALL_F32)
    for tensor in reader.tensors:
        data = dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        writer.add_tensor(tensor.name, data.reshape(tuple(reversed([int(n) for n in tensor.shape]))))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(partial, dest)


def format_compare(report: dict) -> str:
    lines = [f"one stream, greedy, decode tok/s, {report['new_tokens']} new tokens ({report['model']})",
             f"{'runtime':<44} {'engines':>7} {'decode tok/s':>13}"]
    for r in report["rows"]:
        lines.append(f"{r['runtime']:<44} {r['engines']:>7} {r['decode_tokens_per_s']:>13.1f}")
    lines += ["", f"{'dtype':<10} {'greedy = float32':>17} {'perplexity':>11}   (corpus.txt)"]
    for q in report["quality"]:
        same = "-" if q["greedy_agreement"] is None else f"{q['greedy_agreement']}/{q['of_tokens']}"
        lines.append(f"{q['dtype']:<10} {same:>17} {q['perplexity']:>11.3f}")
    return "\n".join(lines)
