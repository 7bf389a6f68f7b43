"""Several PCs for real, as network namespaces on a bridge (tests/netlab.py), as an office has them.

system-a (coordinator + storage, has the model), system-b and system-c (compute; the model folder
is hidden from them by a tmpfs), system-d (a late or hostile PC, not in the config). As on real
PCs, their own names are short while the config says ``system-a.local`` (nothing resolves
``.local`` names here), and every PC sits behind a firewall that drops all input except
established traffic, ``network.port_range`` (TCP 10100-10199), the API port and mDNS (UDP 5353):
the rules the README gives for Windows and Linux. Every process is one of the documented
services, started as the README says: ``python -m exo_lab.server --config config.yaml`` and
``python -m exo_lab.worker --config config.yaml`` (no --device: the PC's own name matches), the
secret from ``network.secret_file``. The workers find the coordinator by mDNS, join with the
secret, fetch their shards from the storage PC, and the official openai client talks to the API
across the bridge. The tests run in order and share one lab (one module, a few minutes of CPU).
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
import urllib.request

import pytest

import netlab
from procs import read_until

REASON = netlab.unavailable() or netlab.firewall_unavailable()
pytestmark = netlab.skip_unless_required(REASON)


API_PORT = 8000
PORT_RANGE = (10100, 10199)
SERVICE_PORT = PORT_RANGE[0]
PROMPT = "The cluster of PCs"
MAX_TOKENS = 24
PCS = ("system-a", "system-b", "system-c", "system-d")
OPEN_TCP = [f"{PORT_RANGE[0]}-{PORT_RANGE[1]}", str(API_PORT)]
OPEN_UDP = ["5353"]

CONFIG = netlab.OFFICE_CONFIG


class Lab:
    """The running lab: the netlab, the model, the secret, the processes."""

    def __init__(self, net: netlab.Netlab, model, secret: str, config):
        self.net, self.model, self.secret, self.config = net, model, secret, config
        self.server = None
        self.server_lines: list[str] = []
        self.workers: dict[str, object] = {}
        self.join_s: dict[str, float] = {}

    @property
    def api(self) -> str:
        return f"http://{self.net.pcs['system-a'].address}:{API_PORT}"

    def start_server(self):
        self.server = self.net.start(
            "system-a", [sys.executable, "-m", "exo_lab.server", "--config", "config.yaml", "--model",
                         str(self.model), "--min-stages", "2"],
            cwd=self.config.parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def start_worker(self, name: str):
        process = self.net.start(
            name, [sys.executable, "-m", "exo_lab.worker", "--config", "config.yaml"], cwd=self.config.parent,
            hide=(self.model,), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.workers[name] = process
        return process

    def joined(self, name: str, timeout_s: float = 60) -> None:
        lines = read_until(self.workers[name], "joining cluster", timeout_s)
        found = re.search(r"joined at (\S+) in ([\d.]+) s", lines[-1])
        assert found and found.group(1) == self.net.pcs["system-a"].address, lines
        self.join_s[name] = float(found.group(2))

    def status(self) -> dict:
        with urllib.request.urlopen(self.api + "/v1/cluster/status", timeout=30) as response:
            return json.load(response)

    def wait_for(self, predicate, timeout_s: float, what: str):
        deadline = time.monotonic() + timeout_s
        last = None
        while time.monotonic() < deadline:
            try:
                last = self.status()
                if predicate(last):
                    return last
            except OSError as exc:
                last = exc
            time.sleep(1.0)
        raise AssertionError(f"{what} did not happen within {timeout_s:.0f} s; last status: {last}")

    def storage_stats(self) -> dict[str, int]:
        from exo_lab.engine.fetch import AUTH_HEADER, PREFIX, auth_header

        uri = f"{PREFIX}/stats"
        request = urllib.request.Request(
            f"http://{self.net.pcs['system-a'].address}:{SERVICE_PORT}{uri}",
            headers={AUTH_HEADER: auth_header(self.secret.encode(), "GET", uri)})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.load(response)["bytes_served"]

    def complete(self, max_tokens: int = MAX_TOKENS):
        from openai import OpenAI

        client = OpenAI(base_url=self.api + "/v1", api_key="unused", max_retries=0, timeout=60)
        return client.completions.create(model=str(self.model), prompt=PROMPT, max_tokens=max_tokens,
                                         temperature=0)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    from exo_lab.weights.demo import demo_model_dir
    from exo_lab.security import new_secret, write_secret_file

    root = tmp_path_factory.mktemp("netlab")
    model = root / "model"
    shutil.copytree(demo_model_dir(), model)
    with netlab.Netlab(list(PCS), root / "pcs") as net:
        for name in PCS:
            net.firewall(name, tcp_ports=OPEN_TCP, udp_ports=OPEN_UDP)
        config = root / "cluster" / "config.yaml"     # the same two files on every PC
        config.parent.mkdir()
        config.write_text(CONFIG.format(name=f"netlab-{net.run_id}", api_port=API_PORT, replan="auto"))
        secret = new_secret()
        write_secret_file(config.parent / "secret.txt", secret)
        running = Lab(net, model, secret, config)
        running.start_server()
        for name in ("system-b", "system-c"):
            running.start_worker(name)
        for name in ("system-b", "system-c"):
            running.joined(name)
        read_until(running.server, "serving", 180, running.server_lines)
        yield running


@pytest.fixture(scope="module")
def reference(lab):
    """What transformers' own greedy generate makes of the prompt, as text."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(lab.model))
    model = AutoModelForCausalLM.from_pretrained(str(lab.model)).eval()
    inputs = torch.tensor([tokenizer(PROMPT, add_special_tokens=False)["input_ids"]])
    with torch.inference_mode():
        out = model.generate(inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=MAX_TOKENS,
                             do_sample=False)
    return tokenizer.decode(out[0, inputs.shape[1]:], skip_special_tokens=True)


