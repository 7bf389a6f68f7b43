"""The storage role: serve model files over HTTP to PCs that hold the cluster secret.

Three GETs under ``/exo-lab/storage/`` (tornado, on the cluster's loop), each refused (403)
without a fresh ``X-Exo-Lab-Auth`` made with the secret (:func:`exo_lab.engine.fetch.check_auth`):

- ``manifest?model=ID``: every servable file of the model with its size and sha256; for a
  safetensors file the sha256 of its header and of each tensor; for a GGUF file (``"gguf":
  true``) the sha256 of each tensor's byte range only, by its Hugging Face name (no sha256 of
  the whole file: such files are tens of GB). Computed once per model file set and cached on
  disk (``<cache>/storage/``, :func:`exo_lab.paths.cache_dir`) until a file's size or mtime
  changes.
- ``file?model=ID&name=NAME``: one file, with single HTTP ranges (``Range: bytes=a-b``), which
  is how compute PCs fetch a safetensors header and then only their stage's tensors, or only
  their stage's tensors of a GGUF file.
- ``stats``: bytes served per client address (what the tests and benchmarks read).

A model is whatever :func:`exo_lab.weights.resolve.resolve_model` resolves on this PC (a folder,
a cached hub id, ``demo``, a GGUF file, ``smollm2``); only its top-level model files (weights,
configs, tokenizer) are served and, for a GGUF model (its folder holds ``gguf.json``,
:mod:`exo_lab.weights.gguf`), the GGUF file(s) that ``gguf.json`` names, served by that name
from where they are on this PC; never anything else on the PC.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import threading
from pathlib import Path

import tornado.web

from ..engine.fetch import AUTH_HEADER, CHUNK_BYTES, HEADER_LENGTH, MAX_HEADER_BYTES, PREFIX, check_auth, hash_range, parse_header, tensor_entries
from ..errors import ExoLabError, ModelError
from ..security import Nonces
from ..weights.gguf import TABLE_FILE, is_gguf_folder, read_table

logger = logging.getLogger(__name__)

SERVED_SUFFIXES = (".safetensors", ".json", ".model", ".txt", ".jinja")
GGUF_MAGIC = b"GGUF"
_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


class ModelStore:
    """Resolves model ids to folders and keeps their manifests (thread-safe)."""

    def __init__(self, secret: bytes):
        self.secret = secret
        self.nonces = Nonces()
        self.bytes_served: dict[str, int] = {}
        self._manifests: dict[str, tuple[dict[str, Path], dict]] = {}
        self._lock = threading.Lock()

    def manifest(self, model_id: str) -> tuple[dict[str, Path], dict]:
        """(servable files: name -> path, manifest) of a model; blocking (run it off the loop)."""
        from ..weights.resolve import resolve_model

        with self._lock:
            folder = resolve_model(model_id, need_weights=True)
            files = served_files(folder)
            cached = self._manifests.get(model_id)
            if cached is None or cached[1]["stamp"] != _stamp(files):
                self._manifests[model_id] = (files, load_or_build_manifest(folder, files))
            return self._manifests[model_id]

    def count(self, client: str, sent: int) -> None:
        self.bytes_served[client] = self.bytes_served.get(client, 0) + sent


def servable(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and path.name.endswith(SERVED_SUFFIXES)


def served_files(folder: Path) -> dict[str, Path]:
    """Every file of a model folder this PC serves, by the name it is served as: the folder's
    top-level model files and, for a GGUF model's folder, each GGUF file ``gguf.json`` names
    (wherever it is on this PC; checked to be a GGUF file)."""
    files = {p.name: p for p in sorted(folder.iterdir()) if servable(p)}
    if is_gguf_folder(folder):
        for name, entry in read_table(folder)["files"].items():
            files[name] = _gguf_file(folder, name, entry)
    return files


def _gguf_file(folder: Path, name: str, entry: dict) -> Path:
    path = Path(entry["path"])
    if not name.endswith(".gguf") or Path(name).name != name or name.startswith(".") or not path.is_absolute():
        raise ModelError(f"{folder / TABLE_FILE} names a GGUF file {name!r} at {str(path)!r}; it names each by "
                         f"its plain *.gguf file name and absolute path: delete {folder} and load the model again")
    try:
        with open(path, "rb") as handle:
            magic = handle.read(len(GGUF_MAGIC))
    except OSError as exc:
        raise ModelError(f"{name}, which {folder / TABLE_FILE} says is at {path}, cannot be read ({exc}); "
                         f"the GGUF file moved or was deleted: load the model by its new path") from None
    if magic != GGUF_MAGIC:
        raise ModelError(f"{path}, named {name} in {folder / TABLE_FILE}, is not a GGUF file; load the "
                         f"model by the path of its GGUF file again")
    return path


def _stamp(files: dict[str, Path]) -> dict:
    return {name: [path.stat().st_size, path.stat().st_mtime_ns] for name, path in files.items()}


def load_or_build_manifest(folder: Path, files: dict[str, Path] | None = None) -> dict:
    """The folder's manifest, from the on-disk cache when its files did not change (``files``:
    what :func:`served_files` returns, read here when not given)."""
    from ..paths import cache_dir, write_atomic

    files = served_files(folder) if files is None else files
    key = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:16]
    path = cache_dir() / "storage" / f"manifest-{key}.json"
    stamp = _stamp(files)
    try:
        cached = json.loads(path.read_text())
        if cached.get("stamp") == stamp:
            return cached
    except (OSError, ValueError):
        pass
    logger.info("computing the sha256 manifest of %s (once; cached in %s)", folder, path)
    table = read_table(folder) if is_gguf_folder(folder) else {"files": {}}
    manifest = {"stamp": stamp, "files": {
        name: _describe_gguf(folder, name, files[name], table) if name in table["files"] else _describe(files[name])
        for name in stamp}}
    write_atomic(path, json.dumps(manifest))
    return manifest


def _describe_gguf(folder: Path, name: str, path: Path, table: dict) -> dict:
    """A GGUF file's entry: its size and the sha256 of each of its tensors' byte ranges (in file
    order: one pass over the file), by the tensors' Hugging Face names."""
    size = path.stat().st_size
    entries = sorted(((tensor, entry) for tensor, entry in table["tensors"].items() if entry["file"] == name),
                     key=lambda item: item[1]["offset"])
    tensors = {}
    for tensor, entry in entries:
        start, stop = entry["offset"], entry["offset"] + entry["nbytes"]
        if not 0 <= start <= stop <= size:
            raise ModelError(f"{folder / TABLE_FILE} puts tensor {tensor} at bytes [{start}, {stop}) of {path}, "
                             f"which has {size} bytes; the GGUF file changed since: load the model by its path again")
        tensors[tensor] = hash_range(path, start, stop)
    return {"size": size, "gguf": True, "tensors": tensors}


