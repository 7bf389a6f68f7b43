"""A compute PC that lacks the model fetches exactly its stage's tensors from the storage PC.

Flow (the server is :mod:`exo_lab.membership.storage`):

1. The manifest: every file of the model with its size and sha256, and for each safetensors
   file the sha256 of its header and of each tensor, for each GGUF file (``"gguf": true``) the
   sha256 of each tensor only (the storage PC computes it once).
2. Small files whole (config, generation config, tokenizer, index, ``gguf.json``), each checked.
3. Each safetensors file's header by byte range (8-byte length, then the JSON). A GGUF model
   needs none: its ``gguf.json`` (:mod:`exo_lab.weights.gguf`) says where each tensor is.
4. When the stage is built (:func:`exo_lab.weights.checkpoint.load_stage` calls back with the names
   it needs): the byte ranges of only those tensors, adjacent ones merged into one request,
   each tensor checked against the manifest.

The cache (``<cache>/fetched/<model>/``, :func:`exo_lab.paths.cache_dir`) looks like a model
folder: the small files as they are, each fetched tensor in its own safetensors file under
``tensors/``, and an index (``model.safetensors.index.json``) naming every tensor's file; so the
loader reads it like any sharded checkpoint. A GGUF model's folder has each fetched tensor's
bytes, exactly as in the GGUF file, in its own file under ``tensors/`` (``<name>.bin``) and its
own ``gguf.json`` saying so (each tensor at offset 0 of its file; the storage PC's ``gguf.json``
is kept in the bookkeeping); so the loader reads it like any GGUF model. A file there, once
written, is never replaced or rewritten (another engine may have it memory-mapped, which Windows
locks): it is written under a temporary name and renamed into a path that does not exist yet; a
corrupt one is removed first. Bookkeeping lives in ``.exo_lab_fetch/``: the manifest (used when
the storage PC cannot be reached), the original headers or ``gguf.json``, the temporaries, and
the ranges of an interrupted fetch, which the next try continues with HTTP Range from where it
stopped. Every start checks the cached
tensors it needs against the manifest: a corrupt one is fetched again; a start with everything
cached fetches nothing.

Requests carry ``X-Exo-Lab-Auth``: a timestamp, a nonce and an HMAC under
``derive_key(secret, "shard-server")`` of both and the request line; the server refuses stale
or repeated ones. Engine-side code: it never imports the coordinator.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import re
import struct
import sys
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .. import envvars
from ..errors import ModelError
from ..paths import temp_name, write_atomic
from ..security import Nonces, new_stamp, sign, signature_ok
from ..weights import INDEX_FILE
from ..weights.gguf import TABLE_FILE

logger = logging.getLogger(__name__)

STORAGE_URL_ENV = envvars.STORAGE_URL
AUTH_HEADER = "X-Exo-Lab-Auth"
AUTH_PURPOSE = "shard-server"
PREFIX = "/exo-lab/storage"
BOOKKEEPING = ".exo_lab_fetch"
TENSORS = "tensors"
RAW_SUFFIX = ".bin"                 # a fetched GGUF tensor: its bytes as in the GGUF file
CHUNK_BYTES = 1 << 20
HEADER_LENGTH = struct.Struct("<Q")
MAX_HEADER_BYTES = 100 * 2**20      # safetensors' own limit


# ----------------------------------------------------------------------------- auth (both sides)

def auth_header(secret: bytes, method: str, uri: str) -> str:
    """``ts.nonce.hmac`` for one request (``uri``: path and query as sent)."""
    ts, nonce = new_stamp()
    return f"{ts}.{nonce}.{sign(secret, AUTH_PURPOSE, _message(ts, nonce, method, uri))}"


def check_auth(secret: bytes, method: str, uri: str, header: str, nonces: Nonces) -> bool:
    """Whether ``header`` was made with ``secret`` for this request, recently and only once
    (``nonces``: the server's book of accepted stamps, kept for its lifetime)."""
    try:
        ts, nonce, mac = header.split(".")
    except ValueError:
        return False
    return (signature_ok(secret, AUTH_PURPOSE, _message(ts, nonce, method, uri), mac)
            and nonces.accept(ts, nonce))


def _message(ts: str, nonce: str, method: str, uri: str) -> bytes:
    return f"{ts}\n{nonce}\n{method}\n{uri}".encode()


# ----------------------------------------------------------------------------- safetensors bytes

def parse_header(raw: bytes) -> dict:
    """A safetensors header's JSON (without the 8-byte length in front)."""
    try:
        header = json.loads(raw)
    except ValueError as exc:
        raise ModelError(f"a safetensors header is not valid JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise ModelError("a safetensors header is not a JSON object")
    return header


def tensor_entries(header: dict) -> dict[str, dict]:
    return {name: entry for name, entry in header.items() if name != "__metadata__"}


def write_safetensors(path: Path, header: dict, sources: list) -> None:
    """Write a safetensors file at ``path`` (a new name: see :func:`_publish`): ``header`` (name ->
    dtype, shape; offsets are set here) and, in the same order, ``sources``: callables each
    writing one tensor's bytes to a file."""
    offset, entries = 0, {}
    for name, entry in header.items():
        if name == "__metadata__":
            entries[name] = entry
            continue
        size = entry["data_offsets"][1] - entry["data_offsets"][0]
        entries[name] = {"dtype": entry["dtype"], "shape": entry["shape"], "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(entries, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)    # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as out:
        out.write(HEADER_LENGTH.pack(len(raw)))
        out.write(raw)
        for write in sources:
            write(out)


def read_local_header(path: Path) -> tuple[dict, int] | None:
    """(header, data start) of a local safetensors file, or None when it is absent or unreadable."""
    try:
        with open(path, "rb") as handle:
            (length,) = HEADER_LENGTH.unpack(handle.read(8))
            if length > MAX_HEADER_BYTES:
                return None
            return parse_header(handle.read(length)), 8 + length
    except (OSError, struct.error, ModelError):
        return None


def _chunks(path: Path, start: int, stop: int):
    """The bytes [start, stop) of a file, a chunk at a time."""
    with open(path, "rb") as handle:
        handle.seek(start)
        left = stop - start
        while left > 0:
            chunk = handle.read(min(CHUNK_BYTES, left))
            if not chunk:
                raise ModelError(f"{path} ends before byte {stop}: it is truncated")
            yield chunk
            left -= len(chunk)


def hash_range(path: Path, start: int, stop: int) -> str:
    """sha256 of the bytes [start, stop) of a file ("" when the file is shorter)."""
    digest = hashlib.sha256()
    try:
        for chunk in _chunks(path, start, stop):
            digest.update(chunk)
    except ModelError:
        return ""
    return digest.hexdigest()


def _copier(path: Path, start: int, stop: int):
    def write(out) -> None:
        for chunk in _chunks(path, start, stop):
            out.write(chunk)
    return write


# ----------------------------------------------------------------------------- the client

@dataclass
class StorageClient:
    """HTTP client of the storage PC's file service (keep-alive, one connection)."""

    url: str                            # http://host:port
    secret: bytes
    timeout_s: float = 30.0
    bytes_fetched: int = 0
    _connection: http.client.HTTPConnection | None = field(default=None, repr=False)

    def _uri(self, what: str, **query) -> str:
        return f"{PREFIX}/{what}?{urllib.parse.urlencode(query)}"

    def request(self, uri: str, byte_range: tuple[int, int] | None = None):
        """GET ``uri``; returns the open response (status 200 or 206). ``byte_range``: [a, b)."""
        parts = urllib.parse.urlsplit(self.url)
        headers = {AUTH_HEADER: auth_header(self.secret, "GET", uri)}
        if byte_range is not None:
            headers["Range"] = f"bytes={byte_range[0]}-{byte_range[1] - 1}"
        for attempt in (0, 1):       # a kept-alive connection the server closed: reconnect once
            if self._connection is None:
                self._connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=self.timeout_s)
            try:
                self._connection.request("GET", uri, headers=headers)
                response = self._connection.getresponse()
                break
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                if attempt:
                    raise ModelError(f"cannot reach the storage PC at {self.url}: {exc}") from exc
        if response.status not in (200, 206):
            detail = response.read(500).decode(errors="replace")
            self.close()
            raise ModelError(f"the storage PC at {self.url} answered {response.status} for {uri}: {detail}")
        return response

    def read(self, uri: str, byte_range: tuple[int, int] | None = None) -> bytes:
        data = self.request(uri, byte_range).read()
        self.bytes_fetched += len(data)
        return data

    def manifest(self, model_id: str) -> dict:
        return json.loads(self.read(self._uri("manifest", model=model_id)))

    def file_uri(self, model_id: str, name: str) -> str:
        return self._uri("file", model=model_id, name=name)

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


def storage_client() -> StorageClient | None:
    """The storage PC this engine's worker was told about at join, with the secret; or None."""
    from ..security import load_secret

    url, secret = os.environ.get(STORAGE_URL_ENV), load_secret()
    return StorageClient(url, secret) if url and secret else None


def fetched_model_dir(model_id: str) -> Path:
    from ..paths import cache_dir

    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", model_id).strip("_")[-60:] or "model"
    return cache_dir() / "fetched" / f"{slug}-{hashlib.sha256(model_id.encode()).hexdigest()[:10]}"


def tensor_file(name: str, suffix: str = ".safetensors") -> str:
    """Where a fetched folder keeps one tensor, relative to the folder (what its index or its
    ``gguf.json`` names): a safetensors file, or (``suffix`` :data:`RAW_SUFFIX`) a GGUF tensor's bytes."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name)
    if safe != name or safe != safe.lower():    # Windows' file names ignore case
        safe += "-" + hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{TENSORS}/{safe}{suffix}"


# ----------------------------------------------------------------------------- model files

def open_model(model_id: str):
    """(folder, ensure_tensors) for a stage: a local folder and None when this PC has the model;
    else the fetched folder (config, tokenizer, index or ``gguf.json``, headers in place) and the
    callback that fetches the tensors the stage needs. Raises ModelError when neither works."""
    from ..weights.resolve import resolve_model

    try:
        return resolve_model(model_id, need_weights=True), None
    except ModelError as missing:
        client = storage_client()
        if client is None:
            raise
        logger.info("%s is not on this PC (%s); fetching from %s", model_id, missing, client.url)
    folder = fetch_model_files(model_id, client)
    return folder, lambda names: fetch_tensors(model_id, folder, client, names)


def fetch_model_files(model_id: str, client: StorageClient) -> Path:
    """Bring the model's small files and safetensors headers into its cache folder (each checked
    against the manifest; what is already there and intact is not fetched) and write its index,
    or for a GGUF model its own ``gguf.json`` (each tensor in its own file). Returns the folder."""
    folder = fetched_model_dir(model_id)
    books = folder / BOOKKEEPING
    (folder / TENSORS).mkdir(parents=True, exist_ok=True)
    (books / "tmp").mkdir(parents=True, exist_ok=True)
    _sweep_temps(books / "tmp")
    manifest = _current_manifest(model_id, client, books / "manifest.json")
    gguf = any(entry.get("gguf") for entry in manifest["files"].values())
    for name, entry in manifest["files"].items():
        if entry.get("gguf"):
            continue            # nothing up front: gguf.json says where its tensors are
        if "tensors" in entry:
            _ensure_header(model_id, client, books, name, entry)
        elif name != INDEX_FILE:    # the storage PC's gguf.json is the original, kept aside
            path = books / name if gguf and name == TABLE_FILE else folder / name
            _ensure_file(model_id, client, folder, name, path, entry["sha256"])
    if gguf:
        _write_gguf_table(folder)
        return folder
    weight_map = {tensor: tensor_file(tensor) for entry in manifest["files"].values()
                  for tensor in entry.get("tensors", ())}
    _write_if_changed(folder, folder / INDEX_FILE, json.dumps({"metadata": {}, "weight_map": weight_map}).encode())
    return folder


def _ensure_file(model_id: str, client: StorageClient, folder: Path, name: str, path: Path, sha256: str) -> None:
    """A small file of the model, whole, at ``path`` (in ``folder``, the fetched folder, or in its
    bookkeeping); one there already and intact is kept."""
    if _intact(path, sha256):
        return
    data = client.read(client.file_uri(model_id, name))
    _check(hashlib.sha256(data).hexdigest() == sha256, f"{name} from {client.url}")
    _publish_bytes(folder, path, data, sha256)


def _write_gguf_table(folder: Path) -> None:
    """The fetched folder's own ``gguf.json``: the storage PC's, with each tensor in its own file
    (:func:`tensor_file`, :data:`RAW_SUFFIX`; offset 0), there once a stage fetched it."""
    table = json.loads((folder / BOOKKEEPING / TABLE_FILE).read_text())
    tensors = {name: {**entry, "file": tensor_file(name, RAW_SUFFIX), "offset": 0}
               for name, entry in table["tensors"].items()}
    files = {entry["file"]: {"path": str((folder / entry["file"]).absolute()), "size": entry["nbytes"]}
             for entry in tensors.values()}
    local = {**table, "files": files, "tensors": tensors}
    _write_if_changed(folder, folder / TABLE_FILE, (json.dumps(local, indent=1) + "\n").encode())


def _current_manifest(model_id: str, client: StorageClient, path: Path) -> dict:
    try:
        manifest = client.manifest(model_id)
    except ModelError as exc:
        if not path.is_file():
            raise
        logger.warning("storage unreachable (%s); using the cached manifest of %s", exc, model_id)
        return json.loads(path.read_text())
    _write_if_changed(path.parent.parent, path, json.dumps(manifest).encode())
    return manifest


def _ensure_header(model_id: str, client: StorageClient, books: Path, name: str, entry: dict) -> None:
    path = books / f"{name}.header"
    if _intact(path, entry["header_sha256"]):
        return
    uri = client.file_uri(model_id, name)
    (length,) = HEADER_LENGTH.unpack(client.read(uri, (0, 8)))
    _check(length <= MAX_HEADER_BYTES, f"the header length of {name}")
    raw = client.read(uri, (8, 8 + length))
    _check(hashlib.sha256(raw).hexdigest() == entry["header_sha256"], f"the header of {name}")
    _publish_bytes(books.parent, path, raw, entry["header_sha256"])


def _intact(path: Path, sha256: str) -> bool:
    return path.is_file() and hash_range(path, 0, path.stat().st_size) == sha256


def _check(ok: bool, what: str) -> None:
    if not ok:
        raise ModelError(f"{what} does not match the storage PC's sha256 manifest; the transfer was "
                         f"corrupted or the model changed on the storage PC meanwhile: try again")


# ----------------------------------------------------------------------------- writing the cache
# A file the cache holds is never replaced: another engine on this PC may have it memory-mapped
# (safetensors maps what a stage loads), and Windows refuses to replace or delete a mapped file
# (WinError 32). So each file is written under a temporary name and then renamed into a path that
# does not exist yet; where an intact copy is there already, it is kept and the temporary dropped.

def _temp_path(folder: Path, name: str) -> Path:
    """A temporary name in the fetched folder's ``tmp/`` (same disk: the rename is atomic), own
    to this process so that engines writing at once never share one."""
    return temp_name(Path(name), folder / BOOKKEEPING / "tmp")


def _sweep_temps(tmp: Path, max_age_s: float = 3600) -> None:
    """Drop temporaries that a crashed writer left (none takes an hour to write)."""
    for path in tmp.iterdir():
        try:
            if time.time() - path.stat().st_mtime > max_age_s:
                path.unlink()
        except OSError:     # gone meanwhile, or still open on Windows
            pass


def _publish(tmp: Path, path: Path, intact) -> None:
    """Move the finished temporary ``tmp`` to ``path``, never over a file there: one that
    ``intact(path)`` approves is kept (and ``tmp`` dropped), a corrupt or stale one is removed."""
    if path.exists():
        if intact(path):
            tmp.unlink()
            return
        _remove_stale(path)
    try:
        _rename_new(tmp, path)
    except FileExistsError:     # another engine on this PC published it meanwhile (checked, too)
        tmp.unlink()


def _rename_new(tmp: Path, path: Path) -> None:
    """Rename ``tmp`` to ``path``, which must not exist: raises FileExistsError, never replaces."""
    if sys.platform == "win32":
        os.rename(tmp, path)        # Windows' rename refuses an existing target
        return
    try:
        os.link(tmp, path)          # POSIX rename would replace; a hard link refuses instead
    except FileExistsError:
        raise
    except OSError:                 # a file system without hard links
        if path.exists():
            raise FileExistsError(path) from None
        os.rename(tmp, path)
        return
    os.unlink(tmp)


def _remove_stale(path: Path) -> None:
    logger.warning("%s is corrupt or stale; replacing it", path)
    try:
        path.unlink()
    except PermissionError as exc:
        raise ModelError(f"{path} is corrupt or stale, but it cannot be removed ({exc}); another "
                         f"exo-lab engine on this PC may have it open (Windows keeps a loaded file "
                         f"locked): stop the engines on this PC, delete the file, and load again") from exc


def _publish_written(folder: Path, path: Path, fill, intact) -> None:
    """Write a new file: ``fill(temporary)`` writes it under a temporary name, then :func:`_publish`."""
    tmp = _temp_path(folder, path.name)
    fill(tmp)
    _publish(tmp, path, intact)


def _publish_bytes(folder: Path, path: Path, data: bytes, sha256: str) -> None:
    _publish_written(folder, path, lambda tmp: tmp.write_bytes(data), lambda existing: _intact(existing, sha256))


def _write_if_changed(folder: Path, path: Path, data: bytes) -> None:
    """Bookkeeping that exo-lab itself rewrites (the manifest, the index): replaced only when its
    content changes. Such a file is read whole and closed at once, never mapped."""
    try:
        if path.read_bytes() == data:
            return
    except OSError:
        pass
    write_atomic(path, data, temp_folder=folder / BOOKKEEPING / "tmp")


def _write_tensor(folder: Path, name: str, entry: dict, source: tuple[Path, int, int], sha256: str) -> None:
    """One tensor (bytes ``source``: path, start, stop, already checked) into its own file."""
    _publish_written(folder, folder / tensor_file(name),
                     lambda tmp: write_safetensors(tmp, {name: entry}, [_copier(*source)]),
                     lambda existing: _tensor_intact(existing, name, sha256))


def _write_raw(folder: Path, name: str, source: tuple[Path, int, int], sha256: str) -> None:
    """One GGUF tensor (bytes ``source``, already checked) into its own file: exactly its bytes."""
    def fill(tmp: Path) -> None:
        with open(tmp, "wb") as out:
            _copier(*source)(out)

    _publish_written(folder, folder / tensor_file(name, RAW_SUFFIX), fill,
                     lambda existing: _raw_intact(existing, name, sha256))


def _raw_intact(path: Path, name: str, sha256: str) -> bool:
    return _intact(path, sha256)


def _tensor_intact(path: Path, name: str, sha256: str) -> bool:
    local = read_local_header(path)
    if local is None or name not in local[0]:
        return False
    a, b = local[0][name]["data_offsets"]
    return hash_range(path, local[1] + a, local[1] + b) == sha256


# ----------------------------------------------------------------------------- tensors

def fetch_tensors(model_id: str, folder: Path, client: StorageClient, names) -> int:
    """Make sure every tensor in ``names`` is in the folder's tensor files, intact; fetch the
    missing or corrupt ones by byte range. Returns the bytes fetched."""
    from tqdm.auto import tqdm

    manifest = json.loads((folder / BOOKKEEPING / "manifest.json").read_text())
    origin = {tensor: file for file, entry in manifest["files"].items() for tensor in entry.get("tensors", ())}
    by_file: dict[str, list[str]] = {}
    for name in dict.fromkeys(names):
        by_file.setdefault(origin[name], []).append(name)
    plans = [_FilePlan.make(model_id, folder, manifest["files"][file], file, wanted)
             for file, wanted in by_file.items()]
    total = sum(plan.missing_bytes for plan in plans)
    before = client.bytes_fetched
    with tqdm(total=total, desc=f"fetching {model_id}", unit="B", unit_scale=True, leave=False,
              disable=None if total else True) as bar:
        for plan in plans:
            plan.fetch(client, bar)
    fetched = client.bytes_fetched - before
    logger.info("tensors of %s: %d needed, %d bytes fetched", model_id, sum(len(w) for w in by_file.values()),
                fetched)
    return fetched


@dataclass
class _FilePlan:
    """The wanted tensors of one original file (safetensors or GGUF): which to fetch, in file order."""

    model_id: str
    folder: Path
    file: str                       # the original file's name on the storage PC
    spans: dict                     # name -> its bytes [start, stop) in the original file
    sha256: dict                    # name -> manifest sha256
    missing: list                   # names to fetch, in file order
    write: Callable[..., None]      # (folder, name, (path, start, stop) of its checked bytes, sha256)

    @classmethod
    def make(cls, model_id: str, folder: Path, entry: dict, file: str, wanted: list[str]) -> "_FilePlan":
        if entry.get("gguf"):       # where each tensor is: the storage PC's gguf.json
            table = json.loads((folder / BOOKKEEPING / TABLE_FILE).read_text())["tensors"]
            spans = {n: (table[n]["offset"], table[n]["offset"] + table[n]["nbytes"]) for n in wanted}
            missing = _missing(folder, file, wanted, entry["tensors"], RAW_SUFFIX, _raw_intact)
            return cls(model_id, folder, file, spans, entry["tensors"], missing, _write_raw)
        raw = (folder / BOOKKEEPING / f"{file}.header").read_bytes()
        remote = tensor_entries(parse_header(raw))
        _adopt_legacy(folder, file, remote, entry["tensors"])
        spans = {n: tuple(8 + len(raw) + o for o in remote[n]["data_offsets"]) for n in wanted}
        missing = _missing(folder, file, wanted, entry["tensors"], ".safetensors", _tensor_intact)

        def write(folder_: Path, name: str, source: tuple[Path, int, int], sha256: str) -> None:
            _write_tensor(folder_, name, remote[name], source, sha256)

        return cls(model_id, folder, file, spans, entry["tensors"], missing, write)

    def __post_init__(self):
        self.missing.sort(key=lambda n: self.spans[n][0])

    @property
    def missing_bytes(self) -> int:
        return sum(self.spans[n][1] - self.spans[n][0] for n in self.missing)

    def fetch(self, client: StorageClient, bar) -> None:
        if not self.missing:
            return
        staging = self.folder / BOOKKEEPING / f"{self.file}.ranges"
        staging.mkdir(exist_ok=True)
        for start, stop, names in self._ranges():
            part = staging / f"{start}-{stop}"
            self._download_checked(client, part, start, stop, names, bar)
            for name in names:
                self.write(self.folder, name, (part, *self._within(name, start)), self.sha256[name])
            part.unlink()
        try:
            staging.rmdir()
        except OSError:         # another engine on this PC is fetching into it
            pass

    def _download_checked(self, client: StorageClient, part: Path, start: int, stop: int, names, bar) -> None:
        for attempt in (0, 1):
            _download(client, client.file_uri(self.model_id, self.file), part, start, stop, bar)
            bad = [n for n in names if hash_range(part, *self._within(n, start)) != self.sha256[n]]
            if not bad:
                return
            part.unlink()
            if attempt:
                _check(False, f"tensor {bad[0]} of {self.file}")

    def _ranges(self) -> list[tuple[int, int, list[str]]]:
        """Absolute [start, stop) byte ranges of the missing tensors, adjacent ones merged."""
        merged: list[tuple[int, int, list[str]]] = []
        for name in self.missing:
            a, b = self.spans[name]
            if merged and merged[-1][1] == a:
                merged[-1] = (merged[-1][0], b, merged[-1][2] + [name])
            else:
                merged.append((a, b, [name]))
        return merged

    def _within(self, name: str, range_start: int) -> tuple[int, int]:
        a, b = self.spans[name]
        return a - range_start, b - range_start


def _missing(folder: Path, file: str, wanted: list[str], sha256: dict, suffix: str, intact) -> list[str]:
    """The names in ``wanted`` whose own file in the folder is absent, or fails ``intact(path,
    name, sha256)`` (corrupt or stale)."""
    missing = []
    for name in wanted:
        path = folder / tensor_file(name, suffix)
        if not intact(path, name, sha256[name]):
            if path.exists():
                logger.warning("cached tensor %s of %s is corrupt or stale; fetching it again", name, file)
            missing.append(name)
    return missing


def _adopt_legacy(folder: Path, file: str, remote: dict, sha256: dict) -> None:
    """An earlier exo-lab kept one partial file per original file (``folder/<file>``) and
    rewrote it as it grew; its intact tensors move to their own files, then it goes."""
    legacy = folder / file
    local = read_local_header(legacy)
    if local is None:
        return
    header, start = local
    for name, item in tensor_entries(header).items():
        a, b = start + item["data_offsets"][0], start + item["data_offsets"][1]
        if name in remote and hash_range(legacy, a, b) == sha256.get(name):
            _write_tensor(folder, name, remote[name], (legacy, a, b), sha256[name])
    try:
        legacy.unlink()
    except OSError as exc:      # still mapped by an engine of the earlier layout (Windows)
        logger.info("kept %s (%s); it is no longer used and may be deleted", legacy, exc)


def _download(client: StorageClient, uri: str, part: Path, start: int, stop: int, bar) -> None:
    """Bytes [start, stop) of a remote file into ``part``, continuing a partial download."""
    have = part.stat().st_size if part.is_file() else 0
    if have > stop - start:
        part.unlink()
        have = 0
    bar.update(have)
    if have == stop - start:
        return
    response = client.request(uri, (start + have, stop))
    with open(part, "ab") as out:
        while True:
            chunk = response.read(CHUNK_BYTES)
            if not chunk:
                break
            out.write(chunk)
            client.bytes_fetched += len(chunk)
            bar.update(len(chunk))
    if part.stat().st_size != stop - start:
        raise ModelError(f"the storage PC sent {part.stat().st_size} of {stop - start} bytes of "
                         f"{uri}; start again to resume")
