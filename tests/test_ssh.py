"""``launcher: ssh`` for real: an OpenSSH server in each netlab PC, started from the coordinator.

coord (coordinator + storage, has the model) starts ``python -m exo_lab.server`` with
``launcher: ssh``; pc-b and pc-c each run Debian's ``sshd`` (its own config, port, host key, key
auth only) in their namespaces, and the model folder is hidden from them. The coordinator probes
both over SSH, ipyparallel's SSHEngineSetLauncher starts ``python -m exo_lab.worker`` on each
(same venv path: the namespaces share this machine's filesystem), they join with the secret,
a request is served, and Ctrl-C leaves nothing running but the sshd. A PC with a wrong key, and
one whose python is missing, are named with their reason before anything starts.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

import netlab
from procs import read_until

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


def _unavailable() -> str | None:
    reason = netlab.unavailable()
    if reason:
        return reason
    if not os.path.exists(SSHD) or shutil.which("ssh") is None or shutil.which("ssh-keygen") is None:
        return "needs Debian's openssh-server and openssh-client (.ci/run installs them)"
    return None


REASON = _unavailable()
needs_sshd = pytest.mark.skipif(REASON is not None, reason=f"ssh launcher tests skipped: {REASON}")

SSH_PORT = 2222
API_PORT = 8000
SERVICE_PORT = 10100

SSHD_CONFIG = """\
Port {port}
ListenAddress {address}
HostKey {keys}/host_key
AuthorizedKeysFile {keys}/authorized_keys
PidFile {keys}/sshd-{name}.pid
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PrintMotd no
LogLevel ERROR
SetEnv EXO_LAB_HOME={root}/exo_lab EXO_LAB_CACHE={root}/cache
Subsystem sftp /usr/lib/openssh/sftp-server
"""

CONFIG = """\
cluster_name: {name}
devices:
  - hostname: coord
    roles: [coordinator, storage]
    address: {coord}
  - hostname: pc-b
    roles: [compute]
    max_cores: 1
    address: {pc_b}
  - hostname: pc-c
    roles: [compute]
    max_cores: 1
    address: {pc_c}
network:
  discovery: manual
  service_port: {service_port}
api:
  host: 0.0.0.0
  port: {api_port}
launcher:
  kind: ssh
  user: root
  port: {ssh_port}
  python: {python}
  identity_file: {keys}/client_key
  options: [StrictHostKeyChecking=no, UserKnownHostsFile=/dev/null, LogLevel=ERROR]
{overrides}"""


def keygen(path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)


@pytest.fixture(scope="module")
def sshlab(tmp_path_factory):
    from exo_lab.weights.demo import demo_model_dir
    from exo_lab.security import new_secret

    root = tmp_path_factory.mktemp("sshlab")
    keys = root / "keys"
    keys.mkdir(mode=0o700)
    for name in ("host_key", "client_key", "wrong_key"):
        keygen(keys / name)
    shutil.copy(keys / "client_key.pub", keys / "authorized_keys")
    model = root / "model"
    shutil.copytree(demo_model_dir(), model)
    os.makedirs("/run/sshd", exist_ok=True)    # sshd's privilege separation folder
    with netlab.Netlab(["coord", "pc-b", "pc-c"], root / "pcs") as net:
        for name in ("pc-b", "pc-c"):
            pc = net.pcs[name]
            config = keys / f"sshd-{name}.conf"
            config.write_text(SSHD_CONFIG.format(port=SSH_PORT, address=pc.address, keys=keys, name=name,
                                                 root=pc.root))
            net.start(name, [SSHD, "-D", "-e", "-f", str(config)], hide=(model,))
        yield net, keys, model, new_secret()


def write_config(net, keys, path, overrides: str = "") -> None:
    path.write_text(CONFIG.format(
        name=f"ssh-{net.run_id}", coord=net.pcs["coord"].address, pc_b=net.pcs["pc-b"].address,
        pc_c=net.pcs["pc-c"].address, service_port=SERVICE_PORT, api_port=API_PORT, ssh_port=SSH_PORT,
        python=sys.executable, keys=keys, overrides=overrides))


def sshd_only(net, name: str) -> list[str]:
    """The commands still running in a PC's namespace other than its sshd listener."""
    left = []
    for pid in net.pids(name):
        try:
            command = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if not re.search(r"sshd -D -e -f", command) and not command.startswith(("unshare", "sh -c")):
            left.append(f"{pid}: {command}")
    return left


