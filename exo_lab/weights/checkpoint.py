"""Reading a stage's weights from a model folder: ``config.json`` and exactly the stage's tensors
from its safetensors files (step 3 of :mod:`exo_lab.model.shard`'s recipe), then the stage built
and made ready (int8 quantization, packed bfloat16, the lean layers, KV slots).

The model code (:mod:`exo_lab.model`) knows no files; this module knows no sockets.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig

from ..control_types import ShardSpec
from ..errors import ModelError
from ..model.lean import lean_layers
from ..model.packed import can_pack, pack_linears
from ..model.quant import quantize_linears
from ..model.quant4 import QuantEmbedding, QuantLinear, quantize_linears_int4
from ..model.shard import TORCH_DTYPES, Stage
from . import INDEX_FILE, SINGLE_FILE
from .gguf import dense, is_gguf_folder, load_tensor, read_table

logger = logging.getLogger(__name__)


def stage_skeleton(spec: ShardSpec) -> Stage:
    """The stage ``spec`` describes with no weights (meta tensors) and no KV slots: what the
    model's config and transformers classes cost before any weight is read."""
    return Stage(spec, read_hf_config(spec))


def load_stage(spec: ShardSpec, ensure_tensors=None) -> Stage:
    """Build the stage ``spec`` describes and load its weights, and only its weights.

    Reads ``config.json`` and the safetensors weight map in ``spec.model_dir``, opens only the
    files that hold this stage's tensors and reads only those tensors, converted to
    ``spec.dtype`` on ``spec.device``. No process that calls this ever holds the whole model.
    ``ensure_tensors(names)``, when given, is called first with the checkpoint names the stage
    reads (a PC without the model fetches them: :func:`exo_lab.engine.fetch.open_model`).

    Raises:
        ModelError: the folder, config or a weight file is missing or corrupt, a tensor is
            absent, the spec does not match the config, or the architecture is unsupported.
    """
    config = read_hf_config(spec)
    _check_device(spec)
    stage = Stage(spec, config)
    if is_gguf_folder(spec.model_dir):
        _load_gguf(stage, ensure_tensors)
    else:
        _load_safetensors(stage, ensure_tensors)
    make_ready(stage)
    own_weights(stage)
    logger.info("loaded layers [%d, %d) of %s: %.1f MB on %s", spec.start_layer, spec.stop_layer,
                spec.model_dir, stage.parameter_bytes() / 1e6, spec.device)
    return stage


def _load_safetensors(stage: Stage, ensure_tensors) -> None:
    spec = stage.spec
    weight_map = _read_weight_map(Path(spec.model_dir))
    wanted = _resolve_names(stage.checkpoint_names(), weight_map, spec)
    if ensure_tensors is not None:   # a fetched folder: bring exactly these tensors first
        ensure_tensors(list(wanted.values()))
    by_checkpoint_name = _read_tensors(wanted.values(), weight_map, spec)
    stage.load_weights({local: by_checkpoint_name[name] for local, name in wanted.items()})


