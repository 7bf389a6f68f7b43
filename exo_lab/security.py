"""The cluster secret: where it comes from, and the independent keys derived from it.

One secret per cluster authenticates everything that crosses the network (see
docs/security.md for the threat model). It never crosses the network itself: every PC reads it
from ``$EXO_LAB_SECRET`` or the config's ``network.secret_file``, and each use gets its own key
through :func:`derive_key`, so a key that leaks from one use (say, a proof broadcast by discovery)
reveals nothing about another (the data plane's CurveZMQ keys).

Purposes in use (a new use picks a new name, never reuses one):

=====================  =======================================================================
``"data-plane"``       CurveZMQ keys of the stage-to-stage sockets (:mod:`exo_lab.wire.sockets`)
``"ipyparallel"``      the control plane's message-signing key
``"shard-server"``     the storage PC's HTTP shard server
``"discovery-proof"``  the proof a zeroconf advert carries that its sender holds the secret
=====================  =======================================================================

In local mode (``Cluster.local``, ``exo-lab serve --engines``) the coordinator makes a random
secret per cluster with :func:`new_secret` and hands it to the engines it starts through their
environment (:func:`secret_environment`); engines read it back with :func:`load_secret`.
Never log or print a secret or a derived key.

**Signed requests** (the join service, the storage PC's file service) all go through
:func:`sign` / :func:`signature_ok` and carry a stamp (:func:`new_stamp`: time and a random
nonce); a server accepts each stamp once and only within ``MAX_STAMP_AGE_S`` of its own clock
(:class:`Nonces`), so a recorded request cannot be replayed.
"""
from __future__ import annotations

import getpass
import hashlib
import hmac
import os
import secrets
import stat
import subprocess
import sys
import time
from pathlib import Path

from . import envvars
from .errors import ConfigError

SECRET_ENV = envvars.SECRET
# A shorter secret could be guessed offline from a derived value (e.g. the discovery proof).
MIN_SECRET_CHARS = 16
PURPOSES = ("data-plane", "ipyparallel", "shard-server", "discovery-proof")
KEY_BYTES = 32
MAX_STAMP_AGE_S = 300      # PCs' clocks may differ this much; older signed requests are refused
_MAKE_ONE = "`exo-lab secret secret.txt`"


def load_secret(config=None) -> bytes | None:
    """The cluster secret: ``$EXO_LAB_SECRET``, else the file named by ``config.network.secret_file``
    (a :class:`~exo_lab.config.ClusterConfig`), else None (no shared secret: bind loopback only).

    Surrounding whitespace (a file's trailing newline) is not part of the secret.
    Raises :class:`~exo_lab.errors.ConfigError` for a secret shorter than ``MIN_SECRET_CHARS``,
    a secret file that cannot be read, or one that other users may read (with the chmod fix).
    """
    value = os.environ.get(SECRET_ENV)
    if value is not None:
        return _checked(value.strip().encode(), f"${SECRET_ENV}")
    path = getattr(getattr(config, "network", None), "secret_file", None)
    if path is None:
        return None
    return _checked(read_secret_file(Path(path)), f"the secret file {path}")


def read_secret_file(path: Path) -> bytes:
    """A secret file's bytes without surrounding whitespace. On Linux and macOS it refuses a file
    that other users may read (mode bits). On Windows the file's ACL is not checked (nothing in
    Python's standard library reads one): :func:`write_secret_file` made it private there."""
    try:
        mode = path.stat().st_mode
        if sys.platform != "win32" and mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(f"the secret file {path} may be read by other users (mode "
                              f"{stat.S_IMODE(mode):o}); make it private with `chmod 600 {path}`")
        return path.read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read the cluster secret file {path}: {exc.strerror or exc}; "
                          f"fix network.secret_file, or create the file: {_MAKE_ONE}") from exc


def _checked(secret: bytes, where: str) -> bytes:
    if len(secret) < MIN_SECRET_CHARS:
        raise ConfigError(f"{where} holds a cluster secret of {len(secret)} characters; it needs at "
                          f"least {MIN_SECRET_CHARS}; make a random one: {_MAKE_ONE}")
    try:
        text = secret.decode("utf-8")
    except UnicodeDecodeError:
        text = "\0"
    if "\0" in text:
        # it travels to the engines in an environment variable
        raise ConfigError(f"{where} must be UTF-8 text without NUL characters; make one: {_MAKE_ONE}")
    return secret


def new_secret() -> str:
    """A fresh random secret (256 bits, URL-safe text: fits a file or an environment variable)."""
    return secrets.token_urlsafe(32)


