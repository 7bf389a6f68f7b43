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
    hf_dir = transformers_folder(model_dir)
    for dtype in ("float32", "bfloat16") if hf_dir is not None else ():
        single = SingleProcess(hf_dir, dtype)
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
        logits, ids = corpus_logits(model_dir, dtype, tokenizer, args.ppl_tokens)
        quality.append({"dtype": dtype, "greedy_agreement": same, "of_tokens": args.quality_tokens,
                        "perplexity": perplexity_of(logits, ids[1:]),
                        **llama_cpp_agreement(model_dir, logits, ids, args)})
    return {"model": str(model_dir), "new_tokens": args.new_tokens, "rows": rows, "quality": quality}


def transformers_folder(model_dir):
    """The folder transformers' rows load: the model's own, or for SmolLM2's GGUF the float32
    folder built from the same file (its blocks dequantized); None for another GGUF model."""
    from .weights import smollm2
    from .weights.gguf import is_gguf_folder

    if not is_gguf_folder(model_dir):
        return model_dir
    if pathlib.Path(model_dir).resolve() == smollm2.smollm2_gguf_dir().resolve():
        return smollm2.smollm2_model_dir(progress=False)
    logger.warning("%s is a GGUF model: no transformers rows", model_dir)
    return None


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

def corpus_logits(model_dir, dtype: str, tokenizer, num_tokens: int):
    """(logits (num_tokens, vocab) float32, the num_tokens + 1 token ids) of the corpus's first
    tokens, one position per step through one whole-model stage of ``dtype`` (the decode path,
    KV slots included): row i predicts ids[i + 1]."""
    from .control_types import ShardSpec
    from .weights.checkpoint import load_stage
    from .weights.resolve import read_model_config

    ids = tokenizer(CORPUS.read_text(), add_special_tokens=False)["input_ids"][:num_tokens + 1]
    layers = read_model_config(model_dir)["num_hidden_layers"]
    stage = load_stage(ShardSpec(str(model_dir), 0, layers, layers, dtype=dtype,
                                 max_context=len(ids) + 1, max_batch=1))
    return teacher_forced_logits(stage, ids), ids


def teacher_forced_logits(stage, ids: list[int]):
    """A whole-model ``stage``'s float32 logits after each of ``ids[:-1]``, fed one position per
    step in KV slot 0 (the decode path): row i predicts ids[i + 1]."""
    import torch

    return torch.stack([stage.forward(torch.tensor([[token]]), [0], [position])[0].float()
                        for position, token in enumerate(ids[:-1])])


def perplexity_of(logits, targets: list[int]) -> float:
    """exp(mean NLL) of ``targets`` under ``logits`` (one row per target)."""
    import torch

    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return math.exp(-float(logprobs[torch.arange(len(targets)), torch.tensor(targets)].mean()))


def llama_cpp_agreement(model_dir, logits, ids: list[int], args) -> dict:
    """exo-lab's corpus logits against llama.cpp's on the same GGUF file and token ids: per-token
    top-1 agreement, mean KL(llama.cpp || exo-lab), and llama.cpp's own perplexity; {} without
    llama.cpp or a GGUF file of this model."""
    import torch

    from . import bench_llama

    path = _quantized_gguf(model_dir)
    if path is None or bench_llama.available() is not None:
        return {}
    try:
        reference = torch.from_numpy(bench_llama.logits(path, ids[:-1], args.max_cores or usable_cores()))
    except RuntimeError as exc:
        logger.warning("no llama.cpp quality figures: %s", exc)
        return {}
    theirs, ours = torch.log_softmax(reference.float(), -1), torch.log_softmax(logits.float(), -1)
    return {"llama_cpp_top1": float((theirs.argmax(-1) == ours.argmax(-1)).float().mean()),
            "llama_cpp_kl": float((theirs.exp() * (theirs - ours)).sum(-1).mean()),
            "llama_cpp_perplexity": perplexity_of(reference, ids[1:]), "llama_cpp_file": path.name}