@needs_sshd
def test_one_command_starts_every_pc_over_ssh_serves_and_stops_clean(sshlab, tmp_path):
    net, keys, model, secret = sshlab
    config = tmp_path / "config.yaml"
    write_config(net, keys, config)
    started = time.monotonic()
    server = net.start("coord", [sys.executable, "-m", "exo_lab.server", "--config", str(config),
                                 "--model", str(model), "--min-stages", "2"],
                       env={"EXO_LAB_SECRET": secret}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       text=True)
    lines: list[str] = []
    try:
        read_until(server, "engine(s) up", 90, lines)
        ready_s = time.monotonic() - started
        read_until(server, "serving", 120, lines)
        text = "".join(lines)
        for name in ("pc-b", "pc-c"):
            assert f"{name}: ssh root@{net.pcs[name].address}:{SSH_PORT} ok" in text, text
            assert f"{name}: worker started over SSH" in text, text
        assert secret not in text
        print(f"\nready over SSH (2 PCs, probe + workers + engines joined) in {ready_s:.1f} s")

        from openai import OpenAI

        client = OpenAI(base_url=f"http://{net.pcs['coord'].address}:{API_PORT}/v1", api_key="unused",
                        max_retries=0, timeout=60)
        reply = client.completions.create(model=str(model), prompt="The cluster", max_tokens=8, temperature=0)
        assert reply.choices[0].text
        for name in ("coord", "pc-b", "pc-c"):    # the secret is never on a command line (ps)
            for pid in net.pids(name):
                try:
                    assert secret.encode() not in open(f"/proc/{pid}/cmdline", "rb").read()
                except OSError:
                    pass
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGINT)      # Ctrl-C
        out, _ = server.communicate(timeout=60)
        lines.append(out or "")
    assert server.returncode == 0, "".join(lines)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and (sshd_only(net, "pc-b") or sshd_only(net, "pc-c")):
        time.sleep(0.5)
    assert sshd_only(net, "pc-b") == [] and sshd_only(net, "pc-c") == []


@needs_sshd
def test_a_pc_with_a_wrong_key_or_no_python_is_named_before_anything_starts(sshlab, tmp_path):
    net, keys, model, secret = sshlab
    config = tmp_path / "config.yaml"
    write_config(net, keys, config, overrides=(
        "  devices:\n"
        f"    pc-b: {{identity_file: {keys}/wrong_key}}\n"
        "    pc-c: {python: /nonexistent/bin/python3}\n"))
    result = net.run("coord", [sys.executable, "-m", "exo_lab.server", "--config", str(config),
                               "--model", str(model)], env={"EXO_LAB_SECRET": secret}, timeout_s=60)
    out = result.stdout
    assert result.returncode == 2, out
    error = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(error) == 1, out
    assert "pc-b: SSH authentication failed as root with" in error[0] and "wrong_key" in error[0], out
    assert "pc-c: python '/nonexistent/bin/python3' is missing there" in error[0], out
    assert "engine(s) up" not in out and secret not in out
    assert sshd_only(net, "pc-b") == [] and sshd_only(net, "pc-c") == []

    from exo_lab.config import SSHHostConfig
    from exo_lab.membership.launchers import SSHTarget, probe_target

    settings = SSHHostConfig(user="root", port=SSH_PORT, python=sys.executable, identity_file=str(keys / "client_key"))
    target = SSHTarget("pc-c", net.pcs["pc-c"].address, settings)
    options = ("StrictHostKeyChecking=no", "UserKnownHostsFile=/dev/null", "LogLevel=ERROR")
    assert probe_target(target, options, str(config)) is None
    assert probe_target(target, options, "/nowhere/config.yaml").startswith("there is no /nowhere/config.yaml there")


@pytest.mark.skipif(shutil.which("ssh") is None, reason="needs openssh-client (.ci/run installs it)")
def test_an_unreachable_pc_is_named(tmp_path):
    from exo_lab.config import SSHHostConfig
    from exo_lab.membership.launchers import SSHTarget, probe_target

    # a closed port on loopback: refused at once, nothing leaves this machine
    target = SSHTarget("pc-x", "127.0.0.1", SSHHostConfig(user="nobody", port=1))
    reason = probe_target(target, ("StrictHostKeyChecking=no", "UserKnownHostsFile=/dev/null"))
    assert reason.startswith("unreachable over SSH at 127.0.0.1:1"), reason


def test_a_worker_that_ends_fails_the_wait_at_once_with_its_last_words():
    from types import SimpleNamespace

    from exo_lab.membership.launchers import wait_for_launched_engines
    from exo_lab.errors import ClusterError

    class Client:
        def wait_for_engines(self, count, timeout, interactive):
            raise TimeoutError

    ended = SimpleNamespace(pid=7, ssh_sender=SimpleNamespace(cmd_running=lambda pid: False),
                            get_output=lambda: "starting\nerror: refused by the coordinator: wrong secret\n")
    running = SimpleNamespace(pid=8, ssh_sender=SimpleNamespace(cmd_running=lambda pid: True))
    ipp = SimpleNamespace(engines={"exo-lab-ssh-pc-b": SimpleNamespace(launchers={"a": ended}),
                                   "exo-lab-ssh-pc-c": SimpleNamespace(launchers={"b": running})})
    started = time.monotonic()
    with pytest.raises(ClusterError, match=r"pc-b: its worker ended: starting \| error: refused") as caught:
        wait_for_launched_engines(Client(), ipp, 2, timeout_s=60, check_every_s=0.01)
    assert "pc-c" not in str(caught.value) and time.monotonic() - started < 5