def _describe(path: Path) -> dict:
    size = path.stat().st_size
    if not path.name.endswith(".safetensors"):
        return {"size": size, "sha256": hash_range(path, 0, size)}
    with open(path, "rb") as handle:
        (length,) = HEADER_LENGTH.unpack(handle.read(8))
        if length > MAX_HEADER_BYTES:
            raise ExoLabError(f"{path} has a {length}-byte header; it is not a safetensors file")
        raw = handle.read(length)
    start = 8 + length
    tensors = {name: hash_range(path, start + entry["data_offsets"][0], start + entry["data_offsets"][1])
               for name, entry in tensor_entries(parse_header(raw)).items()}
    return {"size": size, "header_sha256": hashlib.sha256(raw).hexdigest(), "tensors": tensors}


class _StorageHandler(tornado.web.RequestHandler):
    def initialize(self, store: ModelStore):
        self.store = store

    def prepare(self):
        header = self.request.headers.get(AUTH_HEADER, "")
        if not check_auth(self.store.secret, self.request.method, self.request.uri, header, self.store.nonces):
            logger.warning("refused a storage request from %s without a valid %s", self.request.remote_ip,
                           AUTH_HEADER)
            raise tornado.web.HTTPError(403, reason="cluster secret required")

    async def _manifest(self) -> tuple[dict[str, Path], dict]:
        model_id = self.get_query_argument("model")
        try:
            return await asyncio.get_running_loop().run_in_executor(None, self.store.manifest, model_id)
        except ExoLabError as exc:
            raise tornado.web.HTTPError(404, reason=str(exc)[:200]) from None

    def write_error(self, status_code, **kwargs):
        self.finish({"error": self._reason})


class ManifestHandler(_StorageHandler):
    async def get(self):
        _, manifest = await self._manifest()
        body = json.dumps({"files": manifest["files"]}).encode()
        self.store.count(self.request.remote_ip, len(body))
        self.set_header("Content-Type", "application/json")
        self.finish(body)


class FileHandler(_StorageHandler):
    async def get(self):
        files, manifest = await self._manifest()
        name = self.get_query_argument("name")
        if name not in manifest["files"] or name not in files:
            raise tornado.web.HTTPError(404, reason=f"{name!r} is not a file of this model")
        path = files[name]
        size = path.stat().st_size
        start, stop = self._range(size)
        self.set_header("Accept-Ranges", "bytes")
        self.set_header("Content-Type", "application/octet-stream")
        self.set_header("Content-Length", str(stop - start))
        if self.request.headers.get("Range"):
            self.set_status(206)
            self.set_header("Content-Range", f"bytes {start}-{stop - 1}/{size}")
        loop = asyncio.get_running_loop()
        with open(path, "rb") as handle:
            handle.seek(start)
            left = stop - start
            while left > 0:
                chunk = await loop.run_in_executor(None, handle.read, min(CHUNK_BYTES, left))
                if not chunk:
                    break
                self.write(chunk)
                await self.flush()
                left -= len(chunk)
                self.store.count(self.request.remote_ip, len(chunk))
        self.finish()

    def _range(self, size: int) -> tuple[int, int]:
        """[start, stop) of the one range asked for (the whole file without a Range header)."""
        header = self.request.headers.get("Range")
        if not header:
            return 0, size
        match = _RANGE.match(header.strip())
        if not match:
            raise tornado.web.HTTPError(416, reason="one range, bytes=a-b, is supported")
        start = int(match.group(1))
        stop = min(int(match.group(2)) + 1, size) if match.group(2) else size
        if start >= stop:
            self.set_header("Content-Range", f"bytes */{size}")
            raise tornado.web.HTTPError(416, reason="range outside the file")
        return start, stop


class StatsHandler(_StorageHandler):
    def get(self):
        self.finish({"bytes_served": dict(self.store.bytes_served)})


def storage_handlers(store: ModelStore) -> list:
    """The routes of the file service, for a tornado Application."""
    return [(f"{PREFIX}/manifest", ManifestHandler, {"store": store}),
            (f"{PREFIX}/file", FileHandler, {"store": store}),
            (f"{PREFIX}/stats", StatsHandler, {"store": store})]
