"""The storage role with a GGUF model: a storage PC (a process of its own, with its own cache
and working folder) serves a GGUF file (a small random llama in Q4_K_M, tests/gguf_files.py, and
SmolLM2-135M-Instruct's Q4_1 file); "compute PCs" (this process, each with an empty cache of its
own) load a 2-stage split through exo_lab.engine.fetch.open_model, fetching exactly their stage's
tensors by byte range, verified, cached, repaired; each stage computes exactly what the same
stage loaded from the local GGUF computes."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
import torch
from ports import free_port
from procs import drain, read_until, stop

from exo_lab.control_types import ShardSpec
from exo_lab.engine import fetch
from exo_lab.errors import ModelError
from exo_lab.weights.checkpoint import load_stage
from exo_lab.weights.gguf import TABLE_FILE, gguf_model_dir, read_table

SECRET = b"storage-gguf-test-secret"
TOKENS = torch.tensor([[1, 504, 730, 314, 260, 914, 30]])     # ids below the small model's 1024

STORAGE_PC = """
import sys
from exo_lab.config import config_from_dict
from exo_lab.coordinator.loop import LoopThread
from exo_lab.membership.service import PeerService

port, secret = int(sys.argv[1]), sys.argv[2].encode()
config = config_from_dict({"cluster_name": "storage-gguf-test", "network": {"port_range": f"{port}-{port + 40}"},
                           "devices": [{"hostname": "s", "roles": ["coordinator", "storage", "compute"]}]})
