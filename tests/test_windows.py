"""Windows branches, run here by simulation (``sys.platform`` set to "win32", Windows' own
helpers faked): the selector event loop, platformdirs locations, the secret file's protection
(icacls) and the CPU kernels' note. The fetch cache's Windows file semantics are in
test_storage.py, the PowerShell command lines of the SSH launcher in test_ssh.py.

None of this shows how a real Windows PC answers (icacls, OpenSSH's shell, its file locks);
the README says what was and was not run on Windows.
"""
from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import platformdirs.windows
import pytest
import zmq
import zmq.asyncio

from exo_lab import paths, security
from exo_lab.coordinator import loop as loops
from exo_lab.membership.launch import default_profile_dir
from exo_lab.engine.fetch import fetched_model_dir
from exo_lab.errors import ConfigError
from exo_lab.model import cpu_kernels   # torch: imported before any test sets win32
from exo_lab.weights import smollm2


@pytest.fixture
def on_windows(monkeypatch):
    monkeypatch.setattr(sys, "platform", "win32")


# ---------------------------------------------------------------- the event loop

class _ProactorLikePolicy(asyncio.DefaultEventLoopPolicy):
    """Windows' default policy hands out Proactor loops; nothing exo-lab runs may take one."""

    def new_event_loop(self):
        raise AssertionError("exo-lab asked the default policy for a loop (Proactor on Windows)")


@pytest.fixture
def proactor_default(monkeypatch):
    monkeypatch.setattr(asyncio, "new_event_loop", _ProactorLikePolicy().new_event_loop)


def test_on_windows_every_loop_is_a_selector_loop(on_windows, proactor_default):
    made = loops.new_event_loop()
    try:
        assert isinstance(made, asyncio.SelectorEventLoop)
    finally:
        made.close()
    thread = loops.LoopThread(name="windows-test")
    try:
        assert isinstance(thread.loop, asyncio.SelectorEventLoop)
        assert thread.run(asyncio.sleep(0, "ran")) == "ran"
    finally:
        thread.stop()

    async def running_loop():
        return type(asyncio.get_running_loop())

    assert issubclass(loops.run(running_loop()), asyncio.SelectorEventLoop)


def test_run_cancels_what_is_left_and_closes_its_loop():
    left = []

    async def main():
        left.append(asyncio.get_running_loop().create_task(asyncio.sleep(60)))
        return "done"

    assert loops.run(main()) == "done"
    assert left[0].cancelled()


def test_zmq_asyncio_runs_on_the_loop_without_the_proactor_warning(on_windows):
    async def ping() -> bytes:
        context = zmq.asyncio.Context()
        pull, push = context.socket(zmq.PULL), context.socket(zmq.PUSH)
        port = pull.bind_to_random_port("tcp://127.0.0.1")
        push.connect(f"tcp://127.0.0.1:{port}")
        await push.send(b"ping")
        got = await asyncio.wait_for(pull.recv(), 10)
        pull.close(0)
        push.close(0)
        context.term()
        return got

    with warnings.catch_warnings():
        warnings.simplefilter("error")      # pyzmq's ProactorSelectorThreadWarning would raise
        assert loops.run(ping()) == b"ping"


# ---------------------------------------------------------------- cache and state folders

