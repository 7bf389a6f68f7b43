"""Netlab: several "PCs" on this machine, as network namespaces on a private bridge.

Each PC is a network namespace with one veth on a bridge of its own (no physical interface on
it) and an address from 198.18.0.0/15, the range reserved for benchmark networks; the bridge
gets ``.1`` so the test process can reach the PCs. Multicast is on (mDNS works between them).
Each process starts with ``ip netns exec`` inside ``unshare -m -u``: its own host name, and its
own mount namespace where folders it must not see (the model) are covered by an empty tmpfs.

Names carry a random run id and the creating pid, so a leftover never collides with a new run,
and a run sweeps away what a killed run (whose pid is gone) left. Whatever happens (a failing
test, Ctrl-C), :meth:`Netlab.close` ends the processes by pid, then the namespaces and the
bridge; it also runs at interpreter exit. Nothing here ever sends to an address outside this
machine: every address used is on the lab's own bridge.

Host names are what real PCs have: short (``system-b``), while configs may say ``system-b.local``,
which nothing here resolves (no mDNS resolver in the namespaces' libc). :meth:`Netlab.firewall`
puts a PC behind an nftables input policy of drop, as an office PC's firewall: only established
traffic, loopback and the ports given get in.

A PC may have a hard memory limit (:meth:`Netlab.limit_memory`): a cgroup v1 memory group of
its own, as a PC has its RAM, that every process started on it joins; the kernel charges what they
use (page cache included) and OOM-kills past the limit. Its processes see the memory controller
mounted at /sys/fs/cgroup/memory, as in a container. :meth:`Netlab.memory` reads the peak
charge and the OOM kills.

Needs root (or CAP_NET_ADMIN + CAP_SYS_ADMIN) and iproute2; :func:`unavailable` says why not;
:func:`firewall_unavailable` says why the firewall cannot be used (nftables missing);
:func:`memory_unavailable` why memory limits cannot be used.
"""
from __future__ import annotations

import atexit
import functools
import ipaddress
import os
import re
import secrets
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import procs

NETLAB_RANGE = ipaddress.ip_network("198.18.0.0/15")
PREFIX = "exolab"
MEMORY_CGROUPS = Path("/sys/fs/cgroup/memory")
# the end of a lab's config.yaml: mDNS discovery, the secret beside it, the API on every address
LAN_CONFIG_END = """\
network:
  discovery: auto
  secret_file: secret.txt
api:
  host: 0.0.0.0
  port: {api_port}
"""

# The seed's office on the netlab: system-a coordinates and stores the model, system-b and
# system-c compute with one core each (format: name, replan, api_port).
OFFICE_CONFIG = """\
cluster_name: {name}
replan: {replan}
devices:
  - hostname: system-a.local
    roles: [coordinator, storage]
  - hostname: system-b.local
    roles: [compute]
    max_cores: 1
  - hostname: system-c.local
    roles: [compute]
    max_cores: 1
""" + LAN_CONFIG_END


def skip_unless_required(reason: str | None, what: str = "netlab tests"):
    """A netlab module's pytestmark (the module keeps ``reason`` as its ``REASON``): skipped where
    ``reason`` says the lab cannot run here, except under CI's EXO_LAB_REQUIRE_NETLAB=1, where
    the ``netlab_required`` fixture (tests/conftest.py, :func:`require`) fails its tests instead."""
    import pytest

    required = os.environ.get("EXO_LAB_REQUIRE_NETLAB") == "1"
    return [pytest.mark.skipif(reason is not None and not required, reason=f"{what} skipped: {reason}"),
            pytest.mark.usefixtures("netlab_required")]


def require(reason: str | None) -> None:
    """Fail the test when the lab cannot run (reached only under EXO_LAB_REQUIRE_NETLAB=1)."""
    if reason is not None:
        import pytest

        pytest.fail(f"EXO_LAB_REQUIRE_NETLAB=1 but {reason}")


def memory_unavailable() -> str | None:
    """Why PCs cannot get memory limits here (no cgroup v1 memory controller), or None."""
    if not (MEMORY_CGROUPS / "cgroup.procs").exists():
        return f"no cgroup v1 memory controller at {MEMORY_CGROUPS}"
    if not os.access(MEMORY_CGROUPS, os.W_OK):
        return f"{MEMORY_CGROUPS} is not writable (needs root)"
    return None