loop = LoopThread()
loop.run(PeerService(config, secret, join=None, storage=True, host="127.0.0.1").start())
print("storage ready", flush=True)
sys.stdin.read()
"""


@pytest.fixture(scope="module", params=["tiny-Q4_K_M", "smollm2-Q4_1"])
def model(request, tmp_path_factory):
    """(model id, the storage PC's folder and cache, the GGUF model's local folder, its table).

    The model id is the GGUF file's name, relative: it names the file in the storage PC's working
    folder and nothing on a compute PC (whose working folder is elsewhere), as a path on one PC
    names nothing on another."""
    from exo_lab.weights.smollm2 import smollm2_gguf_path

    try:
        smollm2 = smollm2_gguf_path()
    except ModelError as exc:
        pytest.skip(f"SmolLM2's GGUF (its file, or the small model's tokenizer) is not in the cache and "
                    f"cannot be fetched: {exc}")
    root = tmp_path_factory.mktemp(f"storage-pc-{request.param}")
    workdir, cache = root / "work", root / "cache"
    workdir.mkdir()
    with pytest.MonkeyPatch.context() as patch:  # the storage PC's own cache
        if request.param == "smollm2-Q4_1":
            name = smollm2.name
            (workdir / name).symlink_to(smollm2)
            built = gguf_model_dir(str(smollm2))          # this PC's (made once in its cache) ...
            patch.setenv("EXO_LAB_CACHE", str(cache))     # ... is the storage PC's: the same file
            shutil.copytree(built, cache / "models" / built.name)
        else:
            gguf_files = pytest.importorskip("gguf_files")
            name = "tiny-llama.Q4_K_M.gguf"
            gguf_files.write_llama_gguf(workdir / name, recipe="Q4_K_M", tied=False, vocab=1024)
            patch.setenv("EXO_LAB_CACHE", str(cache))
        folder = gguf_model_dir(str(workdir / name))
    table = read_table(folder)
    kinds = {entry["type"] for entry in table["tensors"].values()}
    assert {"Q4_K", "Q6_K"} <= kinds if request.param == "tiny-Q4_K_M" else "Q4_1" in kinds
    return name, workdir, cache, folder, table


@pytest.fixture(scope="module")
def storage(model):
    """The storage PC: its file service on loopback, in a process of its own. Yields its URL."""
    _, workdir, cache, _, _ = model
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("EXO_LAB_SECRET", fetch.STORAGE_URL_ENV)}
    env["EXO_LAB_CACHE"] = str(cache)
    process = subprocess.Popen([sys.executable, "-c", STORAGE_PC, str(port), SECRET.decode()], cwd=workdir,
                               env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        read_until(process, "storage ready", 120, lines)
        drain(process, lines)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(process)


@pytest.fixture(scope="module")
def reference(model):
    """What the two stages compute when loaded from the local GGUF: (hidden states, logits)."""
    _, _, _, folder, table = model
    first = load_stage(spec(folder, 0, split(table), table))
    hidden = first.forward(TOKENS, [0], [0])
    del first
    last = load_stage(spec(folder, split(table), num_layers(table), table))
    return hidden, last.forward(hidden, [0], [0])


@pytest.fixture
def compute_pc(storage, tmp_path, monkeypatch):
    """``use(name)``: from now on this process is compute PC ``name``, with an empty cache of its
    own and the storage PC and cluster secret its worker was told at join."""
    monkeypatch.setenv(fetch.STORAGE_URL_ENV, storage)
    monkeypatch.setenv("EXO_LAB_SECRET", SECRET.decode())

    def use(name: str):
        home = tmp_path / name
        (home / "work").mkdir(parents=True, exist_ok=True)
        monkeypatch.setenv("EXO_LAB_CACHE", str(home / "cache"))
        monkeypatch.chdir(home / "work")
        return home

    return use


@pytest.fixture
def client(storage):
    made = fetch.StorageClient(storage, SECRET)
    yield made
    made.close()


def num_layers(table) -> int:
    return 1 + max(int(name.split(".")[2]) for name in table["tensors"] if name.startswith("model.layers."))


def split(table) -> int:
    """Where the 2-stage split cuts: stage 0 holds layers [0, split), stage 1 the rest."""
    return num_layers(table) // 2 + 1


def spec(folder, start, stop, table) -> ShardSpec:
    return ShardSpec(str(folder), start, stop, num_layers(table), dtype="gguf", max_context=64, max_batch=1)


def served(client) -> int:
    """Bytes the storage PC has served to this machine (its stats)."""
    return json.loads(client.read(client._uri("stats")))["bytes_served"].get("127.0.0.1", 0)


def recorded(ensure, client, log: list):
    """``ensure`` noting, per call, (names, bytes it fetched, bytes the storage PC served meanwhile)."""
    def call(names):
        before = served(client)
        fetched = ensure(names)
        log.append((list(names), fetched, served(client) - before))
        return fetched

    return call


def load_fetched(model_id, start, stop, table, client):
    """open_model + load_stage as an engine does: (folder, stage, ensure's record)."""
    folder, ensure = fetch.open_model(model_id)
    assert ensure is not None, "the model must not be found on the compute PC"
    log: list = []
    return folder, load_stage(spec(folder, start, stop, table), recorded(ensure, client, log)), log


def names_of(log) -> list[str]:
    return log[0][0]


def cached_files(folder) -> set[str]:
    return {f"{fetch.TENSORS}/{p.name}" for p in (folder / fetch.TENSORS).iterdir()}


def test_the_manifest_lists_each_gguf_tensor_and_only_named_files_are_served(model, client):
    model_id, _, _, _, table = model
    files = client.manifest(model_id)["files"]
    (gguf,) = table["files"]
    assert files[gguf]["gguf"] is True and "sha256" not in files[gguf]
    assert files[gguf]["size"] == table["files"][gguf]["size"]
    assert set(files[gguf]["tensors"]) == set(table["tensors"])
    assert {"config.json", TABLE_FILE, "tokenizer.json"} <= set(files)
    for name in ("model.gguf", "../work/" + gguf, TABLE_FILE + ".gguf"):
        with pytest.raises(ModelError, match="404"):
            client.read(client.file_uri(model_id, name), (0, 4))
    assert client.read(client.file_uri(model_id, gguf), (0, 4)) == b"GGUF"


def test_requests_without_the_secret_are_refused(model, storage):
    model_id, _, _, _, table = model
    (gguf,) = table["files"]
    uri = f"{fetch.PREFIX}/file?model={model_id}&name={gguf}"
    for headers in ({}, {fetch.AUTH_HEADER: fetch.auth_header(b"not-the-cluster-secret", "GET", uri)},
                    {fetch.AUTH_HEADER: "1.2.3"}):
        request = urllib.request.Request(storage + uri, headers={"Range": "bytes=0-3", **headers})
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(request, timeout=30)
        assert caught.value.code == 403


def test_two_compute_pcs_fetch_their_stages_and_compute_as_the_local_model(model, reference, compute_pc, client,
                                                                          monkeypatch):
    model_id, _, _, local, table = model
    requests, real = [], fetch._download

    def download(client_, uri, part, start, stop, bar):
        requests.append((start, stop))
        real(client_, uri, part, start, stop, bar)

    monkeypatch.setattr(fetch, "_download", download)
    stages = ((0, split(table)), (split(table), num_layers(table)))
    size = sum(entry["size"] for entry in table["files"].values())
    hidden = TOKENS
    for (first, last), expected, pc in zip(stages, reference, ("pc-a", "pc-b")):
        home = compute_pc(pc)
        folder, stage, log = load_fetched(model_id, first, last, table, client)
        assert folder.is_relative_to(home / "cache")
        assert (folder / fetch.BOOKKEEPING / TABLE_FILE).read_bytes() == (local / TABLE_FILE).read_bytes()
        own = read_table(folder)
        assert own["tensors"][names_of(log)[0]]["offset"] == 0 and set(own["tensors"]) == set(table["tensors"])
        written = (folder / TABLE_FILE).stat()
        ((names, fetched, sent),) = log
        need = sum(table["tensors"][name]["nbytes"] for name in names)
        assert fetched == sent == need < size          # that stage's tensors, not the whole file
        assert sum(b - a for a, b in requests) == need and len(requests) < len(names) / 4   # adjacent: merged
        requests.clear()
        assert cached_files(folder) == {fetch.tensor_file(n, fetch.RAW_SUFFIX) for n in names}
        assert {int(n.split(".")[2]) for n in names if n.startswith("model.layers.")} == set(range(first, last))
        output = stage.forward(hidden, [0], [0])
        assert torch.equal(output, expected)
        del stage
        # the next start fetches nothing, and computes the same
        folder, stage, log = load_fetched(model_id, first, last, table, client)
        assert [(fetched, sent) for _, fetched, sent in log] == [(0, 0)]
        again = (folder / TABLE_FILE).stat()      # gguf.json as it was: not written again
        assert (again.st_ino, again.st_mtime_ns) == (written.st_ino, written.st_mtime_ns)
        assert torch.equal(stage.forward(hidden, [0], [0]), expected)
        del stage
        hidden = expected


def test_a_corrupt_cached_tensor_is_fetched_again(model, reference, compute_pc, client):
    model_id, _, _, _, table = model
    compute_pc("pc-c")
    folder, stage, log = load_fetched(model_id, 0, split(table), table, client)
    del stage
    names = names_of(log)
    victim = next(n for n in names if n.endswith("q_proj.weight"))
    path = folder / fetch.tensor_file(victim, fetch.RAW_SUFFIX)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    folder, stage, log = load_fetched(model_id, 0, split(table), table, client)
    ((_, fetched, sent),) = log
    assert fetched == sent == table["tensors"][victim]["nbytes"]
    assert path.read_bytes() != bytes(data)
    assert torch.equal(stage.forward(TOKENS, [0], [0]), reference[0])


def test_a_transfer_that_stays_corrupt_is_refused_with_the_fix(model, compute_pc, monkeypatch):
    model_id, _, _, _, _ = model
    compute_pc("pc-d")
    real = fetch._download

    def flipping(client_, uri, part, start, stop, bar):
        real(client_, uri, part, start, stop, bar)
        data = bytearray(part.read_bytes())
        data[0] ^= 0xFF
        part.write_bytes(bytes(data))

    monkeypatch.setattr(fetch, "_download", flipping)
    folder, ensure = fetch.open_model(model_id)
    with pytest.raises(ModelError, match="tensor model.norm.weight of .*does not match the storage PC's sha256 "
                                         "manifest; the transfer was corrupted"):
        ensure(["model.norm.weight"])
    assert not (folder / fetch.tensor_file("model.norm.weight", fetch.RAW_SUFFIX)).exists()