def _load_gguf(stage: Stage, ensure_tensors) -> None:
    """A GGUF model's stage: exactly its tensors' byte ranges; with dtype gguf the quantized
    matrices keep their blocks (:class:`QuantLinear`; a quantized embedding
    :class:`QuantEmbedding`, whose tied head shares it), held so on a GPU too (there each product
    dequantizes its matrix to 16-bit on the fly: the memory the plan counted, no CUDA kernel of
    exo-lab's own yet); with another dtype every tensor is dequantized to the stage's dtype."""
    spec = stage.spec
    table = read_table(spec.model_dir)
    wanted = _resolve_names(stage.checkpoint_names(), table["tensors"], spec)
    if ensure_tensors is not None:   # a fetched folder: its gguf.json already names each tensor's own file
        ensure_tensors(list(dict.fromkeys(wanted.values())))
    loaded = {name: load_tensor(spec.model_dir, table, table["tensors"][name], stage.dtype)
              for name in dict.fromkeys(wanted.values())}
    keep_blocks = spec.dtype == "gguf"
    tensors, modules = {}, {}
    for local, name in wanted.items():
        weight = loaded[name]
        if keep_blocks and not isinstance(weight, torch.Tensor):
            modules[local.removesuffix(".weight")] = weight.to(stage.device)
        else:
            tensors[local] = dense(weight, stage.dtype).to(stage.device)
    for path, weight in modules.items():
        parent_path, _, attribute = path.rpartition(".")
        parent = stage.get_submodule(parent_path) if parent_path else stage
        if path == "embed_tokens":
            new = QuantEmbedding(weight, stage.dtype)
        elif path == "lm_head" and isinstance(stage.embed_tokens, QuantEmbedding) \
                and wanted["lm_head.weight"] == wanted.get("embed_tokens.weight"):
            new = stage.embed_tokens.head()          # tied: the embedding's own parameters
        else:
            new = QuantLinear(weight, tensors.pop(f"{path}.bias", None), stage.dtype)
        setattr(parent, attribute, new)
    stage.load_weights(tensors, strict=False)


def own_weights(stage: Stage) -> None:
    """Copy into the engine's own memory every weight still a view of a safetensors file's mmap
    (those of the file's own dtype that no step of make_ready rebuilt; found in /proc/self/maps,
    so on Linux only: elsewhere they stay mapped).
    Mapped file pages are memory the kernel may drop and read back: on a PC short of memory the
    engine would reread its weights from disk at every step (thrash) instead of its shortage
    showing. Copied after make_ready, so the products it fuses or packs (most of a layer's
    weights, new memory already) are never copied twice; a weight shared by two modules (a tied
    head) stays shared. Then the allocator's free memory goes back to the OS."""
    from ..model.shard import release_free_memory

    mapped = _mapped_safetensors()
    if not mapped:
        return
    copies: dict[int, torch.nn.Parameter] = {}
    for module in stage.modules():
        for name, tensor in list(module._parameters.items()):
            if tensor is None or tensor.device.type != "cpu" or not any(a <= tensor.data_ptr() < b for a, b in mapped):
                continue
            key = tensor.data_ptr()
            if key not in copies:
                copies[key] = torch.nn.Parameter(tensor.detach().clone(), requires_grad=False)
            module._parameters[name] = copies[key]
    release_free_memory()


def _mapped_safetensors() -> list[tuple[int, int]]:
    """The address ranges where this process maps .safetensors files (empty off Linux)."""
    try:
        with open("/proc/self/maps") as maps:
            lines = [line.split() for line in maps]
    except OSError:
        return []
    return [tuple(int(x, 16) for x in parts[0].split("-")) for parts in lines
            if len(parts) >= 6 and parts[5].endswith(".safetensors")]


def make_ready(stage: Stage) -> Stage:
    """A stage whose weights are in place, made ready to run: int8 quantization, packed
    bfloat16, the lean layers, its KV slots."""
    spec = stage.spec
    if spec.dtype == "int8":   # weight-only: quantized from the loaded bfloat16 weights
        quantize_linears(stage)
    elif spec.dtype == "int4":   # group-wise, as Q4_1 (quant4); on a GPU dequantized per product
        quantize_linears_int4(stage)
    if stage.dtype == torch.bfloat16 and can_pack(stage.device):   # same results, less time
        pack_linears(stage, layers=spec.dtype == "bfloat16")
    stage.lean = lean_layers(stage.layers, stage.stage_config)
    stage.allocate_kv()
    return stage


# ----------------------------------------------------------------------------- config