def test_workers_find_the_coordinator_by_mdns_and_join(lab):
    plan = "".join(lab.server_lines)
    assert "system-b.local" in plan and "system-c.local" in plan
    assert all(seconds < 30 for seconds in lab.join_s.values()), lab.join_s
    rows = lab.status()["engines"]
    assert sorted(row["node"] for row in rows) == ["system-b.local", "system-c.local"]
    assert all(row.get("stage_index") is not None for row in rows)


def test_no_pc_resolves_the_configured_names(lab):
    """The lab is the office the README describes: `system-a.local` is only a name in config.yaml."""
    script = "import socket, sys; print(socket.gethostname()); socket.getaddrinfo(sys.argv[1], 80)"
    result = lab.net.run("system-b", [sys.executable, "-c", script, "system-a.local"], timeout_s=60)
    assert result.stdout.splitlines()[0] == "system-b"
    assert result.returncode != 0 and "gaierror" in result.stdout, result.stdout


def test_every_port_any_pc_listens_on_is_in_the_port_range(lab):
    """What the firewall rule opens is all exo-lab needs: every TCP socket listening beyond
    loopback, on every PC, is in network.port_range, or is the API's port on the coordinator."""
    for name in ("system-a", "system-b", "system-c"):
        ports = listening_ports(lab, name)
        allowed = set(range(PORT_RANGE[0], PORT_RANGE[1] + 1)) | ({API_PORT} if name == "system-a" else set())
        assert set(ports) <= allowed, (name, sorted(set(ports) - allowed))


def test_the_firewall_drops_what_is_not_allowed(lab):
    """The policy is real: a port outside the range (where an OS-chosen port lands) cannot be
    reached from another PC, one inside it can. exo-lab before port_range bound its stage
    inboxes and the controller's extra ports on such OS-chosen ports."""
    listener = ("import socket, sys, time; s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); "
                "s.bind(('0.0.0.0', int(sys.argv[1]))); s.listen(); print('listening', flush=True); time.sleep(60)")
    probe = ("import socket, sys\ntry:\n    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3).close(); print('open')\n"
             "except OSError as exc:\n    print('closed', type(exc).__name__)")
    target = lab.net.pcs["system-c"].address
    outside, inside = 41234, free_port_in_range(lab, "system-c")
    for port in (outside, inside):
        holder = lab.net.start("system-c", [sys.executable, "-c", listener, str(port)], stdout=subprocess.PIPE, text=True)
        try:
            read_until(holder, "listening", 30)
            answer = lab.net.run("system-b", [sys.executable, "-c", probe, target, str(port)], timeout_s=30).stdout.split()
            assert answer[0] == ("closed" if port == outside else "open"), (port, answer)
        finally:
            lab.net.stop(holder, timeout_s=5)


def free_port_in_range(lab, name: str) -> int:
    used = set(listening_ports(lab, name))
    return next(port for port in range(PORT_RANGE[1], PORT_RANGE[0], -1) if port not in used)


def test_compute_pcs_fetch_only_their_own_shard(lab):
    served = lab.storage_stats()
    total = sum(p.stat().st_size for p in lab.model.glob("*.safetensors"))
    rows = {row["node"]: row for row in lab.status()["engines"]}
    for name in ("system-b", "system-c"):
        fetched = served[lab.net.pcs[name].address]
        shard = rows[name + ".local"]["parameter_bytes"]
        # the shard's tensors, plus config, tokenizer, index and headers (a few hundred KB)
        assert shard <= fetched <= shard + 400_000, (name, fetched, shard)
        assert fetched < 0.8 * total


