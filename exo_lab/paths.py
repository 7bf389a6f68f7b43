"""Where exo-lab keeps files on a PC: the cache (models, fetched tensors, kernels, manifests)
and the state (ipyparallel profiles: connection files, logs).

- cache: ``$EXO_LAB_CACHE``; else on Linux ``~/.cache/exo_lab``, on Windows
  ``%LOCALAPPDATA%\\exo-lab\\Cache``, on macOS ``~/Library/Caches/exo-lab``.
- state: ``$EXO_LAB_HOME``; else on Linux ``~/.exo_lab``, on Windows ``%LOCALAPPDATA%\\exo-lab``,
  on macOS ``~/Library/Application Support/exo-lab``.

The environment variables always win (point the cache at a big disk: a 70B model is 140 GB).
Linux keeps the folders exo-lab has always used, so an existing cache is neither moved nor
fetched again; Windows and macOS use their platform's places (platformdirs), except where the
old folder already exists (an earlier exo-lab made it), which then stays in use.
"""
from __future__ import annotations

import logging
import os
import secrets
import shutil
import sys
import tempfile
from pathlib import Path

from . import envvars

logger = logging.getLogger(__name__)

APP_NAME = "exo-lab"
CACHE_ENV = envvars.CACHE
STATE_ENV = envvars.HOME
LEGACY_CACHE = "~/.cache/exo_lab"
LEGACY_STATE = "~/.exo_lab"


def cache_dir() -> Path:
    """exo-lab's cache folder (see the module's table): models, fetched tensors, kernels."""
    return _location(CACHE_ENV, LEGACY_CACHE, "user_cache_dir")


def state_dir() -> Path:
    """exo-lab's state folder (see the module's table): ipyparallel profiles."""
    return _location(STATE_ENV, LEGACY_STATE, "user_state_dir")


def _location(env: str, legacy: str, kind: str) -> Path:
    if os.environ.get(env):
        return Path(os.environ[env]).expanduser()
    old = Path(legacy).expanduser()
    dirs = _platform_dirs()
    if dirs is None or old.is_dir():
        return old
    return Path(getattr(dirs, kind))


def _platform_dirs():
    """platformdirs' folders for this OS on Windows and macOS; None elsewhere (Linux keeps the
    legacy folders, which platformdirs would rename to ``exo-lab``)."""
    if sys.platform == "win32":
        from platformdirs.windows import Windows as Dirs
    elif sys.platform == "darwin":
        from platformdirs.macos import MacOS as Dirs
    else:
        return None
    return Dirs(APP_NAME, appauthor=False)


# ---------------------------------------------------------------------------- atomic writes
# Every file and folder exo-lab puts in its cache appears whole or not at all: written under a
# name of this process's own beside its target (same disk: the rename is atomic), then renamed.
# Engines on one PC share the cache and may write the same thing at once.

def temp_name(target: Path, folder: Path | None = None) -> Path:
    """A temporary path for ``target``, own to this process and call, in ``folder`` (default:
    beside ``target``)."""
    return (folder or target.parent) / f".{target.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp"


def write_atomic(path: Path, data: bytes | str, temp_folder: Path | None = None) -> None:
    """Write ``data`` to ``path`` whole or not at all (a reader never sees a part); replaces
    what was there. ``temp_folder``: where the temporary goes (same disk as ``path``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path, temp_folder)
    try:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def move_folder_into_place(staging: Path, target: Path, is_complete) -> None:
    """Rename the finished folder ``staging`` to ``target``. A complete ``target``
    (``is_complete(target)``) that another builder put there meanwhile is kept; an incomplete or
    empty one is moved aside first and removed."""
    if is_complete(target):
        logger.debug("%s was built by another process meanwhile; using it", target)
        return
    stale = None
    if target.exists():
        stale = Path(tempfile.mkdtemp(prefix=f".{target.name}.stale-", dir=target.parent))
        logger.info("replacing the incomplete folder %s", target)
        os.replace(target, stale / "old")
    try:
        os.replace(staging, target)
    except OSError:
        if not is_complete(target):
            raise
        logger.debug("%s was built by another process meanwhile; using it", target)
    if stale is not None:
        shutil.rmtree(stale, ignore_errors=True)
