"""Model-id resolution (demo, local folders, the Hugging Face cache) and reading config.json."""
from __future__ import annotations

import json
import os
import shutil

import pytest

from exo_lab.errors import ModelError
from exo_lab.weights.resolve import read_model_config, resolve_model

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "models")
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _copy(folder, tmp_path, *, drop=()):
    """A copy of a model folder without the files named in ``drop`` (glob patterns)."""
    target = tmp_path / "copy"
    shutil.copytree(folder, target)
    for pattern in drop:
        for path in target.glob(pattern):
            path.unlink()
    return target


def _hub_cache(cache, repo_id, source, *, only=None):
    """Lay out ``source``'s files like huggingface_hub's cache: blobs, a snapshot of symlinks, refs/main."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for path in sorted(source.iterdir()):
        if only is not None and path.name not in only:
            continue
        blob = repo / "blobs" / f"blob-{path.name}"
        shutil.copyfile(path, blob)
        (snapshot / path.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


def test_demo_id_is_the_cached_demo_model(tmp_path, monkeypatch):
    monkeypatch.setenv("EXO_LAB_CACHE", str(tmp_path))
    folder = resolve_model("demo")
    assert folder == tmp_path / "models" / "demo-v1"
    assert read_model_config(folder)["model_type"] == "llama"


def test_local_folder_absolute_relative_and_home(tiny_model_dir, tmp_path, monkeypatch):
    folder = tiny_model_dir()
    assert resolve_model(str(folder)) == folder
    monkeypatch.chdir(folder.parent)
    assert resolve_model(folder.name) == folder
    assert resolve_model(f"./{folder.name}") == folder
    monkeypatch.setenv("HOME", str(folder.parent))
    assert resolve_model(f"~/{folder.name}") == folder


def test_config_only_folder_is_enough_without_weights():
    folder = resolve_model(os.path.join(EXAMPLES, "llama-3.1-70b"), need_weights=False)
    assert folder.name == "llama-3.1-70b"
    with pytest.raises(ModelError, match=r"llama-3.1-70b has no \*\.safetensors weights"):
        resolve_model(os.path.join(EXAMPLES, "llama-3.1-70b"))


@pytest.mark.parametrize("drop, message", [
    (["config.json"], r"has no config\.json"),
    (["*.safetensors"], r"has no \*\.safetensors weights"),
    (["model.safetensors.index.json"], r"holds \d+ safetensors files but no model\.safetensors\.index\.json"),
    (["model-00002-of-*.safetensors"], r"misses 1 weight file\(s\) named in model\.safetensors\.index\.json: model-00002-of-"),
    (["tokenizer.json"], r"has no tokenizer \(none of tokenizer\.json"),
])
def test_incomplete_local_folder_names_folder_and_file(tiny_model_dir, tmp_path, drop, message):
    folder = _copy(tiny_model_dir(), tmp_path, drop=drop)
    with pytest.raises(ModelError, match=message) as info:
        resolve_model(str(folder))
    assert str(folder) in str(info.value)


def test_pytorch_bin_weights_get_a_conversion_hint(tiny_model_dir, tmp_path):
    folder = _copy(tiny_model_dir(), tmp_path, drop=["*.safetensors", "model.safetensors.index.json"])
    (folder / "pytorch_model.bin").write_bytes(b"\0")
    with pytest.raises(ModelError, match=r"holds pytorch_model\.bin: exo-lab loads safetensors only"):
        resolve_model(str(folder))


def test_a_file_is_not_a_model_folder(tiny_model_dir):
    with pytest.raises(ModelError, match="is a file, not a model folder"):
        resolve_model(str(tiny_model_dir() / "config.json"))


@pytest.mark.parametrize("model_id", ["./no-such-model", "/no/such/model", "~/no-such-model", "a/b/c"])
def test_missing_path_like_id_is_no_such_folder(model_id):
    with pytest.raises(ModelError, match="no such folder"):
        resolve_model(model_id)


@pytest.mark.parametrize("model_id", ["", "bad id!", "org/na me"])
def test_malformed_id_is_an_error(model_id, tmp_path):
    with pytest.raises(ModelError, match="model id must be|neither 'demo'|no such folder"):
        resolve_model(model_id, cache_dir=tmp_path)


def test_hub_id_not_in_cache_says_how_to_fetch_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelError) as info:
        resolve_model("Qwen/Qwen2.5-0.5B-Instruct")
    message = str(info.value)
    assert "'Qwen/Qwen2.5-0.5B-Instruct' is not in the Hugging Face cache at" in message
    assert str(tmp_path / "hub") in message
    assert "hf download Qwen/Qwen2.5-0.5B-Instruct" in message and "HF_HOME" in message
    assert "never downloads" in message


def test_hub_id_resolves_through_the_cache_from_env(tiny_model_dir, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    snapshot = _hub_cache(tmp_path / "hub", "acme/tiny-llama", tiny_model_dir())
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    folder = resolve_model("acme/tiny-llama")
    assert folder == snapshot
    assert AutoModelForCausalLM.from_pretrained(folder).config.num_hidden_layers == 4


def test_hub_cache_through_hf_home_and_explicit_cache_dir(tiny_model_dir, tmp_path, monkeypatch):
    snapshot = _hub_cache(tmp_path / "home" / "hub", "acme/tiny", tiny_model_dir())
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert resolve_model("acme/tiny") == snapshot
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty"))
    with pytest.raises(ModelError, match="not in the Hugging Face cache"):
        resolve_model("acme/tiny")
    assert resolve_model("acme/tiny", cache_dir=tmp_path / "home" / "hub") == snapshot


def test_hub_cache_with_config_only(tiny_model_dir, tmp_path):
    snapshot = _hub_cache(tmp_path, "acme/tiny", tiny_model_dir(), only={"config.json"})
    assert resolve_model("acme/tiny", need_weights=False, cache_dir=tmp_path) == snapshot
    with pytest.raises(ModelError, match=r"'acme/tiny' is only partly in the cache.*no \*\.safetensors"
                                         r".*hf download acme/tiny"):
        resolve_model("acme/tiny", cache_dir=tmp_path)


def test_read_model_config_returns_the_dict():
    config = read_model_config(os.path.join(EXAMPLES, "qwen2.5-0.5b"))
    assert (config["model_type"], config["hidden_size"], config["tie_word_embeddings"]) == ("qwen2", 896, True)


@pytest.mark.parametrize("text, message", [
    ('{"model_type": "llama",', r"config\.json is not valid JSON"),
    ("[1, 2]", r"config\.json must hold a JSON object"),
    ('{"model_type": "llama", "hidden_size": 64}', r"config\.json has no 'num_hidden_layers'"),
    ('{"model_type": "gpt2", "n_layer": 12, "n_embd": 768}',
     r"config\.json has no 'num_hidden_layers' \(model_type 'gpt2' does not follow"),
    ('{"model_type": "llava", "text_config": {}}', r"nests a 'text_config'"),
])
def test_malformed_config_names_file_and_problem(tmp_path, text, message):
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ModelError, match=message) as info:
        read_model_config(tmp_path)
    assert str(tmp_path / "config.json") in str(info.value)


def test_config_values_must_be_positive_integers(tmp_path):
    config = json.loads(open(os.path.join(EXAMPLES, "qwen2.5-0.5b", "config.json")).read())
    for key, bad in [("hidden_size", "896"), ("num_hidden_layers", 0), ("vocab_size", True)]:
        (tmp_path / "config.json").write_text(json.dumps({**config, key: bad}))
        with pytest.raises(ModelError, match=f"'{key}' must be a positive integer, got {bad!r}"):
            read_model_config(tmp_path / "config.json")


def test_missing_config_file(tmp_path):
    with pytest.raises(ModelError, match=r"config\.json does not exist"):
        read_model_config(tmp_path)