def read_hf_config(spec: ShardSpec):
    folder = Path(spec.model_dir)
    if not (folder / "config.json").is_file():
        raise ModelError(f"{folder / 'config.json'} does not exist; point model_dir at a folder "
                         f"holding a Hugging Face model (config.json + safetensors)")
    try:
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:
        raise ModelError(f"cannot read {folder / 'config.json'}: {exc}; fix or re-download the "
                         f"model") from exc
    if config.num_hidden_layers != spec.num_layers:
        raise ModelError(
            f"the shard spec says {spec.num_layers} layers but {folder / 'config.json'} has "
            f"num_hidden_layers={config.num_hidden_layers}; plan the stages from this model's config"
        )
    if getattr(config, "is_heterogeneous", False):
        raise ModelError(f"{folder} has per-layer config overrides (per_layer_config), which "
                         f"exo-lab's stages do not support; use a homogeneous model")
    return config


def _check_device(spec: ShardSpec) -> None:
    device = torch.device(spec.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"device {spec.device!r} asked for, but this machine's torch sees no CUDA "
                         f"GPU; use device='cpu' or install a CUDA build of torch")


# ----------------------------------------------------------------------------- weights

def _read_weight_map(folder: Path) -> dict[str, Path]:
    """Checkpoint tensor name -> the safetensors file that holds it."""
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ModelError(f"{index} is not a valid safetensors index ({exc}); re-download the "
                             f"model or re-save it with save_pretrained") from exc
        return {name: folder / file for name, file in weight_map.items()}
    single = folder / SINGLE_FILE
    if single.is_file():
        return {name: single for name in _file_keys(single)}
    raise ModelError(f"{folder} holds neither {INDEX_FILE} nor {SINGLE_FILE}; exo-lab loads "
                     f"safetensors checkpoints only (re-save the model with save_pretrained)")


def _file_keys(path: Path) -> list[str]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            return list(handle.keys())
    except Exception as exc:
        raise ModelError(f"{path} is not a readable safetensors file ({exc}); it is truncated or "
                         f"corrupt: re-download the model") from exc


def _resolve_names(candidates: dict[str, list[str]], weight_map: dict[str, Path],
                   spec: ShardSpec) -> dict[str, str]:
    """Stage-local name -> the checkpoint name to read (the first candidate the map has)."""
    resolved = {}
    for local, names in candidates.items():
        found = next((name for name in names if name in weight_map), None)
        if found is None:
            raise ModelError(
                f"tensor {names[0]} (layers [{spec.start_layer}, {spec.stop_layer})) is not in the "
                f"weight map of {spec.model_dir}; the checkpoint does not match its config.json "
                f"(num_hidden_layers={spec.num_layers}): re-download or re-save the model"
            )
        resolved[local] = found
    return resolved


def _read_tensors(names, weight_map: dict[str, Path], spec: ShardSpec) -> dict[str, torch.Tensor]:
    """Read each checkpoint name once, opening each file that holds any of them once."""
    by_file: dict[Path, list[str]] = {}
    for name in dict.fromkeys(names):                   # a tied head may repeat a name
        by_file.setdefault(weight_map[name], []).append(name)
    tensors = {}
    for path, file_names in by_file.items():
        tensors.update(_read_file(path, file_names, spec))
    return tensors


def _read_file(path: Path, names: list[str], spec: ShardSpec) -> dict[str, torch.Tensor]:
    dtype = TORCH_DTYPES[spec.dtype]
    if not path.is_file():
        raise ModelError(f"{path} does not exist but holds tensor {names[0]} (and {len(names) - 1} "
                         f"more) for layers [{spec.start_layer}, {spec.stop_layer}); re-download "
                         f"the model so every file its index names is present")
    name = names[0]
    try:
        with safe_open(str(path), framework="pt", device=str(spec.device)) as handle:
            present = set(handle.keys())
            tensors = {}
            for name in names:
                if name not in present:
                    raise ModelError(f"{path} does not contain tensor {name}, though the index "
                                     f"says it does; re-download the model")
                tensors[name] = handle.get_tensor(name).to(dtype)   # the file's dtype: a view of its mmap
            return tensors
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(f"cannot read {path} (needed for tensor {name}): {exc}; the file is "
                         f"truncated or corrupt: re-download the model") from exc