def _ip(*args: str, check: bool = True, namespace: str | None = None) -> subprocess.CompletedProcess:
    command = ["ip", *(["-n", namespace] if namespace else []), *args]
    return subprocess.run(command, check=check, capture_output=True, text=True, timeout=30)


def unavailable() -> str | None:
    """Why netlab cannot run here, or None when it can."""
    if os.name != "posix" or not hasattr(os, "geteuid"):
        return "netlab needs Linux network namespaces"
    if os.geteuid() != 0:
        return "netlab needs root to create network namespaces (CI runs as root)"
    for tool in ("ip", "unshare", "mount"):
        if shutil.which(tool) is None:
            return f"netlab needs the {tool!r} command (iproute2 / util-linux)"
    probe = f"{PREFIX}-probe-{os.getpid()}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"`ip netns add` is not allowed here: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


def firewall_unavailable() -> str | None:
    """Why :meth:`Netlab.firewall` cannot run here, or None when it can."""
    if shutil.which("nft") is None:
        return "the firewall tests need nftables (`apt-get install nftables`; .ci/run installs it)"
    return None


def firewall_rules(tcp_ports: list[str], udp_ports: list[str]) -> str:
    """An nftables ruleset: input dropped unless established, loopback, or one of the ports
    (each a port or a range ``a-b``)."""
    accept = [f"        tcp dport {{ {', '.join(tcp_ports)} }} accept"] if tcp_ports else []
    accept += [f"        udp dport {{ {', '.join(udp_ports)} }} accept"] if udp_ports else []
    return "\n".join([
        "table inet exolab_firewall {",
        "    chain input {",
        "        type filter hook input priority 0; policy drop;",
        "        ct state established,related accept",
        '        iif "lo" accept',
        *accept,
        "    }",
        "}", ""])


@dataclass
class PC:
    """One namespace "PC": its name (also its host name), namespace, address and folders."""

    name: str
    namespace: str
    address: str
    root: Path                         # home, cache, profiles of this PC live here
    processes: list = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        """An environment for a process of this PC (its own HOME and caches)."""
        keep = {k: v for k, v in os.environ.items()
                if not k.startswith(("EXO_LAB_", "IPP_")) and k not in ("HOME",)}
        return {**keep, "HOME": str(self.root / "home"), "EXO_LAB_CACHE": str(self.root / "cache"),
                "EXO_LAB_HOME": str(self.root / "exo_lab"), "PYTHONUNBUFFERED": "1"}


