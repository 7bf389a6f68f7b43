"""A GGUF file served across PCs as an office has them: namespaces behind the README's firewall rules.

system-a runs the coordinator and the storage role (``python -m exo_lab.server --config
config.yaml --model <file>.gguf``) and is the only PC that sees the file: a small random llama in
Q4_K_M (Q4_K and Q6_K blocks, tests/gguf_files.py). system-b and system-c are compute PCs
(``python -m exo_lab.worker --config config.yaml``, one core each) that cannot see the file's
folder, named ``system-b`` while the config says ``system-b.local``, each behind a default-drop
firewall that lets in only ``network.port_range``, the API port and mDNS. The model loads in
two stages at dtype ``auto`` (``gguf``: each matrix in its file's blocks); each compute PC fetches
exactly its stage's tensors' byte ranges from system-a; the plan counts the GGUF's layout bytes;
and the official openai client gets, token for token, the greedy answer of the same file loaded
whole in this process at dtype ``gguf``.

``EXO_LAB_NETLAB_GGUF=/path/to/file.gguf`` runs the same lab on that file instead (SmolLM2's
Q4_K_M file from llama.cpp's ``llama_model_quantize``, for issue 26's closing note).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from types import SimpleNamespace

import pytest

import netlab
from procs import drain, read_until

REASON = netlab.unavailable() or netlab.firewall_unavailable()
pytestmark = netlab.skip_unless_required(REASON)



API_PORT = 8000
SERVICE_PORT = 10100            # the first of the default network.port_range: the storage role's
OPEN_TCP = ["10100-10199", str(API_PORT)]
OPEN_UDP = ["5353"]
PCS = ("system-a", "system-b", "system-c")
COMPUTE_PCS = ("system-b", "system-c")
GIVEN = os.environ.get("EXO_LAB_NETLAB_GGUF")         # a GGUF file to run instead of the written one


def _block_count(path: str) -> int:
    from gguf import GGUFReader

    return int(GGUFReader(path).fields["llama.block_count"].contents())


LAYERS = _block_count(GIVEN) if GIVEN else 4
GGUF_NAME = os.path.basename(GIVEN) if GIVEN else "tiny-llama.Q4_K_M.gguf"
MESSAGES = [{"role": "user", "content": "Name three colours of the rainbow."}]
PROMPT_IDS = [1, 504, 730, 314, 260, 914, 30]      # a completion prompt as token ids (below the vocab of 1024)
NEW_TOKENS = 12
# untied (an output.weight of its own: with a tied head a small random model repeats its input
# token) and a seed whose greedy answers to both prompts vary
SEED = 5
# the manifest (a sha256 per tensor: ~5 KB here, ~35 KB for SmolLM2's 272 tensors), sent once per engine start
SMALL_FILES_SLACK = 20_000 if not GIVEN else 60_000


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """The GGUF file (in a folder of its own, hidden from the compute PCs), the folder exo-lab
    reads it through (built here with a cache of this module's own) and its ``gguf.json``."""
    gguf_files = pytest.importorskip("gguf_files")
    from exo_lab.errors import ModelError

    try:
        tokenizer_gguf = gguf_files.tokenizer_source()    # from exo-lab's own cache, before redirecting it
    except ModelError as exc:
        pytest.skip(f"SmolLM2's GGUF (the small model's tokenizer) is not in the cache and cannot be fetched: {exc}")
    root = tmp_path_factory.mktemp("netlab-gguf")
    (root / "model").mkdir()
    path = root / "model" / GGUF_NAME
    if GIVEN:
        shutil.copy(GIVEN, path)
    else:
        gguf_files.write_llama_gguf(path, recipe="Q4_K_M", hidden=256, layers=LAYERS, intermediate=512,
                                    vocab=1024, tied=False, seed=SEED, tokenizer_from=tokenizer_gguf)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EXO_LAB_CACHE", str(root / "test-cache"))
        from exo_lab.weights.gguf import gguf_model_dir, read_table

        folder = gguf_model_dir(str(path))
        table = read_table(folder)
        assert {"Q4_K", "Q6_K"} <= {entry["type"] for entry in table["tensors"].values()}
        yield SimpleNamespace(root=root, path=path, folder=folder, table=table)


def greedy(stage, prompt_ids: list[int], new_tokens: int, eos: set[int], slot: int):
    """Greedy tokens after ``prompt_ids`` from one stage holding the whole model (stages.generate),
    up to an end-of-sequence token (left out), as the server stops; and each one's log-probability."""
    import torch
    from stages import generate

    logprobs = []

    def pick(logits) -> int:
        scores = torch.log_softmax(logits[0].float(), dim=-1)
        token = int(torch.argmax(scores))
        logprobs.append(float(scores[token]))
        return token

    tokens = generate([stage], torch.tensor([prompt_ids]), new_tokens=new_tokens, slot=slot, pick=pick)
    ends = [i for i, token in enumerate(tokens) if token in eos] + [len(tokens)]
    return tokens[:ends[0]], logprobs[:ends[0]]


@pytest.fixture(scope="module")
def reference(model):
    """The same file loaded whole in this process at dtype gguf, one thread (as each engine):
    the chat prompt's ids as the server renders them and its greedy tokens; the token-id
    completion prompt's greedy tokens; the tokenizer and end-of-sequence ids the server uses.
    Computed before the lab starts, so that nothing competes for the cores."""
    import torch
    from transformers import AutoTokenizer

    from exo_lab.api.tools import render_chat
    from exo_lab.control_types import ShardSpec
    from exo_lab.coordinator.pipeline import eos_token_ids
    from exo_lab.weights.checkpoint import load_stage

    tokenizer = AutoTokenizer.from_pretrained(str(model.folder))       # as the coordinator loads it
    eos = eos_token_ids(tokenizer, json.loads((model.folder / "config.json").read_text()))
    chat_ids = render_chat(tokenizer, MESSAGES, ())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        stage = load_stage(ShardSpec(str(model.folder), 0, LAYERS, LAYERS, dtype="gguf", max_context=256,
                                     max_batch=2))
        chat, chat_logprobs = greedy(stage, chat_ids, NEW_TOKENS, eos, slot=0)
        completion, completion_logprobs = greedy(stage, PROMPT_IDS, NEW_TOKENS, eos, slot=1)
    finally:
        torch.set_num_threads(threads)
    # a reply cut short by an end-of-sequence token, or one token over and over, would prove less:
    # this seed's model answers neither
    if not GIVEN:                                       # a given real model may end its answer sooner
        assert len(chat) == len(completion) == NEW_TOKENS, (chat, completion, eos)
    assert len(set(chat)) > 2 and len(set(completion)) > 2, (chat, completion)
    return SimpleNamespace(tokenizer=tokenizer, eos=eos, chat_ids=chat_ids, chat=chat, chat_logprobs=chat_logprobs,
                           completion=completion, completion_logprobs=completion_logprobs)


class Lab:
    """The running lab: the netlab, the model, the secret, the server's output."""

    def __init__(self, net: netlab.Netlab, model, secret: str, config):
        self.net, self.model, self.secret, self.config = net, model, secret, config
        self.server = None
        self.server_lines: list[str] = []
        self.workers: dict[str, object] = {}
        self.ready_s = 0.0

    @property
    def api(self) -> str:
        return f"http://{self.net.pcs['system-a'].address}:{API_PORT}"

    def status(self) -> dict:
        with urllib.request.urlopen(self.api + "/v1/cluster/status", timeout=30) as response:
            return json.load(response)

    def storage_stats(self) -> dict[str, int]:
        from exo_lab.engine.fetch import AUTH_HEADER, PREFIX, auth_header

        uri = f"{PREFIX}/stats"
        request = urllib.request.Request(
            f"http://{self.net.pcs['system-a'].address}:{SERVICE_PORT}{uri}",
            headers={AUTH_HEADER: auth_header(self.secret.encode(), "GET", uri)})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.load(response)["bytes_served"]

    def client(self):
        from openai import OpenAI

        return OpenAI(base_url=self.api + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def lab(model, reference, tmp_path_factory):
    from exo_lab.security import new_secret, write_secret_file

    root = tmp_path_factory.mktemp("netlab-gguf-pcs")
    started = time.monotonic()
    with netlab.Netlab(list(PCS), root / "pcs") as net:
        for name in PCS:
            net.firewall(name, tcp_ports=OPEN_TCP, udp_ports=OPEN_UDP)
        config = root / "cluster" / "config.yaml"     # the same two files on every PC
        config.parent.mkdir()
        config.write_text(netlab.OFFICE_CONFIG.format(name=f"netlab-gguf-{net.run_id}", api_port=API_PORT,
                                                     replan="manual"))
        secret = new_secret()
        write_secret_file(config.parent / "secret.txt", secret)
        running = Lab(net, model, secret, config)
        running.server = net.start(
            "system-a", [sys.executable, "-m", "exo_lab.server", "--config", "config.yaml", "--model",
                         str(model.path), "--min-stages", "2"],
            cwd=config.parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for name in COMPUTE_PCS:
            worker = net.start(name, [sys.executable, "-m", "exo_lab.worker", "--config", "config.yaml"],
                               cwd=config.parent, hide=(model.path.parent,), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
            running.workers[name] = worker
            drain(worker, [])
        read_until(running.server, "serving", 180, running.server_lines)
        drain(running.server, running.server_lines)
        running.ready_s = time.monotonic() - started
        print(f"\nGGUF lab serving {running.ready_s:.1f} s after the netlab started")
        yield running


def stage_rows(lab) -> dict[str, dict]:
    """node -> its engine's status row, for the engines that hold a stage."""
    return {row["node"]: row for row in lab.status()["engines"] if row.get("stage_index") is not None}


def stage_tensors(table: dict, start: int, stop: int) -> list[str]:
    """The Hugging Face names of the tensors stage [start, stop) of the model reads."""
    tensors = table["tensors"]
    names = [name for name in tensors if name.startswith("model.layers.")
             and start <= int(name.split(".")[2]) < stop]
    if start == 0:
        names.append("model.embed_tokens.weight")
    if stop == LAYERS:
        names += ["model.norm.weight", "lm_head.weight" if "lm_head.weight" in tensors else "model.embed_tokens.weight"]
    return list(dict.fromkeys(names))


def test_the_two_compute_pcs_serve_a_stage_each(lab):
    status = lab.status()
    assert status["state"] == "ready" and status["dtype"] == "gguf", status
    plan = status["plan"]
    assert plan["dtype"] == "gguf" and len(plan["stages"]) == 2, plan
    assert sorted(stage["node"] for stage in plan["stages"]) == ["system-b.local", "system-c.local"]
    assert [(s["start_layer"], s["stop_layer"]) for s in plan["stages"]] == \
        [(0, plan["stages"][0]["stop_layer"]), (plan["stages"][0]["stop_layer"], LAYERS)]
    rows = stage_rows(lab)
    assert sorted(rows) == ["system-b.local", "system-c.local"]
    assert sorted(row["stage_index"] for row in rows.values()) == [0, 1]
    assert "(gguf)" in "".join(lab.server_lines)         # the printed plan


def test_the_plan_counts_the_gguf_layout_bytes(lab, model):
    from exo_lab.model.profile import profile_model
    from exo_lab.model.quant4 import layout_bytes

    profile = profile_model(str(model.path))
    assert profile.dtype == "gguf" and profile.num_layers == LAYERS
    tensors = model.table["tensors"]

    def loaded(name: str) -> int:
        return layout_bytes(tensors[name]["type"], tuple(tensors[name]["shape"]))

    per_layer = [sum(loaded(n) for n in tensors if n.startswith(f"model.layers.{i}.")) for i in range(LAYERS)]
    assert profile.layer_bytes == max(per_layer)
    assert len(set(per_layer)) > 1          # Q4_K_M gives some layers Q6_K matrices: the plan takes the largest
    assert profile.embedding_bytes == loaded("model.embed_tokens.weight")          # Q4_K
    if "lm_head.weight" in tensors:         # untied: the head's own (Q6_K) bytes
        assert profile.lm_head_bytes == loaded("lm_head.weight") != profile.embedding_bytes
    else:                                   # tied (SmolLM2): the last stage holds the embedding as its head
        assert profile.lm_head_bytes == profile.embedding_bytes
    assert profile.final_norm_bytes == loaded("model.norm.weight")
    file_bytes = sum(entry["nbytes"] for entry in tensors.values())
    assert profile.total_parameter_bytes != file_bytes      # repacked layouts, not the file's blocks
    rows = stage_rows(lab)
    for stage in lab.status()["plan"]["stages"]:
        start, stop = stage["start_layer"], stage["stop_layer"]
        first, last = start == 0, stop == LAYERS
        planned = ((stop - start) * profile.layer_bytes + first * profile.embedding_bytes
                   + last * (profile.final_norm_bytes + profile.lm_head_bytes))
        assert stage["weights_bytes"] == planned, (stage, planned)
        # what the engine holds: its own tensors' layout bytes, each layer as it is
        held = sum(loaded(n) for n in stage_tensors(model.table, start, stop))
        assert rows[stage["node"]]["parameter_bytes"] == held <= planned, (stage["node"], held, planned)


def test_each_compute_pc_fetches_only_its_stage_tensors(lab, model):
    served = lab.storage_stats()
    tensors = model.table["tensors"]
    size = model.path.stat().st_size
    small = sum(p.stat().st_size for p in model.folder.iterdir() if p.is_file() and p.suffix != ".gguf")
    layer_nbytes = [sum(e["nbytes"] for n, e in tensors.items() if n.startswith(f"model.layers.{i}."))
                    for i in range(LAYERS)]
    assert min(layer_nbytes) > SMALL_FILES_SLACK     # so the bound below leaves out any other layer
    seen = {}
    for stage in lab.status()["plan"]["stages"]:
        pc = stage["node"].removesuffix(".local")
        need = sum(tensors[n]["nbytes"] for n in stage_tensors(model.table, stage["start_layer"], stage["stop_layer"]))
        fetched = served[lab.net.pcs[pc].address]
        # the stage's tensors' byte ranges, plus config, tokenizer, gguf.json and the manifest
        assert need + small <= fetched <= need + small + SMALL_FILES_SLACK, (pc, fetched, need, small)
        assert fetched < size, (pc, fetched, size)
        seen[pc] = (stage["start_layer"], stage["stop_layer"], need, fetched - need - small)
    assert lab.net.pcs["system-a"].address not in served      # the coordinator reads its own file
    print(f"\nGGUF file {size} bytes, small files {small}; per PC (layers, tensor bytes, manifest bytes): {seen}")


def test_greedy_chat_through_the_api_equals_the_local_run(lab, reference):
    from exo_lab.api.choices import token_table

    client = lab.client()
    name = client.models.list().data[0].id
    reply = client.chat.completions.create(model=name, messages=MESSAGES, max_tokens=NEW_TOKENS, temperature=0,
                                           logprobs=True, top_logprobs=1)
    choice = reply.choices[0]
    table = token_table(reference.tokenizer)
    entries = choice.logprobs.content
    assert [bytes(entry.bytes) for entry in entries] == [table.bytes(t) for t in reference.chat]
    assert [entry.top_logprobs[0].bytes for entry in entries] == [entry.bytes for entry in entries]   # greedy
    assert [entry.logprob for entry in entries] == pytest.approx(reference.chat_logprobs, abs=1e-6, rel=0)
    assert reply.usage.prompt_tokens == len(reference.chat_ids)
    assert reply.usage.completion_tokens == len(reference.chat) and choice.finish_reason == finish(reference.chat)
    assert choice.message.content == reference.tokenizer.decode(reference.chat, skip_special_tokens=True)


def test_greedy_completion_of_token_ids_equals_the_local_run(lab, reference):
    client = lab.client()
    name = client.models.list().data[0].id
    reply = client.completions.create(model=name, prompt=PROMPT_IDS, max_tokens=NEW_TOKENS, temperature=0,
                                      logprobs=1)
    choice = reply.choices[0]
    assert reply.usage.prompt_tokens == len(PROMPT_IDS) and reply.usage.completion_tokens == len(reference.completion)
    assert choice.text == reference.tokenizer.decode(reference.completion, skip_special_tokens=True)
    assert choice.logprobs.token_logprobs == pytest.approx(reference.completion_logprobs, abs=1e-6, rel=0)
    assert choice.finish_reason == finish(reference.completion)


def finish(tokens: list[int]) -> str:
    """The finish reason of a reply of ``tokens``: cut at max_tokens, or ended by the model."""
    return "length" if len(tokens) == NEW_TOKENS else "stop"