# ---------------------------------------------------------------- config and probe classification

BASE = {"cluster_name": "c", "devices": [{"hostname": "a", "roles": ["coordinator"]},
                                          {"hostname": "b", "roles": ["compute"], "engines": 2}]}


def load(launcher):
    from exo_lab.config import config_from_dict

    return config_from_dict({**BASE, "launcher": launcher})


def test_launcher_config_defaults_overrides_and_errors():
    from exo_lab.errors import ConfigError

    assert load("manual").launcher.kind == "manual" and load("ssh").launcher.kind == "ssh"
    config = load({"kind": "ssh", "user": "lab", "port": 2200, "devices": {"b": {"port": 22, "python": "/v/py"}}})
    assert config.launcher.ssh_for("b.local") == type(config.launcher.ssh)(user="lab", port=22, python="/v/py")
    from exo_lab.config import format_config_summary

    assert format_config_summary(config).splitlines()[-1] == "launcher: ssh (lab@PC:2200, python as here, 1 PC override(s))"
    for bad, message in (({"kind": "sssh"}, "did you mean 'ssh'"),
                         ({"kind": "ssh", "partition": "gpu"}, "'partition' is a setting of the slurm launcher"),
                         ({"kind": "ssh", "devices": {"z": {}}}, "names 'z', which is not a compute PC"),
                         ({"kind": "ssh", "devices": {"b": {"prot": 1}}}, "did you mean 'port'"),
                         ({"kind": "ssh", "port": 0}, "'port' must be a positive whole number"),
                         ({"kind": "ssh", "options": ["accept-new"]}, "Name=value"),
                         ({"kind": "slurm", "time": "4h"}, "Slurm time limit")):
        with pytest.raises(ConfigError, match=re.escape(message)):
            load(bad)


def test_ssh_engine_map_runs_the_worker_and_sends_no_connection_file(tmp_path):
    from exo_lab.config import load_config
    from exo_lab.membership.launchers import ssh_engine_map

    path = tmp_path / "config.yaml"
    path.write_text("cluster_name: c\ndevices:\n  - {hostname: a, roles: [coordinator]}\n"
                    "  - {hostname: b, roles: [compute], address: 198.18.0.9}\n"
                    "launcher: {kind: ssh, user: lab, port: 2200, python: /v/bin/python, identity_file: id}\n")
    engines = ssh_engine_map(load_config(path))
    assert list(engines) == ["lab@198.18.0.9:2200"]
    entry = engines["lab@198.18.0.9:2200"]
    assert entry["engine_cmd"] == ["/v/bin/python", "-m", "exo_lab.worker", "--config", str(path.absolute()),
                                   "--device", "b"]
    assert entry["to_send"] == [] and entry["n"] == 1 and entry["remote_python"] == "/v/bin/python"
    assert ["-i", str(tmp_path / "id")] == entry["ssh_args"][4:6]


@pytest.mark.parametrize("code, output, expected", [
    (255, "root@x: Permission denied (publickey).", "SSH authentication failed"),
    (255, "ssh: connect to host x port 22: Connection refused", "unreachable over SSH"),
    (255, "Host key verification failed.", "host key is not known"),
    (127, "sh: 1: /opt/py: not found", "is missing there"),
    (1, "ModuleNotFoundError: No module named 'exo_lab'", "exo-lab is not installed"),
    (0, "exo-lab-probe 0.0.1 True", "exo-lab 0.0.1 is installed there, but this coordinator runs"),
    (0, f"exo-lab-probe {__import__('exo_lab').__version__} False", "there is no config.yaml there"),
])
def test_probe_failures_say_why(code, output, expected):
    from exo_lab.config import SSHHostConfig
    from exo_lab.membership.launchers import SSHTarget, classify_probe

    reason = classify_probe(SSHTarget("b", "b", SSHHostConfig(python="/opt/py")), code, output)
    assert expected in reason, reason


def test_launched_workers_need_a_shared_secret():
    from exo_lab.membership.launchers import check_launchable
    from exo_lab.errors import ConfigError

    with pytest.raises(ConfigError, match="set network.secret_file"):
        check_launchable(load("ssh"), None)
    check_launchable(load("manual"), None)


