"""A PC's memory as its cgroup gives it (a container, a systemd slice): the engine's probe reads
the limit instead of the machine's RAM. The cgroup files are parsed from fake trees for v1 and
v2, then read for real: a process in a cgroup v1 memory group of this machine with a limit."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from exo_lab.engine.probe import UNLIMITED, cgroup_memory
from exo_lab.engine.room import MemoryRoom

GB = 10**9


def write(folder: Path, files: dict[str, str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text)


def test_v1_takes_the_hierarchical_limit_and_leaves_inactive_cache_free(tmp_path):
    (tmp_path / "self").write_text("4:memory:/office/pc\n0::/\n")
    write(tmp_path / "memory" / "office" / "pc", {
        "memory.limit_in_bytes": str(8 * GB), "memory.usage_in_bytes": str(3 * GB),
        "memory.stat": f"total_inactive_file {GB}\nhierarchical_memory_limit {6 * GB}\n"})
    assert cgroup_memory(tmp_path, tmp_path / "self") == (6 * GB, 4 * GB)
    # active clean cache is reclaimable too; mapped, dirty and under-writeback pages are not
    (tmp_path / "memory" / "office" / "pc" / "memory.stat").write_text(
        f"total_inactive_file {GB}\ntotal_active_file {GB}\ntotal_mapped_file {GB // 4}\ntotal_dirty {GB // 4}\n"
        f"hierarchical_memory_limit {6 * GB}\n")
    assert cgroup_memory(tmp_path, tmp_path / "self") == (6 * GB, int(4.5 * GB))


def test_v2_takes_the_lowest_limit_of_the_group_and_its_parents(tmp_path):
    (tmp_path / "self").write_text("0::/user.slice/session\n")
    write(tmp_path / "user.slice", {"memory.max": str(5 * GB)})
    write(tmp_path / "user.slice" / "session", {"memory.max": "max", "memory.current": str(2 * GB),
                                                "memory.stat": f"anon 1\ninactive_file {GB // 2}\n"})
    assert cgroup_memory(tmp_path, tmp_path / "self") == (5 * GB, int(3.5 * GB))


def test_no_limit_or_no_files_leaves_the_os_figures(tmp_path):
    (tmp_path / "self").write_text("0::/\n")
    write(tmp_path, {"memory.max": "max", "memory.current": "1", "memory.stat": ""})
    assert cgroup_memory(tmp_path, tmp_path / "self") is None
    (tmp_path / "self").write_text("4:memory:/gone\n")
    assert cgroup_memory(tmp_path, tmp_path / "self") is None
    assert cgroup_memory(tmp_path, tmp_path / "missing") is None
    assert UNLIMITED < 2**63


def test_the_room_read_before_each_step_is_the_smaller_of_the_os_and_the_group_and_follows_a_lowered_limit(tmp_path):
    (tmp_path / "self").write_text("4:memory:/pc\n")
    (tmp_path / "meminfo").write_text("MemTotal: 100 kB\nMemFree: 1 kB\nMemAvailable: 7812500 kB\n")   # 8 GB
    group = tmp_path / "memory" / "pc"
    write(group, {"memory.limit_in_bytes": str(6 * GB), "memory.usage_in_bytes": str(3 * GB),
                  "memory.stat": f"total_inactive_file {GB}\nhierarchical_memory_limit {6 * GB}\n"})
    room = MemoryRoom(tmp_path, tmp_path / "self", tmp_path / "meminfo")
    assert room.free_bytes() == 4 * GB and room.limit_bytes() == 6 * GB        # the cache counts as free
    assert room.free_bytes(enough=GB) == 3 * GB          # plenty: usage alone says so, stat unread
    write(group, {"memory.limit_in_bytes": str(4 * GB)})  # the owner's limit lowered mid-run
    assert room.free_bytes(enough=GB) == 1 * GB
    assert room.free_bytes(enough=2 * GB) == 2 * GB     # tight: the stat's cache counts (hierarchical 6 GB)
    (tmp_path / "meminfo").write_text("MemAvailable: 976562 kB\n")                                    # 1 GB
    assert room.free_bytes() == 999_999_488 and MemoryRoom(tmp_path, tmp_path / "none", tmp_path / "meminfo").free_bytes() == 999_999_488


MEMORY = Path("/sys/fs/cgroup/memory")


@pytest.mark.skipif(not os.access(MEMORY / "cgroup.procs", os.W_OK), reason="needs a writable cgroup v1 memory controller")
def test_an_engine_in_a_limited_cgroup_reports_the_limit_as_its_memory():
    group = MEMORY / f"exolab-probe-{uuid.uuid4().hex[:8]}"
    group.mkdir()
    try:
        (group / "memory.limit_in_bytes").write_text(str(3 * GB))
        code = ("import json; from exo_lab.engine.probe import probe_resources; p = probe_resources(False); "
                "print(json.dumps([p.memory_total_bytes, p.memory_free_bytes]))")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True,
                              preexec_fn=lambda: (group / "cgroup.procs").write_text(str(os.getpid())))
        total, free = json.loads(done.stdout)
        limit = int((group / "memory.limit_in_bytes").read_text())
        # free: the group's room plus what the probing process holds itself (its own to plan with)
        assert total == limit and 0 < free <= limit
    finally:
        group.rmdir()
