"""GGUF files as models: ``cluster.load("/models/llama-3-8b.Q4_K_M.gguf")``.

A GGUF model id is a ``.gguf`` file, a split file's first part (``...-00001-of-00003.gguf``), or
a folder holding exactly one model of them. It is used as it is: :func:`gguf_model_dir` writes,
once per file (keyed by its path, size and modification time), a small folder under
``<cache>/models/gguf-*`` with what the rest of exo-lab reads from any model folder
(``config.json``, the tokenizer with its chat template, ``generation_config.json``, all taken
from the file's metadata by transformers' GGUF support) and ``gguf.json``: for every weight, by
its Hugging Face name, the GGUF file, byte offset and length, GGUF type and shape. The weights
stay in the GGUF file; a stage reads exactly its tensors' byte ranges and repacks the quantized
blocks into the layouts exo-lab's kernels read (:mod:`exo_lab.model.quant4`), with no float32
step. The storage PC serves those byte ranges (:mod:`exo_lab.engine.fetch`).

Tensor types: F32, F16, BF16, Q8_0, Q4_0, Q4_1, and Q4_K, Q6_K, Q5_0 (what Q4_K_M files are
made of: llama.cpp falls back to Q5_0 for matrices whose rows are not a multiple of 256).
Architectures: the Llama family transformers reads from GGUF (llama, mistral's llama files,
qwen2, qwen3). A stage of a GGUF model runs dtype ``gguf``: each matrix in its file's format,
activations in bfloat16; ``float32``/``bfloat16`` dequantize the blocks instead (exactly their
values), ``int8``/``int4`` requantize them.
"""
from __future__ import annotations

import hashlib
import json
import logging
import pathlib
import re
import shutil
import tempfile

import numpy as np

from ..errors import ModelError
from ..paths import cache_dir, move_folder_into_place

logger = logging.getLogger(__name__)

TABLE_FILE = "gguf.json"
TABLE_FORMAT = 1
SUPPORTED_ARCHITECTURES = {"llama": "LLAMA", "qwen2": "QWEN2", "qwen3": "QWEN3"}
PERMUTED_ARCHITECTURES = ("llama",)          # llama.cpp's converter permutes q/k rows for rotary
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q4_K", "Q6_K")
_SPLIT = re.compile(r"^(?P<stem>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.gguf$")


def is_gguf_id(model_id: str) -> bool:
    """Whether ``model_id`` names a GGUF file, or a folder with one and no config.json."""
    path = pathlib.Path(model_id).expanduser()
    if path.suffix.lower() == ".gguf":
        return True
    return path.is_dir() and not (path / "config.json").is_file() and any(path.glob("*.gguf"))


def is_gguf_folder(folder) -> bool:
    """Whether ``folder`` is a GGUF model's folder (it holds ``gguf.json``)."""
    return (pathlib.Path(folder) / TABLE_FILE).is_file()


