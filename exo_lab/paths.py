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

import os
import sys
from pathlib import Path

APP_NAME = "exo-lab"
CACHE_ENV = "EXO_LAB_CACHE"
STATE_ENV = "EXO_LAB_HOME"
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
