"""The storage role on loopback: the file service, and a fetch of exactly one stage's tensors
(verified, resumed, cached, repaired), loaded into a stage that matches one built from disk."""
from __future__ import annotations

import contextlib
import json
import mmap
import os
import shutil
import sys
import urllib.error
import urllib.request

import pytest
from ports import free_port
import torch

from exo_lab.config import config_from_dict
from exo_lab.coordinator.loop import LoopThread
from exo_lab.membership.service import PeerService
from exo_lab.engine import fetch
from exo_lab.control_types import ShardSpec
from exo_lab.weights.checkpoint import load_stage

SECRET = b"storage-test-secret"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from exo_lab.weights.demo import build_random_model

    return build_random_model(tmp_path_factory.mktemp("storage") / "model", num_layers=4,
                              max_shard_size="100KB")


@pytest.fixture(scope="module")
def storage(tmp_path_factory):
    """A file service on loopback (its manifest cache in its own EXO_LAB_CACHE)."""
    port = free_port()
    # the service listens on the range's first port (the rest, the controller's, stays unused)
    config = config_from_dict({"cluster_name": "storage-test", "network": {"port_range": f"{port}-{port + 40}"},
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


def _origin(folder):
    """Tensor name -> the original safetensors file on the storage PC (from the manifest)."""
    manifest = json.loads((folder / fetch.BOOKKEEPING / "manifest.json").read_text())
    return {name: file for file, entry in manifest["files"].items() for name in entry.get("tensors", ())}


def _sizes(folder, names):
    origin = _origin(folder)
    for name in names:
        raw = (folder / fetch.BOOKKEEPING / f"{origin[name]}.header").read_bytes()
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


# ---------------------------------------------------------------- files another engine has mapped

def _files(folder):
    """(inode, mtime, size) of every file the cache holds (not its temporaries)."""
    return {p: (p.stat().st_ino, p.stat().st_mtime_ns, p.stat().st_size) for p in folder.rglob("*")
            if p.is_file() and "tmp" not in p.relative_to(folder).parts}


@contextlib.contextmanager
def _mapped(folder, mapped: set | None = None):
    """Every tensor file of the folder memory-mapped, as a loaded stage's safetensors are (and
    listed in ``mapped`` meanwhile)."""
    mapped = set() if mapped is None else mapped
    paths = {os.path.realpath(path) for path in (folder / fetch.TENSORS).iterdir()}
    with contextlib.ExitStack() as stack:
        for path in paths:
            handle = stack.enter_context(open(path, "rb"))
            stack.enter_context(mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ))
        mapped |= paths
        try:
            yield
        finally:
            mapped -= paths


def _like_windows(patch: pytest.MonkeyPatch) -> set:
    """This process's file calls behave as on Windows: a rename never replaces, and a mapped file
    (a path in the returned set) can be neither replaced nor deleted (WinError 32)."""
    mapped: set[str] = set()
    rename, replace, unlink = os.rename, os.replace, os.unlink

    def refuse_if_mapped(path):
        if os.path.realpath(path) in mapped:
            raise PermissionError(13, "[WinError 32] The process cannot access the file because it is "
                                      "being used by another process", str(path))

    def windows_rename(src, dst, **kwargs):
        if os.path.exists(dst):
            raise FileExistsError(17, "[WinError 183] Cannot create a file when that file already exists", str(dst))
        rename(src, dst, **kwargs)

    def windows_replace(src, dst, **kwargs):
        refuse_if_mapped(dst)
        replace(src, dst, **kwargs)

    def windows_unlink(path, **kwargs):
        refuse_if_mapped(path)
        unlink(path, **kwargs)

    patch.setattr(sys, "platform", "win32")
    for name, function in (("rename", windows_rename), ("replace", windows_replace),
                           ("unlink", windows_unlink), ("remove", windows_unlink)):
        patch.setattr(os, name, function)
    return mapped


def test_a_second_fetch_leaves_the_mapped_files_as_they_are(client, model):
    model_id = str(model)
    folder = fetch.fetch_model_files(model_id, client)
    first, second = stage_names(folder, 2, 4), stage_names(folder, 0, 2)
    fetch.fetch_tensors(model_id, folder, client, first)
    before = _files(folder)
    with _mapped(folder):
        fetch.fetch_model_files(model_id, client)
        assert fetch.fetch_tensors(model_id, folder, client, first) == 0
        assert fetch.fetch_tensors(model_id, folder, client, second) > 0   # same original files
        after = _files(folder)
    assert {p: after[p] for p in before} == before      # nothing replaced, nothing rewritten
    reference = load_stage(ShardSpec(str(model), 0, 4, 4)).state_dict()
    stage = load_stage(ShardSpec(str(folder), 0, 4, 4))
    assert all(torch.equal(tensor, reference[name]) for name, tensor in stage.state_dict().items())


def test_on_windows_no_fetch_replaces_or_deletes_a_mapped_file(client, model):
    model_id = str(model)
    folder = fetch.fetch_model_files(model_id, client)
    first, second = stage_names(folder, 2, 4), stage_names(folder, 0, 2)
    fetch.fetch_tensors(model_id, folder, client, first)
    with pytest.MonkeyPatch.context() as patch:
        mapped = _like_windows(patch)
        with _mapped(folder, mapped):
            fetch.fetch_model_files(model_id, client)
            assert fetch.fetch_tensors(model_id, folder, client, first) == 0
            assert fetch.fetch_tensors(model_id, folder, client, second) > 0
            fetch.fetch_model_files(model_id, client)       # the new files are there: kept
            assert fetch.fetch_tensors(model_id, folder, client, first + second) == 0


def test_on_windows_a_corrupt_mapped_tensor_names_the_fix(client, model):
    model_id = str(model)
    folder = fetch.fetch_model_files(model_id, client)
    names = stage_names(folder, 0, 1)
    fetch.fetch_tensors(model_id, folder, client, names)
    victim = folder / fetch.tensor_file(names[0])
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.MonkeyPatch.context() as patch:
        mapped = _like_windows(patch)
        with _mapped(folder, mapped), pytest.raises(fetch.ModelError, match="stop the engines on this PC, delete the file"):
            fetch.fetch_tensors(model_id, folder, client, names)
        # unmapped, it is repaired from the range the first try downloaded (kept to resume)
        assert fetch.fetch_tensors(model_id, folder, client, names) == 0
    assert victim.read_bytes() != bytes(data)
    reference = load_stage(ShardSpec(str(model), 0, 1, 4)).state_dict()
    stage = load_stage(ShardSpec(str(folder), 0, 1, 4))
    assert all(torch.equal(tensor, reference[name]) for name, tensor in stage.state_dict().items())


def test_a_cache_of_the_earlier_layout_is_adopted_without_fetching(client, model):
    """An earlier exo-lab kept one growing partial file per original file; its tensors move to
    their own files (nothing fetched again) and the partial file goes."""
    model_id = str(model)
    folder = fetch.fetch_model_files(model_id, client)
    names = stage_names(folder, 1, 3)
    origin = _origin(folder)
    by_file = {}
    for name in names:
        by_file.setdefault(origin[name], []).append(name)
    for file, wanted in by_file.items():
        header = fetch.parse_header((folder / fetch.BOOKKEEPING / f"{file}.header").read_bytes())
        start = fetch.read_local_header(model / file)[1]
        sources = [fetch._copier(model / file, *(start + o for o in header[n]["data_offsets"])) for n in wanted]
        fetch.write_safetensors(folder / file, {n: header[n] for n in wanted}, sources)
    assert fetch.fetch_tensors(model_id, folder, client, names) == 0
    assert not any((folder / file).exists() for file in by_file)
    assert all((folder / fetch.tensor_file(n)).is_file() for n in names)
    assert load_stage(ShardSpec(str(folder), 1, 3, 4)).parameter_bytes() == sum(_sizes(folder, names))


def test_a_storage_pc_named_by_hostname_is_reached_where_its_worker_joined_from():
    """The storage PC is `system-s.local` in the config and nothing resolves that name: once its
    own worker has joined, later workers are sent to the address it joined from."""
    from ports import free_port_range

    from exo_lab.membership.discovery import join
    from exo_lab.membership.service import start_coordinator_service

    first = free_port_range(40)
    config = config_from_dict({
        "cluster_name": "storage-join", "network": {"port_range": f"{first}-{first + 39}"},
        "devices": [{"hostname": "system-a.local", "roles": ["coordinator"]},
                    {"hostname": "system-s.local", "roles": ["storage", "compute"]},
                    {"hostname": "system-b.local", "roles": ["compute"]}]})
    loop = LoopThread()
    try:
        service = loop.run(start_coordinator_service(config, SECRET, {}, on_address=lambda _: None))
        before = join("127.0.0.1", first, "storage-join", "system-b.local", SECRET)
        join("127.0.0.1", first, "storage-join", "system-s", SECRET)     # its own short name
        after = join("127.0.0.1", first, "storage-join", "system-b.local", SECRET)
        loop.run(service.close())
    finally:
        loop.stop()
    assert before.storage_url == f"http://system-s.local:{first}"    # not joined yet: only its name
    assert after.storage_url == f"http://127.0.0.1:{first}"