def write_secret_file(path: str | os.PathLike, secret: str | bytes) -> Path:
    """Write ``secret`` to ``path``, readable by its owner only, and never briefly readable by
    others: mode 600 from the start on Linux and macOS; on Windows the empty file is restricted
    first (:func:`icacls_private_command`), then written. Returns the path.

    Raises ConfigError on Windows when ``icacls`` fails (with the command to run by hand)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = secret.encode() if isinstance(secret, str) else secret
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))   # empty until private
    if sys.platform == "win32":
        _make_private_on_windows(path)
    else:
        os.chmod(path, 0o600)   # an existing file keeps its old mode through O_CREAT
    path.write_bytes(data + b"\n")
    return path


def secret_file_protection() -> str:
    """How :func:`write_secret_file` protects the file on this OS, for messages to the user."""
    if sys.platform == "win32":
        return "only your Windows account may read it (icacls)"
    return "mode 600: only you may read it"


def icacls_private_command(path: str | os.PathLike, account: str) -> list[str]:
    """icacls arguments that leave ``account`` the only one with access to ``path``: drop the
    permissions inherited from the folder, then grant full control to ``account`` alone."""
    return ["icacls", str(path), "/inheritance:r", "/grant:r", f"{account}:F"]


def _windows_account() -> str:
    user = os.environ.get("USERNAME") or getpass.getuser()
    domain = os.environ.get("USERDOMAIN")
    return f"{domain}\\{user}" if domain else user


def _make_private_on_windows(path: Path) -> None:
    command = icacls_private_command(path, _windows_account())
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        failure = str(exc)
    else:
        failure = (result.stderr.strip() or result.stdout.strip() or "no output") if result.returncode else None
    if failure is not None:
        raise ConfigError(f"cannot make the secret file {path} private ({failure}), so no secret was "
                          f"written into it; run `{subprocess.list2cmdline(command)}` in a terminal, "
                          f"then write the secret again")


def derive_key(secret: bytes, purpose: str) -> bytes:
    """A ``KEY_BYTES`` key for one ``purpose`` (see the module docstring), derived from the secret.

    BLAKE2b in keyed mode, as a KDF: the secret (hashed to a 64-byte key first, so any length
    works) keys a hash of the purpose's name. Different purposes give independent keys; the
    same secret and purpose give the same key on every PC."""
    if isinstance(secret, str):
        secret = secret.encode()
    if not isinstance(secret, (bytes, bytearray)) or not secret:
        raise ValueError("derive_key needs the secret as non-empty bytes")
    if not isinstance(purpose, str) or not purpose:
        raise ValueError(f"derive_key needs a purpose name such as {PURPOSES[0]!r}")
    master = hashlib.blake2b(bytes(secret), digest_size=64, person=b"exo-lab-secret").digest()
    return hashlib.blake2b(purpose.encode(), key=master, digest_size=KEY_BYTES,
                           person=b"exo-lab-derive").digest()


def data_plane_key() -> bytes:
    """This process's data-plane key, from ``$EXO_LAB_SECRET`` (an engine is given it by whoever
    started it: the coordinator or ``python -m exo_lab.worker``). Raises ClusterError without one."""
    from .errors import ClusterError

    secret = load_secret()
    if secret is None:
        raise ClusterError(f"this engine has no cluster secret (${SECRET_ENV}), so its data plane cannot "
                           "authenticate; start engines through exo-lab (Cluster, exo-lab serve, "
                           "python -m exo_lab.worker), which hands them the secret")
    return derive_key(secret, "data-plane")


def secret_environment(secret: bytes) -> dict[str, str]:
    """Environment entries that hand ``secret`` to a process this one starts (never argv: other
    users can read a command line, not another user's environment)."""
    return {SECRET_ENV: secret.decode()}


def require_shared_secret(config) -> bytes | None:
    """The cluster secret of a config (:func:`load_secret`); refuses, with the one-line fix, a
    config that lists PCs besides the coordinator and has no secret: without one everything
    binds loopback only, so those PCs could never join. A one-PC config needs none."""
    secret = load_secret(config)
    others = [d.hostname for d in config.devices if not d.is_coordinator]
    if secret is None and others:
        raise ConfigError(
            f"{config.source} lists other PCs ({', '.join(others)}) but no cluster secret, so they could "
            f"never join; run `exo-lab secret secret.txt` next to it, add `secret_file: secret.txt` under "
            f"network:, and copy both files to every PC (or set ${SECRET_ENV})")
    return secret


# ---------------------------------------------------------------------------- signed requests

def sign(secret: bytes, purpose: str, message: bytes) -> str:
    """HMAC-SHA256 of ``message`` (hex) under the secret's key for ``purpose``."""
    return hmac.new(derive_key(secret, purpose), message, hashlib.sha256).hexdigest()


def signature_ok(secret: bytes, purpose: str, message: bytes, signature) -> bool:
    """Whether ``signature`` is :func:`sign`'s for ``message`` (in constant time)."""
    return hmac.compare_digest(sign(secret, purpose, message), str(signature))


def new_stamp() -> tuple[str, str]:
    """(time, nonce) for one signed request: the seconds now, and 24 random hex digits."""
    return str(int(time.time())), secrets.token_hex(12)


def stamp_fresh(timestamp, now: float | None = None) -> bool:
    """Whether ``timestamp`` (seconds) lies within MAX_STAMP_AGE_S of this PC's clock."""
    try:
        return abs((now or time.time()) - float(timestamp)) <= MAX_STAMP_AGE_S
    except (TypeError, ValueError):
        return False


class Nonces:
    """The stamps a server has accepted: each once, and only while fresh (older ones are
    forgotten, since their age refuses them anyway; the book stays bounded)."""

    def __init__(self):
        self._seen: dict[str, float] = {}

    def accept(self, timestamp, nonce) -> bool:
        """True, and remembered, for a fresh stamp not seen before; False for a stale or replayed one."""
        if not stamp_fresh(timestamp) or not isinstance(nonce, str) or nonce in self._seen:
            return False
        now = time.time()
        for old in [n for n, at in self._seen.items() if now - at > 2 * MAX_STAMP_AGE_S]:
            del self._seen[old]
        self._seen[nonce] = now
        return True

    def __len__(self) -> int:
        return len(self._seen)