class Netlab:
    """N PCs on a bridge. Use as a context manager; :meth:`start` runs a process on a PC."""

    def __init__(self, names: list[str], root: Path):
        self.run_id = secrets.token_hex(3)
        self.tag = f"{PREFIX}-{self.run_id}-{os.getpid()}"
        self.root = Path(root)
        self.bridge = f"exb{self.run_id}"
        self.subnet = _free_subnet()
        hosts = list(self.subnet.hosts())
        self.gateway = str(hosts[0])
        self.pcs = {name: PC(name, f"{self.tag}-{i}", str(hosts[10 + i]), self.root / name)
                    for i, name in enumerate(names)}
        self._made: list[tuple[str, str]] = []   # ("netns", name) / ("link", name), to remove
        self._cgroups: dict[str, Path] = {}      # PC name -> its memory cgroup
        self._closed = False

    # ------------------------------------------------------------ network
    def __enter__(self) -> "Netlab":
        atexit.register(self.close)
        sweep_leftovers()
        try:
            self._make_bridge()
            for index, pc in enumerate(self.pcs.values()):
                self._make_pc(index, pc)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _make_bridge(self) -> None:
        _ip("link", "add", self.bridge, "type", "bridge")
        self._made.append(("link", self.bridge))
        _ip("link", "set", self.bridge, "alias", self.tag)
        _ip("addr", "add", f"{self.gateway}/{self.subnet.prefixlen}", "dev", self.bridge)
        _ip("link", "set", self.bridge, "multicast", "on", "up")

    def _make_pc(self, index: int, pc: PC) -> None:
        for folder in ("home", "cache", "exo_lab"):
            (pc.root / folder).mkdir(parents=True, exist_ok=True)
        _ip("netns", "add", pc.namespace)
        self._made.append(("netns", pc.namespace))
        outer, inner = f"exv{self.run_id}{index}", f"exp{self.run_id}{index}"
        _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
        self._made.append(("link", outer))
        _ip("link", "set", inner, "netns", pc.namespace)
        _ip("link", "set", outer, "master", self.bridge, "multicast", "on", "up")
        ns = pc.namespace
        _ip("link", "set", "lo", "up", namespace=ns)
        _ip("link", "set", inner, "name", "eth0", namespace=ns)
        _ip("addr", "add", f"{pc.address}/{self.subnet.prefixlen}", "dev", "eth0", namespace=ns)
        _ip("link", "set", "eth0", "multicast", "on", "up", namespace=ns)
        _ip("route", "add", "224.0.0.0/4", "dev", "eth0", namespace=ns)

    def firewall(self, name: str, *, tcp_ports: list[str], udp_ports: list[str] = ()) -> None:
        """Put PC ``name`` behind a default-drop input policy that lets in only ``tcp_ports`` and
        ``udp_ports`` (and established traffic, loopback). Replaces an earlier one."""
        namespace = self.pcs[name].namespace
        subprocess.run(["ip", "netns", "exec", namespace, "nft", "flush", "ruleset"], check=True, timeout=30)
        subprocess.run(["ip", "netns", "exec", namespace, "nft", "-f", "-"], check=True, timeout=30,
                       input=firewall_rules(list(tcp_ports), list(udp_ports)), text=True, capture_output=True)

    def limit_memory(self, name: str, limit_bytes: int) -> None:
        """Give PC ``name`` a hard memory limit: processes started on it from now on are charged
        to a memory cgroup of its own (a lower limit may be set later, while they run)."""
        group = self._cgroups.get(name)
        if group is None:
            group = self._cgroups[name] = MEMORY_CGROUPS / f"{self.tag}-{name}"
            group.mkdir()
        (group / "memory.limit_in_bytes").write_text(str(int(limit_bytes)))

    def leave_free(self, name: str, free_bytes: int) -> int:
        """Lower PC ``name``'s limit so that ``free_bytes`` stay free beside what its processes
        hold now (the page cache the kernel reclaims counted as free, as an engine counts it:
        exo_lab.engine.room.reclaimable), as when its owner opens
        a big program; returns the new limit. The kernel refuses (EBUSY) a limit it cannot
        reclaim down to: each refusal tries 8 MiB higher."""
        from exo_lab.engine.room import reclaimable

        group = self._cgroups[name]
        stat = {key: int(value) for key, value in
                (line.split() for line in (group / "memory.stat").read_text().splitlines())}
        held = int((group / "memory.usage_in_bytes").read_text()) - reclaimable(stat, 1)
        for extra in range(0, 64 * 2**20, 8 * 2**20):
            limit = held + free_bytes + extra
            try:
                (group / "memory.limit_in_bytes").write_text(str(limit))
                return limit
            except OSError:
                continue
        raise RuntimeError(f"the kernel refused every limit near {held + free_bytes} for {name}")

    def memory(self, name: str) -> dict[str, int]:
        """PC ``name``'s limit, charge now, peak charge and OOM kills (its memory cgroup)."""
        group = self._cgroups[name]
        control = dict(line.split() for line in (group / "memory.oom_control").read_text().splitlines())
        return {"limit": int((group / "memory.limit_in_bytes").read_text()),
                "usage": int((group / "memory.usage_in_bytes").read_text()),
                "peak": int((group / "memory.max_usage_in_bytes").read_text()),
                "oom_kills": int(control.get("oom_kill", 0))}

    # ------------------------------------------------------------ processes
    def start(self, name: str, argv: list[str], *, env: dict | None = None, hide: tuple = (),
              **popen) -> subprocess.Popen:
        """Run ``argv`` on PC ``name`` (its namespaces, host name and environment); ``hide``:
        folders covered by an empty tmpfs in its mount namespace."""
        pc = self.pcs[name]
        mounts = "".join(f'mount -t tmpfs -o size=1m exolab-hidden "{Path(h)}" && ' for h in hide)
        group = self._cgroups.get(name)
        if group is not None:       # joined before `ip netns exec`, which mounts a /sys of its own
            popen["preexec_fn"] = functools.partial(_join_cgroup, group)
            # and the PC sees its cgroup files, as in a container
            mounts += ("mount -t tmpfs -o size=1m exolab-cgroup /sys/fs/cgroup && mkdir /sys/fs/cgroup/memory && "
                       "mount -t cgroup -o memory exolab-memory /sys/fs/cgroup/memory && ")
        script = f'hostname "{pc.name}" && {mounts}exec "$@"'
        command = ["ip", "netns", "exec", pc.namespace, "unshare", "--mount", "--uts", "--propagation",
                   "private", "sh", "-c", script, "sh", *argv]
        process = subprocess.Popen(command, env={**pc.env, **(env or {})}, **popen)
        pc.processes.append(process)
        return process

    def run(self, name: str, argv: list[str], timeout_s: float = 30, **kwargs) -> subprocess.CompletedProcess:
        process = self.start(name, argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)
        out, _ = process.communicate(timeout=timeout_s)
        return subprocess.CompletedProcess(argv, process.returncode, out, None)

    def stop(self, process: subprocess.Popen, timeout_s: float = 30) -> None:
        """SIGTERM, then SIGKILL after ``timeout_s``."""
        procs.stop(process, timeout_s)

    def pids(self, name: str) -> list[int]:
        """Every process living in PC ``name``'s network namespace."""
        found = _ip("netns", "pids", self.pcs[name].namespace, check=False)
        return [int(p) for p in found.stdout.split()] if found.returncode == 0 else []

    # ------------------------------------------------------------ cleanup
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        processes = [p for pc in self.pcs.values() for p in pc.processes if p.poll() is None]
        for process in processes:          # all at once: each may take seconds to wind down
            process.send_signal(signal.SIGTERM)
        for process in processes:
            self.stop(process, timeout_s=15)
        for kind, name in reversed(self._made):
            if kind == "netns":
                _end_processes(name)
                _ip("netns", "del", name, check=False)
            else:
                _ip("link", "del", name, check=False)
        for group in self._cgroups.values():
            _remove_cgroup(group)
        atexit.unregister(self.close)


