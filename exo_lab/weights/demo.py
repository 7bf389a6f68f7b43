"""Small random-weight models with a real tokenizer, built offline and deterministically.

The ``demo`` model id resolves here, so every part of exo-lab (shards, cluster, API, notebooks)
runs on a machine with no network. Tests build even smaller models with :func:`build_random_model`.

A built folder looks exactly like a Hugging Face checkpoint: ``config.json``,
``generation_config.json``, sharded ``*.safetensors`` with ``model.safetensors.index.json``
and the tokenizer files, so it goes through the real loading path.
"""
from __future__ import annotations

import json
import logging
import pathlib
import shutil
import tempfile

from ..errors import ModelError
from ..weights import INDEX_FILE, SINGLE_FILE

logger = logging.getLogger(__name__)

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")

DEMO_MODEL_NAME = "demo-v1"   # bump the suffix whenever the demo's recipe changes

END_OF_TEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (END_OF_TEXT, IM_START, IM_END)   # ids 0, 1, 2 in this order

# A cap: the ~8 KB corpus runs out of merges first, at 1447 tokens (special tokens included).
TOKENIZER_VOCAB_SIZE = 1536

# ChatML, as Qwen models use it. A system message is optional.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# std of the normal init. The Hugging Face default (0.02) makes a tiny random model's logits
# nearly flat, so greedy decoding repeats one token forever; 0.2 gives varied output.
INIT_STD = 0.2

# Written last into a built folder: records the recipe, so a cached folder built with other
# settings is detected instead of silently reused.
BUILD_RECORD = "exo_lab_build.json"

DEMO_SETTINGS = dict(
    architecture="llama", num_layers=6, hidden_size=128, intermediate_size=384,
    num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
    max_position_embeddings=2048, seed=0, dtype="float32", max_shard_size="2MB",
)


def _corpus_text() -> str:
    # Next to this module (package data, see pyproject.toml), not a download.
    return (pathlib.Path(__file__).parents[1] / "data" / "corpus.txt").read_text(encoding="utf-8")


def _train_tokenizer():
    """Byte-level BPE trained on the embedded corpus; the same corpus gives the same merges
    (checked across processes, whose hash seeds differ)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Paragraphs as separate sequences; the order is fixed, so the merges are too.
    tokenizer.train_from_iterator(_corpus_text().split("\n\n"), trainer=trainer)
    return tokenizer


def build_tokenizer(path) -> None:
    """Write a real byte-level BPE tokenizer with a ChatML chat template into ``path``.

    Writes ``tokenizer.json``, ``tokenizer_config.json`` (and whatever else transformers'
    ``save_pretrained`` writes, e.g. the chat template). Special tokens: ``<|endoftext|>``
    (pad), ``<|im_start|>``, ``<|im_end|>`` (eos, ends an assistant turn). The same inputs
    give byte-identical files on every build.
    """
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_train_tokenizer(),
        eos_token=IM_END,
        pad_token=END_OF_TEXT,
        unk_token=None,
        bos_token=None,
        chat_template=CHAT_TEMPLATE,
        model_max_length=DEMO_SETTINGS["max_position_embeddings"],
        clean_up_tokenization_spaces=False,
    )
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(path))


def _special_token_ids() -> dict[str, int]:
    return {token: index for index, token in enumerate(SPECIAL_TOKENS)}


def _make_config(architecture: str, vocab_size: int, settings: dict):
    from transformers import AutoConfig

    ids = _special_token_ids()
    head_dim = settings["hidden_size"] // settings["num_attention_heads"]
    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=settings["hidden_size"],
        intermediate_size=settings["intermediate_size"],
        num_hidden_layers=settings["num_layers"],
        num_attention_heads=settings["num_attention_heads"],
        num_key_value_heads=settings["num_key_value_heads"],
        max_position_embeddings=settings["max_position_embeddings"],
        tie_word_embeddings=settings["tie_word_embeddings"],
        initializer_range=INIT_STD,
        bos_token_id=ids[END_OF_TEXT],
        eos_token_id=ids[IM_END],
        pad_token_id=ids[END_OF_TEXT],
    )
    if architecture == "qwen3":
        kwargs["head_dim"] = head_dim   # Qwen3Config defaults head_dim to 128, not hidden/heads
    return AutoConfig.for_model(architecture, **kwargs)


def _check_settings(architecture: str, settings: dict) -> None:
    if architecture not in ARCHITECTURES:
        raise ModelError(
            f"unknown architecture {architecture!r} for a random model; choose one of "
            f"{', '.join(ARCHITECTURES)}"
        )
    if settings["hidden_size"] % settings["num_attention_heads"]:
        raise ModelError(
            f"hidden_size {settings['hidden_size']} is not a multiple of num_attention_heads "
            f"{settings['num_attention_heads']}; pick sizes that divide"
        )
    if settings["num_attention_heads"] % settings["num_key_value_heads"]:
        raise ModelError(
            f"num_attention_heads {settings['num_attention_heads']} is not a multiple of "
            f"num_key_value_heads {settings['num_key_value_heads']}; pick sizes that divide"
        )


def _write_model(folder: pathlib.Path, settings: dict) -> None:
    """Build tokenizer, config and sharded random weights into ``folder`` (already created)."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    build_tokenizer(folder)
    vocab_size = settings["vocab_size"] or _tokenizer_vocab_size(folder)
    config = _make_config(settings["architecture"], vocab_size, settings)
    torch.manual_seed(settings["seed"])
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, settings["dtype"]))
    model.save_pretrained(str(folder), max_shard_size=settings["max_shard_size"])
    ids = _special_token_ids()
    GenerationConfig(
        bos_token_id=ids[END_OF_TEXT],
        eos_token_id=[ids[IM_END], ids[END_OF_TEXT]],
        pad_token_id=ids[END_OF_TEXT],
        do_sample=False,
    ).save_pretrained(str(folder))
    if not (folder / INDEX_FILE).exists():
        # One shard only: transformers then writes no index. Write one anyway, so every demo
        # folder goes through the same (sharded) loading path.
        _write_single_shard_index(folder)
    (folder / BUILD_RECORD).write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")