@pytest.fixture
def home(tmp_path, monkeypatch):
    """An empty home folder, no exo-lab variables, and Windows' known folders under it."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("USERPROFILE", str(tmp_path / "home"))    # what ~ means to Python on Windows
    monkeypatch.delenv(paths.CACHE_ENV, raising=False)
    monkeypatch.delenv(paths.STATE_ENV, raising=False)
    local = tmp_path / "home" / "AppData" / "Local"
    monkeypatch.setattr(platformdirs.windows, "get_win_folder",
                        lambda csidl: str(local) if csidl == "CSIDL_LOCAL_APPDATA" else str(tmp_path / csidl))
    return tmp_path / "home"


def test_linux_keeps_the_folders_exo_lab_always_used(home, monkeypatch):
    monkeypatch.setattr(sys, "platform", "linux")
    assert paths.cache_dir() == home / ".cache" / "exo_lab"
    assert paths.state_dir() == home / ".exo_lab"


def test_windows_uses_its_local_app_data(home, on_windows):
    local = home / "AppData" / "Local"
    assert paths.cache_dir() == local / "exo-lab" / "Cache"
    assert paths.state_dir() == local / "exo-lab"
    assert default_profile_dir("lab") == local / "exo-lab" / "profiles" / "profile_lab"


def test_macos_uses_its_library_folders(home, monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    assert paths.cache_dir() == home / "Library" / "Caches" / "exo-lab"
    assert paths.state_dir() == home / "Library" / "Application Support" / "exo-lab"


def test_the_environment_wins_and_an_earlier_folder_stays_in_use(home, on_windows, monkeypatch):
    (home / ".cache" / "exo_lab").mkdir(parents=True)     # an earlier exo-lab's cache, 100 GB
    assert paths.cache_dir() == home / ".cache" / "exo_lab"
    assert paths.state_dir() == home / "AppData" / "Local" / "exo-lab"
    monkeypatch.setenv(paths.CACHE_ENV, str(home / "big-disk"))
    monkeypatch.setenv(paths.STATE_ENV, "~/lab")
    assert paths.cache_dir() == home / "big-disk"
    assert paths.state_dir() == home / "lab"


def test_every_cache_user_asks_paths(home, on_windows):
    cache = home / "AppData" / "Local" / "exo-lab" / "Cache"
    assert fetched_model_dir("org/model").parent == cache / "fetched"
    assert smollm2._target_dir().parent == cache / "models"


# ---------------------------------------------------------------- the secret file

def test_icacls_command_leaves_only_the_owner():
    path = r"C:\Users\Ana Lima\exo lab\secret.txt"
    command = security.icacls_private_command(path, r"OFFICE\ana")
    assert command == ["icacls", path, "/inheritance:r", "/grant:r", r"OFFICE\ana:F"]
    # a list, never a shell line; as Windows joins it for icacls:
    assert subprocess.list2cmdline(command) == \
        r'icacls "C:\Users\Ana Lima\exo lab\secret.txt" /inheritance:r /grant:r OFFICE\ana:F'


class FakeIcacls:
    """subprocess.run as Windows' icacls answers it; records each call with the file's size then."""

    def __init__(self):
        self.calls, self.status = [], 0

    def __call__(self, command, **kwargs):
        self.calls.append((command, Path(command[1]).stat().st_size))
        return SimpleNamespace(returncode=self.status, stdout="",
                               stderr="Access is denied." if self.status else "")


@pytest.fixture
def icacls(monkeypatch):
    fake = FakeIcacls()
    monkeypatch.setattr(security.subprocess, "run", fake)
    monkeypatch.setenv("USERNAME", "ana")
    monkeypatch.setenv("USERDOMAIN", "OFFICE")
    return fake


def test_on_windows_the_secret_file_is_made_private_before_the_secret_goes_in(tmp_path, on_windows, icacls):
    path = security.write_secret_file(tmp_path / "secret.txt", "s" * 32)
    assert icacls.calls == [(["icacls", str(path), "/inheritance:r", "/grant:r", r"OFFICE\ana:F"], 0)]
    assert path.read_bytes() == b"s" * 32 + b"\n"
    assert "icacls" in security.secret_file_protection() and "600" not in security.secret_file_protection()


def test_on_windows_a_failed_icacls_writes_no_secret_and_gives_the_command(tmp_path, on_windows, icacls):
    icacls.status = 5
    with pytest.raises(ConfigError, match=r"Access is denied.*no secret was written.*run `icacls "):
        security.write_secret_file(tmp_path / "secret.txt", "s" * 32)
    assert (tmp_path / "secret.txt").read_bytes() == b""


def test_on_windows_without_icacls_the_error_says_so(tmp_path, on_windows, monkeypatch):
    def missing(command, **kwargs):
        raise FileNotFoundError(2, "The system cannot find the file specified", "icacls")

    monkeypatch.setattr(security.subprocess, "run", missing)
    with pytest.raises(ConfigError, match="cannot find the file specified"):
        security.write_secret_file(tmp_path / "secret.txt", "s" * 32)


def test_on_windows_reading_checks_no_mode_bits(tmp_path, on_windows):
    path = tmp_path / "secret.txt"
    path.write_text("s" * 32 + "\n")
    path.chmod(0o644)       # what Windows reports for any file it lets us read
    assert security.read_secret_file(path) == b"s" * 32


def test_elsewhere_the_protection_is_mode_600(monkeypatch):
    monkeypatch.setattr(sys, "platform", "linux")
    assert security.secret_file_protection().startswith("mode 600")


# ---------------------------------------------------------------- the CPU kernels' note

def _kernel_note(caplog) -> list[str]:
    cpu_kernels._library.cache_clear()
    try:
        with caplog.at_level(logging.INFO, logger="exo_lab.model.cpu_kernels"):
            assert not cpu_kernels.available()
            assert not cpu_kernels.available()      # asked again: still one line
    finally:
        cpu_kernels._library.cache_clear()
    return [r.getMessage() for r in caplog.records if r.name == "exo_lab.model.cpu_kernels"]


def test_on_windows_one_line_says_torch_kernels_are_used_and_why(on_windows, monkeypatch, caplog):
    monkeypatch.delenv("EXO_LAB_KERNELS", raising=False)
    lines = _kernel_note(caplog)
    assert len(lines) == 1, lines
    assert "not built on Windows" in lines[0] and "decode uses torch's slower kernels" in lines[0]


def test_without_a_compiler_one_line_says_which_to_install(monkeypatch, caplog):
    monkeypatch.delenv("EXO_LAB_KERNELS", raising=False)
    monkeypatch.setattr(cpu_kernels.platform, "machine", lambda: "x86_64")
    monkeypatch.setenv("CC", "no-such-compiler-here")
    lines = _kernel_note(caplog)
    assert len(lines) == 1, lines
    assert "no C compiler (no-such-compiler-here) was found: install gcc or clang" in lines[0]



def test_an_atomic_write_that_fails_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    """paths.write_atomic, the one way exo-lab writes into its cache: all or nothing."""
    import os

    target = tmp_path / "cache" / "manifest.json"
    paths.write_atomic(target, "old")
    assert target.read_text() == "old"

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        paths.write_atomic(target, "new")
    assert target.read_text() == "old" and [p.name for p in target.parent.iterdir()] == ["manifest.json"]
