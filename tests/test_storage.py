"""The storage role on loopback: the file service, and a fetch of exactly one stage's tensors
(verified, resumed, cached, repaired), loaded into a stage that matches one built from disk."""
from __future__ import annotations

import json
import shutil
import socket
import urllib.error
import urllib.request

import pytest
import torch

from exo_lab.config import config_from_dict
from exo_lab.coordinator.loop import LoopThread
from exo_lab.coordinator.service import PeerService
from exo_lab.engine import fetch
from exo_lab.model.shard import ShardSpec, load_stage

SECRET = b"storage-test-secret"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from exo_lab.model.demo import build_random_model

    return build_random_model(tmp_path_factory.mktemp("storage") / "model", num_layers=4,
                              max_shard_size="100KB")


@pytest.fixture(scope="module")
def storage(tmp_path_factory):
    """A file service on loopback (its manifest cache in its own EXO_LAB_CACHE)."""
    port = free_port()
    config = config_from_dict({"cluster_name": "storage-test", "network": {"service_port": port},
                               "devices": [{"hostname": "a", "roles": ["coordinator", "storage", "compute"]}]})
    loop = LoopThread()
    service = loop.run(PeerService(config, SECRET, join=None, storage=True, host="127.0.0.1").start())
    yield f"http://127.0.0.1:{port}", service
    loop.run(service.close())
    loop.stop()


@pytest.fixture
def client(storage, tmp_path, monkeypatch):
    monkeypatch.setenv("EXO_LAB_CACHE", str(tmp_path / "cache"))
    made = fetch.StorageClient(storage[0], SECRET)
    yield made
    made.close()


class _Asked(Exception):
    pass


def stage_names(folder, start, stop, num_layers=4):
    """The checkpoint names a stage reads (what load_stage asks ensure_tensors for)."""
    def ask(names):
        raise _Asked(names)

    with pytest.raises(_Asked) as asked:
        load_stage(ShardSpec(str(folder), start, stop, num_layers), ensure_tensors=ask)
    return asked.value.args[0]


def test_requests_without_the_secret_are_refused(storage, model):
    url = f"{storage[0]}{fetch.PREFIX}/manifest?model={model}"
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(url, timeout=10)
    assert caught.value.code == 403
    uri = url[len(storage[0]):]
    wrong = urllib.request.Request(url, headers={fetch.AUTH_HEADER: fetch.auth_header(b"other", "GET", uri)})
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(wrong, timeout=10)
    assert caught.value.code == 403
    good = urllib.request.Request(url, headers={fetch.AUTH_HEADER: fetch.auth_header(SECRET, "GET", uri)})
    with urllib.request.urlopen(good, timeout=10) as response:
        assert "config.json" in json.load(response)["files"]
    with pytest.raises(urllib.error.HTTPError) as caught:   # the same header again: a replay
        urllib.request.urlopen(good, timeout=10)
    assert caught.value.code == 403


def test_fetch_brings_exactly_the_stage_tensors_and_loads_the_same_stage(client, model):
    model_id = str(model)
    folder = fetch.fetch_model_files(model_id, client)
    assert (folder / "config.json").read_bytes() == (model / "config.json").read_bytes()
    assert (folder / "tokenizer.json").read_bytes() == (model / "tokenizer.json").read_bytes()
    small = client.bytes_fetched
    names = stage_names(folder, 2, 4)
    fetched = fetch.fetch_tensors(model_id, folder, client, names)
    reference = load_stage(ShardSpec(str(model), 2, 4, 4))
    # exactly the stage's tensors: its parameter bytes (float32 on disk as in memory)
    assert fetched == reference.parameter_bytes()
    assert small < 0.5 * fetched
    stage = load_stage(ShardSpec(str(folder), 2, 4, 4), ensure_tensors=lambda n: fetch.fetch_tensors(model_id, folder, client, n))
    expected = reference.state_dict()
    assert all(torch.equal(tensor, expected[name]) for name, tensor in stage.state_dict().items())
    # the next start fetches nothing
    assert fetch.fetch_tensors(model_id, folder, client, names) == 0
    fetch.fetch_model_files(model_id, client)
    assert fetch.fetch_tensors(model_id, folder, client, names) == 0


def test_a_corrupt_cached_tensor_is_fetched_again(client, model):
    model_id = str(model)
    folder = fetch.fetch_model_files(model_id, client)
    names = stage_names(folder, 0, 1)
    first = fetch.fetch_tensors(model_id, folder, client, names)
    weights = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    victim = folder / weights[names[0]]
    data = bytearray(victim.read_bytes())
    data[-5] ^= 0xFF
    victim.write_bytes(bytes(data))
    again = fetch.fetch_tensors(model_id, folder, client, names)
    assert 0 < again < first
    assert fetch.fetch_tensors(model_id, folder, client, names) == 0


def test_an_interrupted_fetch_resumes_where_it_stopped(client, model, monkeypatch):
    model_id = str(model)
    folder = fetch.fetch_model_files(model_id, client)
    names = stage_names(folder, 1, 2)
    calls = []
    real = fetch._download

    def interrupted(client_, uri, part, start, stop, bar):
        if not calls:       # the first range: half of it arrives, then the link drops
            calls.append((start, stop))
            response = client_.request(uri, (start, start + (stop - start) // 2))
            part.write_bytes(response.read())
            raise fetch.ModelError("connection lost")
        return real(client_, uri, part, start, stop, bar)

    monkeypatch.setattr(fetch, "_download", interrupted)
    with pytest.raises(fetch.ModelError, match="connection lost"):
        fetch.fetch_tensors(model_id, folder, client, names)
    monkeypatch.setattr(fetch, "_download", real)
    before = client.bytes_fetched
    total = sum(_sizes(folder, names))
    fetched = fetch.fetch_tensors(model_id, folder, client, names)
    start, stop = calls[0]
    assert fetched == total - (stop - start) // 2
    assert client.bytes_fetched - before == fetched
    stage = load_stage(ShardSpec(str(folder), 1, 2, 4))
    assert stage.parameter_bytes() == total


def _sizes(folder, names):
    weights = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    for name in names:
        raw = (folder / fetch.BOOKKEEPING / f"{weights[name]}.header").read_bytes()
        a, b = fetch.parse_header(raw)[name]["data_offsets"]
        yield b - a


def test_the_cached_manifest_is_used_when_storage_is_unreachable(client, model, tmp_path):
    model_id = str(model)
    folder = fetch.fetch_model_files(model_id, client)
    fetch.fetch_tensors(model_id, folder, client, stage_names(folder, 0, 1))
    offline = fetch.StorageClient(f"http://127.0.0.1:{free_port()}", SECRET)
    assert fetch.fetch_model_files(model_id, offline) == folder
    assert fetch.fetch_tensors(model_id, folder, offline, stage_names(folder, 0, 1)) == 0


def test_storage_serves_only_model_files(client, model, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(model, copy)
    (copy / "notes.py").write_text("secret = 1")
    manifest = client.manifest(str(copy))
    assert "notes.py" not in manifest["files"]
    with pytest.raises(fetch.ModelError, match="404"):
        client.read(client.file_uri(str(copy), "notes.py"))
    with pytest.raises(fetch.ModelError, match="404"):
        client.read(client.file_uri(str(copy), "../model/config.json"))