def _write_single_shard_index(folder: pathlib.Path) -> None:
    from safetensors import safe_open

    with safe_open(str(folder / SINGLE_FILE), framework="pt") as handle:
        names = sorted(handle.keys())
    total = (folder / SINGLE_FILE).stat().st_size
    index = {"metadata": {"total_size": total},
             "weight_map": {name: SINGLE_FILE for name in names}}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def _tokenizer_vocab_size(folder: pathlib.Path) -> int:
    from tokenizers import Tokenizer
    return Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab_size(with_added_tokens=True)


def _is_complete(folder: pathlib.Path) -> bool:
    """True when ``folder`` holds a finished build (the record is written last)."""
    return (folder / BUILD_RECORD).is_file()


def _check_cached(folder: pathlib.Path, settings: dict) -> None:
    recorded = json.loads((folder / BUILD_RECORD).read_text())
    if recorded != settings:
        changed = sorted(key for key in settings.keys() | recorded.keys()
                         if settings.get(key) != recorded.get(key))
        details = ", ".join(f"{k}: {recorded.get(k)!r} there, {settings.get(k)!r} asked" for k in changed)
        raise ModelError(
            f"{folder} already holds a random model built with other settings ({details}); "
            f"delete the folder or build into another path"
        )


def build_random_model(path, *, architecture="llama", num_layers=4, hidden_size=64,
                       intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                       vocab_size=None, tie_word_embeddings=False,
                       max_position_embeddings=2048, seed=0, dtype="float32",
                       max_shard_size="200KB") -> pathlib.Path:
    """Build a deterministic random-weight causal LM with a real tokenizer into ``path``.

    The folder gets ``config.json``, ``generation_config.json``, sharded safetensors with
    ``model.safetensors.index.json`` and the tokenizer (see :func:`build_tokenizer`).
    ``vocab_size`` defaults to the tokenizer's size. The same arguments give the same weights.

    Safe to call from several processes at once: each builds into a temporary folder next to
    ``path`` and renames it into place; when ``path`` already holds a finished build with the
    same settings it is returned as is.

    Raises:
        ModelError: unknown architecture, sizes that do not divide, or ``path`` exists but holds
            something else (a model built with other settings, or an unrelated folder).
    """
    settings = dict(
        architecture=architecture, num_layers=num_layers, hidden_size=hidden_size,
        intermediate_size=intermediate_size, num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads, vocab_size=vocab_size,
        tie_word_embeddings=tie_word_embeddings, max_position_embeddings=max_position_embeddings,
        seed=seed, dtype=dtype, max_shard_size=max_shard_size,
    )
    _check_settings(architecture, settings)
    target = pathlib.Path(path).expanduser().absolute()
    if _is_complete(target):
        _check_cached(target, settings)
        return target
    if target.exists() and any(target.iterdir()):
        raise ModelError(
            f"{target} exists and is not a finished exo-lab random model (no {BUILD_RECORD}); "
            f"delete it or build into another path"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.building-", dir=target.parent))
    staging.chmod(0o755)   # mkdtemp makes it private; a shared cache must stay readable
    try:
        logger.info("building random %s model (%d layers, hidden %d) into %s",
                    architecture, num_layers, hidden_size, target)
        _write_model(staging, settings)
        move_folder_into_place(staging, target, _is_complete)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _check_cached(target, settings)
    return target


from ..paths import cache_dir, move_folder_into_place  # noqa: E402  (cache_dir kept importable here)


def demo_model_dir() -> pathlib.Path:
    """The ``demo`` model's folder, built on first use into ``<cache>/models/demo-v1``.

    A 6-layer Llama (hidden 128, about 1.6 M parameters, float32) with random weights (seed 0)
    and the embedded tokenizer: deterministic, about 7 MB, builds in a second or two.
    """
    return build_random_model(cache_dir() / "models" / DEMO_MODEL_NAME, **DEMO_SETTINGS)