def gguf_parts(model_id: str) -> list[pathlib.Path]:
    """The GGUF file(s) ``model_id`` names, every part of a split file in order."""
    path = pathlib.Path(model_id).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.glob("*.gguf") if not (m := _SPLIT.match(p.name)) or m["index"] == "00001")
        if len(files) != 1:
            raise ModelError(f"{path} holds {len(files)} GGUF models ({', '.join(p.name for p in files) or 'none'}); "
                             f"name the .gguf file itself as the model")
        path = files[0]
    if not path.is_file():
        raise ModelError(f"no such GGUF file: {path.absolute()}; check the path")
    split = _SPLIT.match(path.name)
    if not split:
        return [path]
    count = int(split["count"])
    parts = [path.with_name(f"{split['stem']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
    missing = [p.name for p in parts if not p.is_file()]
    if missing:
        raise ModelError(f"{path.name} is part of a {count}-file GGUF, but {', '.join(missing)} is not beside it; "
                         f"put every part in {path.parent}")
    return parts


def gguf_model_dir(model_id: str) -> pathlib.Path:
    """The folder exo-lab reads a GGUF model through (built once; see the module docstring)."""
    parts = gguf_parts(model_id)
    stats = [p.stat() for p in parts]
    key = hashlib.sha256("\0".join(f"{p.resolve()}:{s.st_size}:{s.st_mtime_ns}" for p, s in zip(parts, stats))
                         .encode()).hexdigest()[:12]
    target = cache_dir() / "models" / f"gguf-{_SPLIT.sub(lambda m: m['stem'], parts[0].name).removesuffix('.gguf')}-{key}"
    if is_gguf_folder(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.building-", dir=target.parent))
    try:
        _build(parts, staging / "model")
        move_folder_into_place(staging / "model", target, is_gguf_folder)
    except OSError as exc:
        raise ModelError(f"cannot write the GGUF model's folder {target}: {exc}; check free space and "
                         f"permissions, or set EXO_LAB_CACHE to another folder") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


# ----------------------------------------------------------------------------- building the folder

def _reader(path: pathlib.Path):
    try:
        from gguf import GGUFReader
    except ImportError:
        raise ModelError("loading a GGUF model needs the 'gguf' package: pip install gguf") from None
    try:
        return GGUFReader(str(path))
    except Exception as exc:   # gguf raises ValueError, struct.error, IndexError on a bad file
        raise ModelError(f"{path} is not a readable GGUF file ({type(exc).__name__}: {exc}); it is truncated "
                         f"or not GGUF: download it again") from None


def _build(parts: list[pathlib.Path], folder: pathlib.Path) -> None:
    folder.mkdir(parents=True)
    readers = [_reader(p) for p in parts]
    fields = readers[0].fields
    arch = str(fields["general.architecture"].contents()) if "general.architecture" in fields else "?"
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelError(f"{parts[0].name} holds a {arch!r} model; exo-lab runs GGUF files of "
                         f"{', '.join(SUPPORTED_ARCHITECTURES)} (the Llama family)")
    config = write_config(parts[0], folder, readers)
    tokenizer = write_tokenizer(parts[0], folder, config.max_position_embeddings)
    write_generation_config(folder, tokenizer)
    table = _tensor_table(parts, readers, config, arch)
    (folder / TABLE_FILE).write_text(json.dumps(
        {"format": TABLE_FORMAT, "architecture": arch,
         "files": {p.name: {"path": str(p.resolve()), "size": p.stat().st_size} for p in parts},
         "tensors": table}, indent=1) + "\n")


def write_config(path: pathlib.Path, folder: pathlib.Path, readers):
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    except Exception as exc:
        raise ModelError(f"transformers cannot read the configuration of {path.name} ({exc}); exo-lab "
                         f"runs GGUF files of the Llama family") from None
    for key in ("quantization_config", "_model_name_or_path"):
        config.__dict__.pop(key, None)
    config.architectures = [f"{type(config).__name__.removesuffix('Config')}ForCausalLM"]
    config.dtype = "float32"
    config.rms_norm_eps = float(str(np.float32(config.rms_norm_eps)))
    names = {t.name for r in readers for t in r.tensors}
    config.tie_word_embeddings = "output.weight" not in names
    config.save_pretrained(str(folder))
    return config


def write_tokenizer(path: pathlib.Path, folder: pathlib.Path, max_length: int):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    except Exception as exc:
        raise ModelError(f"transformers cannot build the tokenizer of {path.name} ({exc}); its "
                         f"tokenizer.ggml.* metadata is missing or of a kind transformers does not read") from None
    tokenizer.model_max_length = max_length
    tokenizer.save_pretrained(str(folder), save_jinja_files=False)
    settings_path = folder / "tokenizer_config.json"
    settings = json.loads(settings_path.read_text(encoding="utf-8"))
    for key in ("is_local", "local_files_only", "gguf_file", "name_or_path"):
        settings.pop(key, None)
    settings_path.write_text(json.dumps(settings, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return tokenizer


END_OF_TEXT = "<|endoftext|>"


def write_generation_config(folder: pathlib.Path, tokenizer) -> None:
    """Generation stops at the end-of-turn token and, where the vocabulary has it, ``<|endoftext|>``."""
    from transformers import GenerationConfig

    eos = [tokenizer.eos_token_id]
    end = tokenizer.convert_tokens_to_ids(END_OF_TEXT)
    if isinstance(end, int) and end != tokenizer.unk_token_id:
        eos.append(end)
    GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=list(dict.fromkeys(eos)),
                     pad_token_id=tokenizer.pad_token_id).save_pretrained(str(folder))


def hf_names(config, arch: str) -> dict[str, str]:
    """GGUF tensor name -> Hugging Face parameter name, from gguf's own name table."""
    import gguf
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        names = AutoModelForCausalLM.from_config(config).state_dict().keys()
    table = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, SUPPORTED_ARCHITECTURES[arch]), config.num_hidden_layers)
    mapping = {}
    for name in names:
        base, _, suffix = name.rpartition(".")
        mapped = table.get_name(base)
        if mapped is not None:
            mapping[f"{mapped}.{suffix}"] = name
    return mapping


def _tensor_table(parts, readers, config, arch: str) -> dict[str, dict]:
    names = hf_names(config, arch)
    table = {}
    for path, reader in zip(parts, readers):
        for tensor in reader.tensors:
            kind = tensor.tensor_type.name
            if tensor.name not in names:
                if tensor.name.startswith("rope_freqs"):
                    continue            # recomputed from the config (rope_scaling)
                raise ModelError(f"{path.name} holds tensor {tensor.name!r}, which the {arch} layout has no "
                                 f"place for; exo-lab runs plain {arch} GGUF files")
            if kind not in SUPPORTED_TYPES:
                raise ModelError(f"{path.name}: tensor {tensor.name} is {kind}; exo-lab reads GGUF tensors of "
                                 f"{', '.join(SUPPORTED_TYPES)} (Q4_K_M, Q4_0, Q4_1, Q8_0 and float files): "
                                 f"use one of those quantizations of this model")
            shape = [int(n) for n in reversed(list(tensor.shape))]
            unpermute = 0
            if arch in PERMUTED_ARCHITECTURES and ".attn_q." in tensor.name:
                unpermute = config.num_attention_heads
            elif arch in PERMUTED_ARCHITECTURES and ".attn_k." in tensor.name:
                unpermute = config.num_key_value_heads
            table[names[tensor.name]] = {"gguf_name": tensor.name, "file": path.name, "type": kind,
                                         "shape": shape, "offset": int(tensor.data_offset),
                                         "nbytes": int(tensor.n_bytes), "unpermute": unpermute}
    missing = sorted(set(names.values()) - set(table) - ({"lm_head.weight"} if config.tie_word_embeddings else set()))
    if missing:
        raise ModelError(f"{parts[0].name} lacks {len(missing)} weight(s), e.g. {missing[0]}; the file is "
                         f"incomplete: download it again")
    return table


# ----------------------------------------------------------------------------- reading tensors

def read_table(folder) -> dict:
    """``gguf.json`` of a GGUF model's folder."""
    path = pathlib.Path(folder) / TABLE_FILE
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read {path} ({exc}); delete {path.parent} and load the model again") from None
    if table.get("format") != TABLE_FORMAT:
        raise ModelError(f"{path} has format {table.get('format')!r}, not {TABLE_FORMAT}; delete {path.parent} "
                         f"and load the model again")
    return table


def tensor_table(folder) -> dict[str, dict] | None:
    """A GGUF model folder's tensor table (HF name -> entry), or None for any other folder."""
    return read_table(folder)["tensors"] if is_gguf_folder(folder) else None


def tensor_path(folder, table: dict, entry: dict) -> pathlib.Path:
    """Where ``entry``'s bytes are: a fetched tensor's own file in the folder, else its GGUF file."""
    local = pathlib.Path(folder) / entry["file"]
    if local.is_file():
        return local
    return pathlib.Path(table["files"][entry["file"]]["path"])


def read_raw(folder, table: dict, entry: dict) -> np.ndarray:
    """A tensor's bytes (uint8), read from its file's byte range."""
    path = tensor_path(folder, table, entry)
    try:
        with open(path, "rb") as handle:
            handle.seek(entry["offset"])
            raw = handle.read(entry["nbytes"])
    except OSError as exc:
        raise ModelError(f"cannot read tensor {entry['gguf_name']} from {path}: {exc}; the GGUF file moved or "
                         f"is unreadable: load the model by its new path") from None
    if len(raw) != entry["nbytes"]:
        raise ModelError(f"{path} ends before tensor {entry['gguf_name']} does ({len(raw)} of {entry['nbytes']} "
                         f"bytes at {entry['offset']}); the file is truncated: download it again")
    return np.frombuffer(raw, dtype=np.uint8)


def unpermute_index(rows: int, heads: int):
    """The row order that undoes llama.cpp's rotary permutation of q/k rows (per head, the two
    interleaved halves back to [first half, second half])."""
    import torch

    return torch.arange(rows).reshape(heads, rows // heads // 2, 2).transpose(1, 2).reshape(rows)


def load_tensor(folder, table: dict, entry: dict, dtype):
    """One tensor: a :class:`~exo_lab.model.quant4.QuantWeight` for a quantized matrix (its
    blocks repacked), else a torch tensor of ``dtype``; q/k rows back in Hugging Face's order."""
    import torch

    from ..model.quant4 import repack

    raw = read_raw(folder, table, entry)
    kind, shape = entry["type"], tuple(entry["shape"])
    if kind in ("F32", "F16", "BF16"):
        array = raw.view({"F32": np.float32, "F16": np.float16, "BF16": np.uint16}[kind]).reshape(shape)
        tensor = torch.from_numpy(array.copy())
        if kind == "BF16":
            tensor = tensor.view(torch.bfloat16)
        weight = tensor.to(dtype)
    else:
        weight = repack(kind, raw, shape)
    if entry.get("unpermute"):
        index = unpermute_index(shape[0], entry["unpermute"])
        weight = weight.rows(index) if not isinstance(weight, torch.Tensor) else weight[index].contiguous()
    return weight


def dense(weight, dtype):
    """``weight`` as a dense torch tensor of ``dtype`` (dequantized when quantized)."""
    import torch

    return weight.to(dtype) if isinstance(weight, torch.Tensor) else weight.dequantize(dtype)