def test_generation_across_namespaces_is_token_exact(lab, reference):
    reply = lab.complete()
    assert reply.choices[0].text == reference


def test_a_rogue_frame_into_a_stage_inbox_is_dropped_and_counted(lab, reference):
    import zmq

    rows = {row["node"]: row for row in lab.status()["engines"]}
    before = rows["system-c.local"].get("dropped_messages", 0)
    ports = listening_ports(lab, "system-c")
    context = zmq.Context()
    try:
        for port in ports:
            rogue = context.socket(zmq.PUSH)
            rogue.linger = 0
            rogue.connect(f"tcp://{lab.net.pcs['system-c'].address}:{port}")
            rogue.send_multipart([b"EX\x02\x03" + b"\x00" * 8])   # a FREE of request 0, unsigned
            rogue.send_multipart([b"not a frame at all"])
            time.sleep(0.3)
            rogue.close()
    finally:
        context.term()
    assert lab.complete().choices[0].text == reference
    lab.wait_for(lambda s: any(r.get("node") == "system-c.local" and r.get("dropped_messages", 0) > before
                               for r in s["engines"]), 20, "counting the rogue frames")


FLOODER = """
import resource, socket, sys, time
host, port, count, hold_s, payload = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), bytes.fromhex(sys.argv[5])
resource.setrlimit(resource.RLIMIT_NOFILE, (count + 100, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
held = []
for _ in range(count):
    sock = socket.socket()
    sock.settimeout(2)
    try:
        sock.connect((host, port))
        sock.send(payload)
        held.append(sock)
    except OSError:
        sock.close()
print("ready", len(held), flush=True)
time.sleep(hold_s)
"""


def test_a_hostile_pc_flooding_a_stage_inbox_does_not_stop_the_pipeline(lab, reference):
    """system-d (on the LAN, inside the firewall's range) holds 1,100 connections to system-c's
    stage inbox, each stuck after 11 bytes of ZMTP's greeting: the pipeline still answers token
    for token and /health stays 200."""
    port = listening_ports(lab, "system-c")[0]      # a compute PC listens only on its stage inbox
    zmtp_start = (b"\xff" + bytes(8) + b"\x7f" + b"\x03").hex()
    flooder = lab.net.start("system-d", [sys.executable, "-c", FLOODER, lab.net.pcs["system-c"].address, str(port),
                                         "1100", "20", zmtp_start], stdout=subprocess.PIPE, text=True)
    try:
        ready = read_until(flooder, "ready", 60)[-1].split()
        assert int(ready[1]) > 0, ready
        started = time.monotonic()
        assert lab.complete().choices[0].text == reference
        answered_s = time.monotonic() - started
        with urllib.request.urlopen(lab.api + "/health", timeout=30) as response:
            assert response.status == 200
    finally:
        lab.net.stop(flooder, timeout_s=5)
    print(f"\nflood of {ready[1]} connections on system-c's inbox: a {MAX_TOKENS}-token answer in {answered_s:.2f} s")
    assert lab.complete().choices[0].text == reference


def listening_ports(lab, name: str) -> list[int]:
    """TCP ports a PC listens on from outside (not loopback-only sockets)."""
    out = lab.net.run(name, ["ss", "-ltnH"]).stdout
    ports = []
    for line in out.splitlines():
        local = line.split()[3]
        host, port = local.rsplit(":", 1)
        if not host.startswith("127.") and host != "[::1]":
            ports.append(int(port))
    assert ports, out
    return ports


def test_a_worker_with_a_wrong_secret_is_refused(lab):
    from exo_lab.security import new_secret

    result = lab.net.run("system-d", [sys.executable, "-m", "exo_lab.worker", "--config", str(lab.config)],
                         env={"EXO_LAB_SECRET": new_secret()}, timeout_s=60)
    lines = result.stdout.strip().splitlines()
    assert result.returncode == 2, result.stdout
    assert len(lines) == 1 and "refused" in lines[0] and "secret" in lines[0], lines
    read_until(lab.server, "refused a worker", 10, lab.server_lines)
    assert len(lab.status()["engines"]) == 2


