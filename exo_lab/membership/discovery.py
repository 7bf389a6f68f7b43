"""Finding and joining a cluster: the coordinator's mDNS advert and join service, the worker's side.

The coordinator advertises ``_exo-lab._tcp.local.`` (python-zeroconf's async API, on the
cluster's loop) with TXT fields: the cluster name, its ports and a proof that it holds the
cluster secret (an HMAC under ``derive_key(secret, "discovery-proof")`` over the other fields, a
timestamp and a nonce). A worker (``python -m exo_lab.worker``) browses for the advert of its
cluster name, or in ``discovery: manual`` takes the coordinator's ``address`` from the config,
then *joins*: it POSTs to the coordinator's join service a request signed the same way. The
coordinator refuses (403, and logs it) a request signed with another secret; otherwise it
answers, signed too, with what the worker cannot derive itself: the controller's public
connection info (ports, wire settings: the key is derived from the secret on each PC) and where
the storage PC serves model files. Nothing secret crosses the network.

Both directions carry fresh nonces and timestamps and the join request's nonce is remembered,
so a recorded request or answer cannot be replayed. The advert's proof only lets a worker skip
adverts of other clusters (and impostors) before it asks; the join is what admits it.
"""
from __future__ import annotations

import asyncio
import json
import logging
import secrets
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

from .. import security
from ..errors import ClusterError, ExoLabError

logger = logging.getLogger(__name__)

SERVICE_TYPE = "_exo-lab._tcp.local."
JOIN_PATH = "/exo-lab/join"
PROOF_PURPOSE = "discovery-proof"
PROOF_HEADER = "X-Exo-Lab-Proof"
MAX_JOIN_BODY_BYTES = 4096
ADVERT_REFRESH_S = 60.0         # the advert's timestamp is renewed this often


class SecretRefused(ExoLabError):
    """The coordinator refused this PC: it holds another cluster secret."""


# ----------------------------------------------------------------------------- proofs

def _canonical(label: str, fields: dict) -> bytes:
    return (label + "\n" + json.dumps(fields, sort_keys=True, separators=(",", ":"))).encode()


def sign(secret: bytes, label: str, fields: dict) -> str:
    """The proof of ``fields`` under the secret's discovery key (:func:`exo_lab.security.sign`);
    ``label`` ("advert", "join", "welcome") keeps a proof made for one message from being
    reused as another."""
    return security.sign(secret, PROOF_PURPOSE, _canonical(label, fields))


def verify(secret: bytes, label: str, fields: dict, proof: str) -> bool:
    return security.signature_ok(secret, PROOF_PURPOSE, _canonical(label, fields), proof)


def _stamp() -> dict:
    ts, nonce = security.new_stamp()
    return {"ts": ts, "nonce": nonce}


# ----------------------------------------------------------------------------- coordinator: advert

@dataclass(frozen=True)
class AdvertPorts:
    join_port: int          # the coordinator's join (and, with the storage role, file) service
    controller_port: int    # ipyparallel registration
    api_port: int
    storage_port: int | None


def advert_properties(secret: bytes, cluster_name: str, ports: AdvertPorts) -> dict[str, str]:
    """The TXT fields of the advert, proof included."""
    fields = {"cluster": cluster_name, "join": str(ports.join_port), "controller": str(ports.controller_port),
              "api": str(ports.api_port), "storage": str(ports.storage_port or ""), **_stamp()}
    return {**fields, "proof": sign(secret, "advert", fields)}


def lan_addresses() -> list[str]:
    """This PC's IPv4 addresses other than loopback (what the advert points at)."""
    import ifaddr

    found = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if isinstance(ip.ip, str) and not ip.ip.startswith("127.") and ip.ip not in found:
                found.append(ip.ip)
    return found


