"""The first-time path: `exo-lab init` (a starter config for this PC) and `exo-lab secret PATH`."""
from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from exo_lab.config import load_config
from exo_lab.errors import ConfigError
from exo_lab.quickstart import ThisPC, write_starter_config
from exo_lab.security import load_secret, require_shared_secret, secret_file_protection

ROOT = Path(__file__).resolve().parent.parent
OFFICE_PC = ThisPC(hostname="system-a", memory_bytes=128 * 2**30, cores=16, gpu=True)


def exo_lab(*args, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "exo_lab.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=120, cwd=cwd)


def assert_user_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def test_the_starter_config_loads_and_describes_this_pc(tmp_path):
    path = tmp_path / "config.yaml"
    write_starter_config(str(path), pc=OFFICE_PC)
    config = load_config(path)
    (device,) = config.devices
    assert device.hostname == "system-a" and device.roles == ("coordinator", "storage", "compute")
    assert device.max_memory_bytes == 103 * 10**9        # 75% of 128 GiB (137.4 GB), in whole GB
    assert device.max_cores == 16 and device.gpu is True
    assert config.cluster_name == "system-a-cluster"
    assert config.network.discovery == "auto" and config.network.port_range == (10100, 10199)
    assert config.network.secret_file == str(tmp_path / "secret.txt")
    assert require_shared_secret(config) == load_secret(config)      # the secret is there and readable
    if os.name == "posix":
        assert stat.S_IMODE((tmp_path / "secret.txt").stat().st_mode) == 0o600


def test_init_on_this_pc_probes_it(tmp_path):
    result = exo_lab("init", "--output", tmp_path / "config.yaml", "--cluster-name", "lab")
    assert result.returncode == 0, result.stderr
    assert "check-config" in result.stdout and "secret.txt" in result.stdout
    config = load_config(tmp_path / "config.yaml")
    (device,) = config.devices
    assert config.cluster_name == "lab"
    assert device.hostname == socket.gethostname().split(".")[0]
    assert device.max_cores == os.cpu_count()
    assert exo_lab("check-config", tmp_path / "config.yaml").returncode == 0


def test_init_never_replaces_a_config_without_force_and_keeps_the_secret(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("mine\n")
    assert_user_error(exo_lab("init", "--output", path), "exists", "--force")
    assert path.read_text() == "mine\n" and not (tmp_path / "secret.txt").exists()
    (tmp_path / "secret.txt").write_text("an-existing-secret-0123456789\n")
    os.chmod(tmp_path / "secret.txt", 0o600)
    result = exo_lab("init", "--output", path, "--force")
    assert result.returncode == 0, result.stderr
    assert "kept the existing cluster secret" in result.stdout
    assert (tmp_path / "secret.txt").read_text() == "an-existing-secret-0123456789\n"
    load_config(path)


def test_a_bad_cluster_name_writes_nothing(tmp_path):
    with pytest.raises(ConfigError, match="cluster_name"):
        write_starter_config(str(tmp_path / "config.yaml"), cluster_name="my lab", pc=OFFICE_PC)
    assert list(tmp_path.iterdir()) == []


def test_secret_prints_the_config_lines_and_the_next_step(tmp_path):
    result = exo_lab("secret", "secret.txt", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    start = lines.index("network:")
    assert yaml.safe_load("\n".join(lines[start:start + 2])) == {"network": {"secret_file": "secret.txt"}}
    assert lines[-1].startswith("next: copy secret.txt to every PC") and "check-config" in lines[-1]
    assert ("mode 600" in result.stdout) == (sys.platform != "win32")
    assert_user_error(exo_lab("secret", "secret.txt", cwd=tmp_path), "exists", "--force")


def test_secret_claims_mode_600_only_where_the_os_has_it(monkeypatch):
    monkeypatch.setattr(sys, "platform", "win32")
    claimed = secret_file_protection()
    monkeypatch.undo()
    assert "mode 600" not in claimed and "icacls" in claimed


def test_the_seed_example_needs_its_secret_then_checks(tmp_path):
    """README's first steps on the seed's three office PCs: check-config refuses the config until
    `exo-lab secret secret.txt` has written the file it names."""
    shutil.copy(ROOT / "examples" / "config.yaml", tmp_path / "config.yaml")
    refused = exo_lab("check-config", "config.yaml", cwd=tmp_path)
    assert_user_error(refused, "secret")
    assert exo_lab("secret", "secret.txt", cwd=tmp_path).returncode == 0
    checked = exo_lab("check-config", "config.yaml", cwd=tmp_path)
    assert checked.returncode == 0, checked.stderr
    assert "system-b.local" in checked.stdout


def test_check_config_refuses_other_pcs_without_a_secret(tmp_path):
    config = {"cluster_name": "office", "network": {"discovery": "auto"},
              "devices": [{"hostname": "system-a", "roles": ["coordinator", "storage"]},
                          {"hostname": "system-b", "roles": ["compute"]}]}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    assert_user_error(exo_lab("check-config", tmp_path / "config.yaml"), "system-b", "exo-lab secret")
