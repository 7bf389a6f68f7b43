"""The LoRA adapters the cluster serves: names, the ids rows carry, and their tensors.

An adapter served under a name (``cluster.add_adapter(name, path)``, or a fine-tuning job when it
ends) gets an id (1..65535; 0 is the base model). Every stage holds its layers' part of each
adapter (``engine.training.add_adapter``); a request whose ``model`` names the adapter carries
the id in each of its rows (``wire.Row.adapter``), so requests for different adapters of one base
share a batch. The coordinator keeps the tensors (an adapter is small: SmolLM2-135M at rank 8 on
every linear is 4.9 M numbers) and gives each stage its part again whenever the pipeline loads
(failover, re-balancing, shedding KV slots), before any request is replayed.
"""
from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from ..control_types import LoraSettings
from ..errors import ClusterError, ModelError

logger = logging.getLogger(__name__)

MAX_ADAPTERS = 64            # served at once (each stage holds every one's part)
_LAYER = re.compile(r"\.layers\.(\d+)\.")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")


@dataclass(frozen=True)
class Adapter:
    name: str
    adapter_id: int
    settings: LoraSettings
    tensors: dict
    path: str | None
    base: str | None

    def part(self, start: int, stop: int) -> dict:
        """The tensors of layers [start, stop)."""
        return layer_part(self.tensors, start, stop)


def layer_part(tensors: dict, start: int, stop: int) -> dict:
    """The entries of ``tensors`` (peft names: ``...layers.{i}...``) of layers [start, stop)."""
    return {key: value for key, value in tensors.items()
            if (match := _LAYER.search(key)) and start <= int(match.group(1)) < stop}


class AdapterRegistry:
    """Served adapters by name (thread-safe: the API reads it on the loop, a notebook adds)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._by_name: dict[str, Adapter] = {}
        self._reserved: set[int] = set()
        self.model_id: str | None = None           # the base they belong to

    def names(self) -> tuple[str, ...]:
        with self._lock:
            return tuple(self._by_name)

    def get(self, name: str) -> Adapter | None:
        with self._lock:
            return self._by_name.get(name)

    def id_of(self, name: str) -> int:
        """The id rows of ``name`` carry: 0 when ``name`` is not an adapter (the base model)."""
        adapter = self.get(name)
        return adapter.adapter_id if adapter is not None else 0

    def reserve(self) -> int:
        """A fresh id (a fine-tuning job's adapter while it trains)."""
        with self._lock:
            used = {a.adapter_id for a in self._by_name.values()} | self._reserved
            if len(used) >= MAX_ADAPTERS:
                raise ClusterError(f"{len(used)} adapters are served or training, the most at once is "
                                   f"{MAX_ADAPTERS}: remove one with cluster.remove_adapter(name)")
            adapter_id = next(i for i in range(1, 2**16) if i not in used)
            self._reserved.add(adapter_id)
            return adapter_id

    def release(self, adapter_id: int) -> None:
        with self._lock:
            self._reserved.discard(adapter_id)

    def add(self, name: str, settings: LoraSettings, tensors: dict, path=None, base: str | None = None,
            adapter_id: int | None = None) -> Adapter:
        if not isinstance(name, str) or not _NAME.match(name):
            raise ModelError(f"adapter name {name!r}: use letters, digits and . _ : / - (at most 128), "
                             "starting with a letter or digit")
        with self._lock:
            old = self._by_name.get(name)
            if adapter_id is None:
                adapter_id = old.adapter_id if old is not None else None
            if adapter_id is None:
                used = {a.adapter_id for a in self._by_name.values()} | self._reserved
                if len(used) >= MAX_ADAPTERS:
                    raise ClusterError(f"{MAX_ADAPTERS} adapters are served already: remove one first")
                adapter_id = next(i for i in range(1, 2**16) if i not in used)
            self._reserved.discard(adapter_id)
            adapter = Adapter(name, adapter_id, settings, dict(tensors), None if path is None else str(path), base)
            self._by_name[name] = adapter
            return adapter

    def remove(self, name: str) -> Adapter | None:
        with self._lock:
            return self._by_name.pop(name, None)

    def for_model(self, model_id: str) -> list[Adapter]:
        """The adapters to give a pipeline of ``model_id`` (another base forgets them all)."""
        with self._lock:
            if self.model_id != model_id:
                if self._by_name:
                    logger.info("model %s loaded: the adapters of %s (%s) are no longer served", model_id,
                                self.model_id, ", ".join(self._by_name))
                self._by_name.clear()
                self.model_id = model_id
            return list(self._by_name.values())


def push(control, adapters: list[Adapter], plan, stage_engines) -> None:
    """Give every stage engine its layers' part of each adapter (control plane)."""
    from ..engine import training

    for adapter in adapters:
        for stage, info in zip(plan.stages, stage_engines):
            control.call(info.engine_id, training.add_adapter, adapter.adapter_id, adapter.settings,
                         adapter.part(stage.start_layer, stage.stop_layer), what=f"loading adapter {adapter.name}")


def read(path) -> tuple[LoraSettings, dict, str | None]:
    """(settings, tensors, base) of a peft adapter folder; ModelError saying what is wrong."""
    from ..model.lora import read_adapter

    path = Path(path).expanduser()
    if not path.exists():
        raise ModelError(f"adapter folder {path} does not exist")
    return read_adapter(path)