class Advertiser:
    """The coordinator's mDNS advert, on the cluster's loop (zeroconf's sync calls raise inside
    a running loop, such as a notebook kernel's). Renews its timestamped proof periodically."""

    def __init__(self, secret: bytes, cluster_name: str, ports: AdvertPorts):
        self.secret = secret
        self.cluster_name = cluster_name
        self.ports = ports
        self._zeroconf = None
        self._info = None
        self._refresher: asyncio.Task | None = None

    async def start(self) -> None:
        from zeroconf import IPVersion
        from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

        addresses = lan_addresses()
        if not addresses:
            raise ClusterError("discovery: auto needs a network interface with an IPv4 address "
                               "besides loopback; none is up")
        tag = secrets.token_hex(4)
        self._zeroconf = AsyncZeroconf(ip_version=IPVersion.V4Only)
        self._info = AsyncServiceInfo(
            SERVICE_TYPE, f"{self.cluster_name[:50]}-{tag}.{SERVICE_TYPE}",
            addresses=[socket.inet_aton(a) for a in addresses], port=self.ports.join_port,
            properties=advert_properties(self.secret, self.cluster_name, self.ports),
            server=f"exo-lab-{tag}.local.")
        await (await self._zeroconf.async_register_service(self._info))
        self._refresher = asyncio.ensure_future(self._refresh())
        logger.info("advertising cluster %s on %s (join port %d)", self.cluster_name,
                    ", ".join(addresses), self.ports.join_port)

    async def _refresh(self) -> None:
        while True:
            await asyncio.sleep(ADVERT_REFRESH_S)
            self._info.properties = advert_properties(self.secret, self.cluster_name, self.ports)
            await (await self._zeroconf.async_update_service(self._info))

    async def close(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
        if self._zeroconf is not None:
            try:
                await (await self._zeroconf.async_unregister_service(self._info))
            finally:
                await self._zeroconf.async_close()
            self._zeroconf = None


# ----------------------------------------------------------------------------- coordinator: join

@dataclass
class JoinState:
    """What the join service answers with, and what it learns."""

    secret: bytes
    cluster_name: str
    connection: dict                  # launch.public_connection_info: ports, no key
    storage: dict | None              # service.storage_location: {"host", "device", "port"}
    on_address: object = None         # callback(local address a worker reached us at)
    refused: int = 0
    joined: int = 0
    joined_from: dict = field(default_factory=dict)   # device name -> the address it joined from

    def storage_reply(self) -> dict | None:
        """Where a joining worker fetches model files: the coordinator (host None), the storage
        PC's configured address, else the address its own worker joined from, else its name
        (which must then resolve: the storage PC's worker was not up yet)."""
        if self.storage is None or self.storage["host"] is not None or self.storage["device"] is None:
            return self.storage
        from ..config import same_host

        device = self.storage["device"]
        seen = next((ip for name, ip in self.joined_from.items() if same_host(name, device)), None)
        return {**self.storage, "host": seen or device}


def join_handler_class():
    import tornado.web

    class JoinHandler(tornado.web.RequestHandler):
        """POST /exo-lab/join: admit a worker that proves it holds the cluster secret."""

        def initialize(self, state: JoinState, nonces: security.Nonces):
            self.state = state
            self.nonces = nonces

        def check_xsrf_cookie(self):   # not a browser endpoint: the HMAC is the check
            pass

        def post(self):
            body = self.request.body
            try:
                if len(body) > MAX_JOIN_BODY_BYTES:
                    raise ValueError("too large")
                fields = json.loads(body)
                if not isinstance(fields, dict) or not all(isinstance(v, str) for v in fields.values()):
                    raise ValueError("not a flat object of strings")
            except ValueError:
                self.set_status(400)
                self.finish({"error": "a join request is a small JSON object of strings"})
                return
            who = f"{fields.get('device', '?')!r} from {self.request.remote_ip}"
            if fields.get("cluster") != self.state.cluster_name:
                self.set_status(409)
                self.finish({"error": f"this is cluster {self.state.cluster_name!r}, not "
                                      f"{fields.get('cluster')!r}"})
                return
            proof = self.request.headers.get(PROOF_HEADER, "")
            if not verify(self.state.secret, "join", fields, proof):
                self.state.refused += 1
                logger.warning("refused a worker (device %s): it does not hold this cluster's secret", who)
                self.set_status(403)
                self.finish({"error": "secret", "message": "this PC's cluster secret differs from the coordinator's"})
                return
            if not self.nonces.accept(fields.get("ts"), fields.get("nonce")):
                logger.warning("refused a replayed or stale join request (device %s)", who)
                self.set_status(403)
                self.finish({"error": "stale", "message": "a join request must be fresh: check the clocks"})
                return
            self.state.joined += 1
            self.state.joined_from[fields.get("device", "")] = self.request.remote_ip
            local = self.request.connection.stream.socket.getsockname()[0]
            if self.state.on_address is not None:
                self.state.on_address(local)
            logger.info("worker %s joined", who)
            reply = {"cluster": self.state.cluster_name, "connection": json.dumps(self.state.connection),
                     "storage": json.dumps(self.state.storage_reply()), "your_address": self.request.remote_ip,
                     "coordinator_address": local, "request_nonce": fields["nonce"], **_stamp()}
            self.set_header(PROOF_HEADER, sign(self.state.secret, "welcome", reply))
            self.finish(reply)

    return JoinHandler


# ----------------------------------------------------------------------------- worker side

@dataclass(frozen=True)
class Found:
    """A coordinator advert of our cluster name."""

    addresses: tuple[str, ...]
    join_port: int
    proof_ok: bool


async def browse(cluster_name: str, secret: bytes, timeout_s: float) -> list[Found]:
    """Adverts of ``cluster_name`` seen within ``timeout_s`` (returns as soon as one with a
    valid proof is found). Adverts of other cluster names are skipped."""
    from zeroconf import IPVersion, ServiceStateChange
    from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

    names: asyncio.Queue = asyncio.Queue()

    def on_change(zeroconf, service_type, name, state_change):
        if state_change in (ServiceStateChange.Added, ServiceStateChange.Updated):
            names.put_nowait(name)

    zeroconf = AsyncZeroconf(ip_version=IPVersion.V4Only)
    browser = AsyncServiceBrowser(zeroconf.zeroconf, SERVICE_TYPE, handlers=[on_change])
    found: list[Found] = []
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline and not any(f.proof_ok for f in found):
            if found:    # only adverts whose proof fails so far: wait briefly for a good one
                deadline = min(deadline, time.monotonic() + 2.0)
            try:
                name = await asyncio.wait_for(names.get(), max(0.05, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                break
            info = AsyncServiceInfo(SERVICE_TYPE, name)
            if not await info.async_request(zeroconf.zeroconf, 3000):
                continue
            candidate = _parse_advert(info, cluster_name, secret)
            if candidate is not None:
                found.append(candidate)
    finally:
        await browser.async_cancel()
        await zeroconf.async_close()
    return found


def _parse_advert(info, cluster_name: str, secret: bytes) -> Found | None:
    fields = {k.decode(errors="replace"): (v or b"").decode(errors="replace")
              for k, v in (info.properties or {}).items()}
    if fields.get("cluster") != cluster_name:
        return None
    proof = fields.pop("proof", "")
    addresses = tuple(info.parsed_addresses())
    try:
        port = int(fields.get("join", ""))
    except ValueError:
        return None
    return Found(addresses=addresses, join_port=port, proof_ok=verify(secret, "advert", fields, proof))


def discover(cluster_name: str, secret: bytes, timeout_s: float = 15.0) -> Found:
    """The coordinator of ``cluster_name`` on this LAN. Prefers an advert whose proof checks;
    one whose proof fails is still returned (joining it gets the coordinator's refusal)."""
    from ..coordinator.loop import run

    found = run(browse(cluster_name, secret, timeout_s))
    good = [f for f in found if f.proof_ok]
    if good or found:
        return (good or found)[0]
    raise ClusterError(f"no coordinator of cluster {cluster_name!r} answered on the LAN within "
                       f"{timeout_s:.0f} s (mDNS, {SERVICE_TYPE}); is `python -m exo_lab.server` running "
                       f"there, is UDP port 5353 open, or set network.discovery: manual with the "
                       f"coordinator's address")


@dataclass(frozen=True)
class Welcome:
    """The coordinator's answer to a join."""

    coordinator: str          # the address this worker reached it at
    your_address: str         # this PC's address as the coordinator saw it
    connection: dict          # public engine connection info (no key)
    storage_url: str | None   # where model files come from, or None


def join(host: str, port: int, cluster_name: str, device: str, secret: bytes,
         timeout_s: float = 10.0) -> Welcome:
    """Ask the coordinator at ``host:port`` to admit this PC. Raises SecretRefused when it holds
    another secret, ClusterError when it cannot be reached or its answer does not check."""
    fields = {"cluster": cluster_name, "device": device, "hostname": socket.gethostname(), **_stamp()}
    body = json.dumps(fields).encode()
    url = f"http://{host}:{port}{JOIN_PATH}"
    request = urllib.request.Request(url, data=body, method="POST", headers={
        "Content-Type": "application/json", PROOF_HEADER: sign(secret, "join", fields)})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            reply, proof = json.loads(response.read()), response.headers.get(PROOF_HEADER, "")
    except urllib.error.HTTPError as exc:
        raise _join_error(exc, host, port) from None
    except (OSError, ValueError) as exc:
        raise ClusterError(f"cannot join the coordinator at {host}:{port}: {exc}") from exc
    if not (isinstance(reply, dict) and verify(secret, "welcome", reply, proof)
            and reply.get("request_nonce") == fields["nonce"] and security.stamp_fresh(reply.get("ts"))):
        raise ClusterError(f"the answer of {host}:{port} does not carry this cluster's proof; "
                           f"another service answers there")
    storage = json.loads(reply["storage"])
    storage_url = (f"http://{storage.get('host') or host}:{storage['port']}" if storage else None)
    return Welcome(coordinator=host, your_address=reply["your_address"],
                   connection=json.loads(reply["connection"]), storage_url=storage_url)


def _join_error(exc, host: str, port: int) -> ExoLabError:
    try:
        reason = json.loads(exc.read()).get("error")
    except (OSError, ValueError, AttributeError):
        reason = None
    if exc.code == 403 and reason == "secret":
        return SecretRefused(f"the coordinator at {host}:{port} refused this PC because of the "
                             f"cluster secret: this PC's differs from the coordinator's (check "
                             f"network.secret_file / $EXO_LAB_SECRET)")
    return ClusterError(f"the coordinator at {host}:{port} refused to join this PC "
                        f"(HTTP {exc.code}{': ' + reason if reason else ''})")
