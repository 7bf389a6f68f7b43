"""Inside an engine: its PC's free memory (the OS's, and its memory cgroup's where it has one)
and its own resident memory. Read before every step (engine/worker.py), so cheap."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


UNLIMITED = 1 << 60       # a cgroup limit at or past this is none (v1 writes "no limit" as ~2^63)


def cgroup_memory(root: str | os.PathLike = "/sys/fs/cgroup", self_cgroup: str | os.PathLike = "/proc/self/cgroup"
                  ) -> tuple[int, int] | None:
    """(limit, free) bytes of the Linux memory cgroup this process runs in when it has a limit
    (a container, a systemd slice or user session with MemoryMax, a netlab PC), ancestors' limits
    included; free = limit - (charge - the page cache the kernel reclaims before it kills:
    :func:`reclaimable`). None without a limit, off Linux, or where the cgroup files cannot be read: the OS's
    figures stand. cgroup v1 (memory controller) or v2 (unified)."""
    group = _memory_group(root, self_cgroup)
    return None if group is None else group.read()


@dataclass(frozen=True)
class _MemoryGroup:
    """The memory cgroup this process is charged to: its version and folder."""

    version: int
    folder: Path
    root: Path

    def read(self) -> tuple[int, int] | None:
        """(limit, free) as :func:`cgroup_memory` says, or None (no limit, or unreadable)."""
        try:
            if self.version == 1:
                stat = _cgroup_stat(self.folder / "memory.stat")
                limit = min(stat.get("hierarchical_memory_limit", UNLIMITED),
                            _cgroup_int(self.folder / "memory.limit_in_bytes"))
                charged = _cgroup_int(self.folder / "memory.usage_in_bytes") - reclaimable(stat, 1)
            else:
                limit = min([_cgroup_int(group / "memory.max") for group in (self.folder, *self.folder.parents)
                             if (group / "memory.max").exists() and self.root in (group, *group.parents)]
                            or [UNLIMITED])
                charged = (_cgroup_int(self.folder / "memory.current")
                           - reclaimable(_cgroup_stat(self.folder / "memory.stat"), 2))
        except (OSError, ValueError):
            return None
        if limit >= UNLIMITED:
            return None
        return limit, max(0, limit - max(0, charged))


def reclaimable(stat: dict[str, int], version: int) -> int:
    """Bytes of a memory cgroup's charge the kernel frees before it kills anyone: its clean page
    cache that no process maps (the files a worker fetched and an engine read at load, say).
    Mapped, dirty and under-writeback file pages are left out: a mapped page dropped is read back
    at its next use, and the others must be written first."""
    if version == 1:
        cache = stat.get("total_inactive_file", 0) + stat.get("total_active_file", 0)
        held = sum(stat.get(key, 0) for key in ("total_mapped_file", "total_dirty", "total_writeback"))
    else:
        cache = stat.get("file", stat.get("inactive_file", 0) + stat.get("active_file", 0))
        held = sum(stat.get(key, 0) for key in ("file_mapped", "file_dirty", "file_writeback"))
    return max(0, cache - held)


def _memory_group(root, self_cgroup) -> _MemoryGroup | None:
    try:
        lines = Path(self_cgroup).read_text().splitlines()
    except OSError:
        return None
    entries = [line.split(":", 2) for line in lines if line.count(":") >= 2]
    v1 = next((path for _, controllers, path in entries if "memory" in controllers.split(",")), None)
    v2 = next((path for hierarchy, controllers, path in entries if hierarchy == "0" and not controllers), None)
    if v1 is not None:
        return _MemoryGroup(1, Path(root, "memory", v1.lstrip("/")), Path(root))
    if v2 is not None:
        return _MemoryGroup(2, Path(root, v2.lstrip("/")), Path(root))
    return None


class MemoryRoom:
    """This PC's free memory now, cheap enough to read before every step (tens of us): the
    smaller of the OS's available memory and, where the process runs under a memory cgroup
    (a container, a limited slice, a netlab PC), its limit less its charge. The cgroup is found
    once. :meth:`free_bytes` with ``enough`` answers from the group's usage alone (page cache
    counted as used) when that leaves ``enough``, and reads its memory.stat (the cache the
    kernel reclaims first, ancestors' limits) only when memory is tight."""

    def __init__(self, root: str | os.PathLike = "/sys/fs/cgroup",
                 self_cgroup: str | os.PathLike = "/proc/self/cgroup", meminfo: str | os.PathLike = "/proc/meminfo"):
        self._group = _memory_group(root, self_cgroup)
        self._meminfo = Path(meminfo)

    def free_bytes(self, enough: int | None = None) -> int:
        free = self._os_available()
        group = self._group
        if group is None:
            return free
        if enough is not None and group.version == 1:
            try:
                quick = _cgroup_int(group.folder / "memory.limit_in_bytes") - _cgroup_int(group.folder / "memory.usage_in_bytes")
            except (OSError, ValueError):
                quick = -1
            if quick >= enough and self._parents_unlimited():
                return min(free, quick)
        limited = group.read()
        return free if limited is None else min(free, limited[1])

    def limit_bytes(self) -> int | None:
        """The cgroup's limit, or None where there is none."""
        limited = self._group.read() if self._group is not None else None
        return None if limited is None else limited[0]

    def _parents_unlimited(self) -> bool:
        """Whether no ancestor of a v1 group limits it below its own limit (read once)."""
        if not hasattr(self, "_own_limit_rules"):
            stat = _cgroup_stat(self._group.folder / "memory.stat")
            try:
                own = _cgroup_int(self._group.folder / "memory.limit_in_bytes")
            except (OSError, ValueError):
                own = UNLIMITED
            self._own_limit_rules = stat.get("hierarchical_memory_limit", UNLIMITED) >= own
        return self._own_limit_rules

    def _os_available(self) -> int:
        try:
            with open(self._meminfo, "rb") as meminfo:
                head = meminfo.read(512)          # MemAvailable is the third line
            for line in head.splitlines():
                if line.startswith(b"MemAvailable:"):
                    return int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            pass
        import psutil          # macOS, Windows

        return int(psutil.virtual_memory().available)


def _cgroup_int(path: Path) -> int:
    text = path.read_text().strip()
    return UNLIMITED if text == "max" else int(text)


def _cgroup_stat(path: Path) -> dict[str, int]:
    try:
        return {key: int(value) for key, value in (line.split() for line in path.read_text().splitlines())}
    except (OSError, ValueError):
        return {}


def memory() -> dict:
    """This engine's resident and peak resident bytes."""
    import psutil

    info = psutil.Process().memory_info()
    return {"rss_bytes": int(info.rss), "peak_rss_bytes": _peak_rss_bytes()}


def _peak_rss_bytes() -> int:
    """This process's peak resident set size. On Linux VmHWM, which starts afresh at exec:
    ru_maxrss would include the RSS of the parent that forked the engine."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import resource

        scale = 1 if os.uname().sysname == "Darwin" else 1024   # ru_maxrss: bytes on macOS, KiB elsewhere
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale
    except (ImportError, AttributeError):  # Windows has no resource module
        import psutil

        return int(getattr(psutil.Process().memory_info(), "peak_wset", 0))