# ----------------------------------------------------------------------------- llama.cpp

def llama_cpp_rows(model_dir, prompt: list[int], args) -> list[dict]:
    """llama.cpp's decode tok/s on the F32 GGUF of the same weights and on the quantized GGUF,
    or nothing (with a note) when llama-cpp-python does not import or no GGUF is known. llama.cpp
    runs in child processes (exo_lab.bench_llama): a file on which it fails or crashes gets a
    warning and no row, and the bench goes on."""
    from . import bench_llama

    reason = bench_llama.available()
    if reason is not None:
        logger.warning("llama.cpp is not usable (%s): no llama.cpp rows", reason)
        return []
    quantized = _quantized_gguf(model_dir)
    if quantized is None:
        logger.warning("no GGUF of %s is known (only SmolLM2's): no llama.cpp rows", model_dir)
        return []
    f32 = quantized.with_name(quantized.stem + ".F32.gguf")    # beside it, once
    if not f32.is_file():
        write_f32_gguf(quantized, f32)
    threads = args.max_cores or usable_cores()
    rows = []
    for label, path in (("F32 GGUF", f32), (f"{_gguf_type(quantized)} GGUF", quantized)):
        try:
            speeds = [llama_cpp_decode(path, prompt, args.new_tokens, threads) for _ in range(args.rounds)]
        except RuntimeError as exc:
            logger.warning("no llama.cpp row for the %s: %s", label, exc)
            continue
        rows.append({"runtime": f"llama.cpp, {label}, {threads} threads", "dtype": label, "engines": 1,
                     "decode_tokens_per_s": statistics.median(speeds)})
    return rows


def _quantized_gguf(model_dir) -> pathlib.Path | None:
    """The quantized GGUF file of this model: a GGUF model's own file, or for SmolLM2's float32
    folder the Q4_1 file it was built from; None for any other model."""
    from .weights import smollm2
    from .weights.gguf import is_gguf_folder, read_table

    if is_gguf_folder(model_dir):
        files = read_table(model_dir)["files"]
        return pathlib.Path(next(iter(files.values()))["path"]) if len(files) == 1 else None
    if not smollm2.smollm2_is_built():
        return None
    if pathlib.Path(model_dir).resolve() != smollm2.smollm2_model_dir(progress=False).resolve():
        return None
    return smollm2.smollm2_gguf_path()


def _gguf_type(path: pathlib.Path) -> str:
    return path.stem.rsplit(".", 1)[-1]


def llama_cpp_decode(path: pathlib.Path, prompt: list[int], new_tokens: int, threads: int) -> float:
    """Greedy decode tok/s of llama.cpp on ``path`` after prefilling ``prompt``, in a child
    process (exo_lab.bench_llama.decode_speed); RuntimeError when that child fails or crashes."""
    from . import bench_llama

    return bench_llama.decode_speed(path, prompt, new_tokens, threads)


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
    lines += ["", f"{'dtype':<10} {'greedy = float32':>17} {'perplexity':>11} {'top-1 = llama.cpp':>18} "
                  f"{'KL vs llama.cpp':>16} {'llama.cpp ppl':>14}   (corpus.txt)"]
    for q in report["quality"]:
        same = "-" if q["greedy_agreement"] is None else f"{q['greedy_agreement']}/{q['of_tokens']}"
        top1 = f"{q['llama_cpp_top1']:.1%}" if "llama_cpp_top1" in q else "-"
        kl = f"{q['llama_cpp_kl']:.4f}" if "llama_cpp_kl" in q else "-"
        ppl = f"{q['llama_cpp_perplexity']:.3f}" if "llama_cpp_perplexity" in q else "-"
        lines.append(f"{q['dtype']:<10} {same:>17} {q['perplexity']:>11.3f} {top1:>18} {kl:>16} {ppl:>14}")
    return "\n".join(lines)