def test_the_command_stream_with_the_environment_is_never_logged():
    import logging

    from exo_lab.membership.launchers import HideCommandStream

    hide = HideCommandStream()
    record = logging.LogRecord("x", logging.DEBUG, __file__, 1, "[ShellCommandSend._cmd_send] python command: \n%s",
                               ("...",), None)
    assert not hide.filter(record)
    assert hide.filter(logging.LogRecord("x", logging.DEBUG, __file__, 1, "check_output %s", ("ssh",), None))


# ---------------------------------------------------------------- command lines for the PC's shell

WINDOWS_PYTHON = r"C:\Program Files\Python311\python.exe"
AWKWARD = ["it's", "a b", "$HOME", "%PATH%", "`whoami`", r"C:\exo lab\config.yaml", r"\\server\share\x", "‘quoted’"]


def _powershell_script(command: str) -> str:
    import base64

    head, encoded = command.rsplit(" ", 1)
    assert head == "powershell -NoProfile -NonInteractive -EncodedCommand"
    assert re.fullmatch(r"[A-Za-z0-9+/=]+", encoded)     # nothing for cmd.exe or PowerShell to expand
    return base64.b64decode(encoded).decode("utf-16-le")


def test_posix_command_lines_survive_a_posix_shell():
    from exo_lab.membership.launchers import remote_command

    args = ["/opt/py thon/bin/python", "-c", "print(1)", *AWKWARD]
    line = remote_command(args, "posix")
    echoed = subprocess.run(["sh", "-c", f"printf '%s\\n' {line}"], capture_output=True, text=True, check=True)
    assert echoed.stdout.splitlines() == args


def test_powershell_command_lines_quote_every_argument_literally():
    from exo_lab.membership.launchers import powershell_quote, remote_command

    script = _powershell_script(remote_command([WINDOWS_PYTHON, "-c", "print('hi')", *AWKWARD], "powershell"))
    assert script == ("& 'C:\\Program Files\\Python311\\python.exe' '-c' 'print(''hi'')' 'it''s' 'a b' '$HOME' "
                      "'%PATH%' '`whoami`' 'C:\\exo lab\\config.yaml' '\\\\server\\share\\x' '‘‘quoted’’'"
                      "; if ($null -eq $LASTEXITCODE) { exit 127 }; exit $LASTEXITCODE")
    assert powershell_quote("") == "''"


def test_powershell_refuses_a_double_quote_it_would_split():
    from exo_lab.membership.launchers import powershell_quote
    from exo_lab.errors import ConfigError

    with pytest.raises(ConfigError, match="double quote"):
        powershell_quote('say "hi"')


def test_the_probe_is_built_for_each_pcs_shell_and_never_carries_the_secret(monkeypatch, tmp_path):
    from types import SimpleNamespace

    import exo_lab
    from exo_lab.config import load_config
    from exo_lab.membership import launchers

    monkeypatch.setenv("EXO_LAB_SECRET", "the-secret-never-on-a-command-line")
    path = tmp_path / "config.yaml"
    path.write_text("cluster_name: c\nnetwork: {secret_file: s}\ndevices:\n"
                    "  - {hostname: a, roles: [coordinator]}\n  - {hostname: b, roles: [compute]}\n"
                    "  - {hostname: win, roles: [compute]}\n"
                    "launcher:\n  kind: ssh\n  devices:\n"
                    f"    win: {{shell: powershell, python: '{WINDOWS_PYTHON}'}}\n")
    seen = {}

    def ssh(command, **kwargs):     # every PC answers the probe: fine
        seen[command[-2]] = command
        return SimpleNamespace(returncode=0, stdout=f"exo-lab-probe {exo_lab.__version__} True", stderr="")

    monkeypatch.setattr(launchers.subprocess, "run", ssh)
    config = load_config(path)
    for target in launchers.ssh_targets(config):
        assert launchers.probe_target(target, config_path=r"C:\lab\config.yaml") is None
    posix, windows = seen["b"][-1], seen["win"][-1]
    assert posix.startswith(f"{sys.executable} -c ") and posix.endswith(r"'C:\lab\config.yaml'")
    assert _powershell_script(windows).startswith(f"& '{WINDOWS_PYTHON}' '-c' 'import exo_lab")
    everything = " ".join([*seen["b"], *seen["win"], _powershell_script(windows),
                           repr(launchers.ssh_engine_map(config))])
    assert "the-secret" not in everything and "EXO_LAB_SECRET" not in everything


@pytest.mark.parametrize("output", [
    "& : The term 'C:\\Python311\\python.exe' is not recognized as the name of a cmdlet, function, script file",
    "'C:\\Python311\\python.exe' is not recognized as an internal or external command,"])
def test_a_missing_python_on_windows_is_named(output):
    from exo_lab.config import SSHHostConfig
    from exo_lab.membership.launchers import SSHTarget, classify_probe

    target = SSHTarget("win", "win", SSHHostConfig(python=r"C:\Python311\python.exe", shell="powershell"))
    assert "is missing there" in classify_probe(target, 127, output)