def test_a_late_pc_is_a_spare_and_a_restarted_worker_rejoins(lab, reference):
    lab.start_worker("system-d")              # not in the config: discovery: auto takes it in
    lab.joined("system-d")
    assert lab.join_s["system-d"] < 10      # the coordinator is up: mDNS browse + join handshake
    lab.wait_for(lambda s: any(r.get("node") == "system-d" and r["state"] == "spare" for r in s["engines"]),
                 60, "system-d showing as a spare")
    lab.net.stop(lab.workers["system-b"])     # its engine goes with it: the pipeline fails
    # replan: auto re-plans on the survivors, system-d fetching its own shard through the firewall
    lab.wait_for(lambda s: s["state"] == "ready" and {r.get("node") for r in s["engines"]
                                                       if r.get("stage_index") is not None} == {"system-c.local", "system-d"},
                 120, "re-planning on system-c and system-d")
    assert lab.complete().choices[0].text == reference
    lab.start_worker("system-b")              # restarted: it finds and joins the cluster again
    lab.joined("system-b")
    lab.wait_for(lambda s: any(r.get("node") == "system-b.local" and r["state"] == "spare" for r in s["engines"]),
                 60, "the restarted system-b rejoining")
    assert lab.complete().choices[0].text == reference


def test_an_other_cluster_name_on_the_same_lan_is_never_seen(lab):
    script = ("import asyncio, os, sys; from exo_lab.membership.discovery import browse; "
              "secret = os.environ['EXO_LAB_SECRET'].encode(); "
              "own = asyncio.run(browse(sys.argv[1], secret, 10)); "
              "other = asyncio.run(browse('other-' + sys.argv[1], secret, 3)); "
              "print(len(own), own[0].proof_ok if own else None, len(other))")
    name = lab.config.read_text().split()[1]
    result = lab.net.run("system-d", [sys.executable, "-c", script, name], env={"EXO_LAB_SECRET": lab.secret},
                         timeout_s=60)
    assert result.stdout.split()[-3:] == ["1", "True", "0"], result.stdout


def test_a_pc_whose_link_goes_down_is_replaced_and_its_stream_goes_on(lab):
    """`ip link set eth0 down` on a stage's PC mid-stream: the heartbeat drops its engine, the
    coordinator re-plans on the spare and the other survivor, the stream replays and goes on,
    token for token the uninterrupted answer. Prints the times to detect and to resume."""
    import threading

    from openai import OpenAI

    from exo_lab.membership.launch import HEARTBEAT_MISSES, HEARTBEAT_PERIOD_MS

    max_tokens = 400
    uninterrupted = lab.complete(max_tokens=max_tokens).choices[0].text
    stages = {r["node"]: r["stage_index"] for r in lab.status()["engines"] if r.get("stage_index") is not None}
    spare = next(r["node"] for r in lab.status()["engines"] if r.get("stage_index") is None)
    victim = min(stages, key=stages.get)          # the first stage's PC
    client = OpenAI(base_url=lab.api + "/v1", api_key="unused", max_retries=0, timeout=120)
    arrivals: list[tuple[float, str]] = []
    started = threading.Event()

    def stream():
        for chunk in client.completions.create(model=str(lab.model), prompt=PROMPT, max_tokens=max_tokens,
                                               temperature=0, stream=True):
            arrivals.append((time.monotonic(), chunk.choices[0].text if chunk.choices else ""))
            if len(arrivals) == 20:
                started.set()

    reader = threading.Thread(target=stream)
    reader.start()
    namespace = lab.net.pcs[victim.removesuffix(".local")].namespace
    try:
        assert started.wait(60), "the stream never started"
        down_at = time.monotonic()
        subprocess.run(["ip", "-n", namespace, "link", "set", "eth0", "down"], check=True)
        read_until(lab.server, "pipeline lost", 60, lab.server_lines)
        detected_s = time.monotonic() - down_at
        read_until(lab.server, "failed over", 120, lab.server_lines)
        reader.join(180)
    finally:
        subprocess.run(["ip", "-n", namespace, "link", "set", "eth0", "up"], check=False)
    assert not reader.is_alive()
    times = [t for t, _ in arrivals]
    stall = max(range(1, len(times)), key=lambda i: times[i] - times[i - 1])   # the pause
    assert times[-1] > down_at + detected_s, "the stream ended before the failover: it was too short"
    resumed_s, pause_s = times[stall] - down_at, times[stall] - times[stall - 1]
    assert "".join(text for _, text in arrivals) == uninterrupted
    heartbeat_s = HEARTBEAT_PERIOD_MS * HEARTBEAT_MISSES / 1000
    print(f"\nlink down on {victim} (stage 0): detected in {detected_s:.1f} s (heartbeat {heartbeat_s:.0f} s), "
          f"next token {resumed_s:.1f} s after it went down (the stream paused {pause_s:.1f} s)")
    assert detected_s <= heartbeat_s + 3.0, (detected_s, heartbeat_s)
    status = lab.status()
    assert {r["node"] for r in status["engines"] if r.get("stage_index") is not None} == set(stages) - {victim} | {spare}