def _end_processes(namespace: str) -> None:
    """End, by pid, whatever still runs in a namespace (engines of a worker killed with -9)."""
    for sig, wait_s in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 2.0)):
        found = _ip("netns", "pids", namespace, check=False)
        pids = [int(p) for p in found.stdout.split()] if found.returncode == 0 else []
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.1)


def _join_cgroup(group: Path) -> None:
    (group / "cgroup.procs").write_text(str(os.getpid()))


def _remove_cgroup(group: Path) -> None:
    """Remove a memory cgroup once its processes are gone (they are ended before)."""
    deadline = time.monotonic() + 10
    while group.exists():
        try:
            group.rmdir()
        except OSError:
            if time.monotonic() > deadline:
                return
            time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def _free_subnet() -> ipaddress.IPv4Network:
    """A /24 of 198.18.0.0/15 that no route of this machine uses yet."""
    used = _ip("-4", "route", "show").stdout
    subnets = list(NETLAB_RANGE.subnets(new_prefix=24))[1:]
    for _ in range(100):
        subnet = subnets[secrets.randbelow(len(subnets))]
        if str(subnet.network_address).rsplit(".", 1)[0] + "." not in used:
            return subnet
    raise RuntimeError("no free /24 left in 198.18.0.0/15")


def sweep_leftovers() -> None:
    """Remove namespaces and bridges of earlier runs whose creating process is gone."""
    pattern = re.compile(rf"^{PREFIX}-[0-9a-f]{{6}}-(\d+)-\d+$")
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        match = pattern.match(name)
        if match and not _alive(int(match.group(1))):
            _end_processes(name)
            _ip("netns", "del", name, check=False)
    links = _ip("-o", "link", "show", "type", "bridge", check=False).stdout
    for line in links.splitlines():
        found = re.search(rf"\d+: (exb[0-9a-f]{{6}})[:@].*alias {PREFIX}-[0-9a-f]{{6}}-(\d+)", line)
        if found and not _alive(int(found.group(2))):
            _ip("link", "del", found.group(1), check=False)
    if MEMORY_CGROUPS.exists():
        for group in MEMORY_CGROUPS.glob(f"{PREFIX}-*"):
            match = re.match(rf"^{PREFIX}-[0-9a-f]{{6}}-(\d+)-", group.name)
            if match and not _alive(int(match.group(1))) and not (group / "cgroup.procs").read_text().strip():
                _remove_cgroup(group)
