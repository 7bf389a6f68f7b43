"""The HTTP service other PCs talk to, and the coordinator's advert.

On the coordinator: ``/exo-lab/join`` (:mod:`.discovery`), the model files when this PC has the
storage role (:mod:`.storage`), and with ``discovery: auto`` the mDNS advert. On a storage PC
that is not the coordinator (its worker runs it): the model files only. Both listen on
``network.service_port`` on every interface, so they run only with a cluster secret.

Bounded as every exo-lab HTTP server is (:mod:`exo_lab.httpguard`): ``SERVICE_LIMITS``. Few
PCs talk to it (a join each, one keep-alive file connection per engine), and a join's body is
small, so its cap and timeouts are tighter than the API's.
"""
from __future__ import annotations

import logging

from ..config import ClusterConfig, DeviceConfig
from ..errors import ClusterError
from ..httpguard import GuardedHTTPServer, HttpLimits, bind_sockets
from ..security import Nonces
from .discovery import AdvertPorts, Advertiser, JoinState, join_handler_class
from .storage import ModelStore, storage_handlers

logger = logging.getLogger(__name__)

SERVICE_LIMITS = HttpLimits(max_connections=64, header_timeout_s=10.0, body_timeout_s=10.0)
MAX_SERVICE_BODY_BYTES = 1 << 16


class PeerService:
    """A tornado server on ``service_port`` (and the advert, when given ports to advertise)."""

    def __init__(self, config: ClusterConfig, secret: bytes, *, join: JoinState | None, storage: bool,
                 host: str = "0.0.0.0"):
        self.config = config
        self.secret = secret
        self.join = join
        self.store = ModelStore(secret) if storage else None
        self.host = host
        self.port = config.network.service_port
        self._server = None
        self._advertiser: Advertiser | None = None

    async def start(self, advertise: AdvertPorts | None = None) -> "PeerService":
        import tornado.web

        routes = []
        if self.join is not None:
            routes.append((r"/exo-lab/join", join_handler_class(), {"state": self.join, "nonces": Nonces()}))
        if self.store is not None:
            routes += storage_handlers(self.store)
        app = tornado.web.Application(routes)
        self._server = GuardedHTTPServer(app, limits=SERVICE_LIMITS, max_body_size=MAX_SERVICE_BODY_BYTES,
                                         name=f"the join/model-file service on port {self.port}")
        try:
            self._server.add_sockets(bind_sockets(self.port, self.host))
        except OSError as exc:
            self._server = None
            raise ClusterError(f"cannot listen on {self.host}:{self.port} for joining workers and model "
                               f"files ({exc}); free the port or set network.service_port") from exc
        if advertise is not None:
            self._advertiser = Advertiser(self.secret, self.config.cluster_name, advertise)
            try:
                await self._advertiser.start()
            except BaseException:
                await self.close()
                raise
        return self

    async def close(self) -> None:
        if self._advertiser is not None:
            await self._advertiser.close()
            self._advertiser = None
        if self._server is not None:
            self._server.stop()
            self._server = None


def storage_location(config: ClusterConfig) -> dict | None:
    """Where compute PCs fetch model files: {"host": None (the coordinator) or the storage PC's
    configured address, "device": its hostname (None: the coordinator), "port"}. A storage PC
    named only by hostname is reached at the address its worker joined from (JoinState)."""
    devices = config.storage_devices
    if not devices:
        return None
    device: DeviceConfig = next((d for d in devices if d.is_coordinator), devices[0])
    if device.is_coordinator:
        return {"host": None, "device": None, "port": config.network.service_port}
    return {"host": device.address, "device": device.hostname, "port": config.network.service_port}


async def start_coordinator_service(config: ClusterConfig, secret: bytes, connection: dict,
                                    on_address) -> PeerService:
    """The coordinator's service: join, files (storage role), advert (discovery: auto)."""
    coordinator = config.coordinator
    state = JoinState(secret=secret, cluster_name=config.cluster_name, connection=connection,
                      storage=storage_location(config), on_address=on_address)
    service = PeerService(config, secret, join=state, storage=coordinator.is_storage)
    advertise = None
    if config.network.discovery == "auto":
        advertise = AdvertPorts(join_port=service.port, controller_port=config.network.controller_port,
                                api_port=config.api.port,
                                storage_port=service.port if coordinator.is_storage else None)
    return await service.start(advertise)
