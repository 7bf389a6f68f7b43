"""Starting the compute PCs' workers from the coordinator: ``launcher: ssh`` and ``launcher: slurm``.

exo-lab grows no process manager: ipyparallel's own launchers start and stop the processes
(``SSHEngineSetLauncher`` with its ``engines = {"user@host:port": ...}`` map and
``remote_python``; ``SlurmEngineSetLauncher`` with its batch template). What they start on each
PC is not a bare ``ipengine`` but ``python -m exo_lab.worker --config C --device HOST``, the same
service a person starts by hand: it joins through the handshake keyed by the cluster secret,
derives the ipyparallel key itself and starts this PC's engines under a lifeline. So a launched
PC joins exactly like a hand-started one, no connection file (with the key in it) is copied, and
the worker's SIGTERM (ipyparallel's stop) ends its engines.

The secret: over SSH it travels inside ipyparallel's command stream on ssh's stdin (ipyparallel 9
sends the environment as part of the Python it pipes to the remote interpreter), so it is never
an argument of any process (``ps``) and never logged; the remote worker reads ``$EXO_LAB_SECRET``.
Under Slurm it is not passed at all: the job reads ``network.secret_file`` on the site's shared
folder (the batch script, which Slurm stores, never holds it).

Before anything starts, each PC is probed with one short ``ssh ... python -c`` so that a PC that
cannot come up is named with its reason: unreachable, auth failed, python missing, exo-lab
missing or a different version. ssh hands that command to the PC's login shell as one string,
quoted for it (:func:`remote_command`): a POSIX shell, or with ``shell: powershell`` a Windows PC
(OpenSSH for Windows, whose default shell is cmd.exe or PowerShell). ipyparallel's own launcher
finds out the remote shell by itself.
"""
from __future__ import annotations

import base64
import concurrent.futures
import logging
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .. import envvars
from ..config import ClusterConfig, SSHHostConfig
from ..errors import ClusterError, ConfigError

logger = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 20.0
SSH_CONNECT_TIMEOUT_S = 5
_PROBE_CODE = ("import exo_lab, os, sys; print('exo-lab-probe', exo_lab.__version__, "
               "os.path.isfile(sys.argv[1]))")


@dataclass(frozen=True)
class SSHTarget:
    """One compute PC as the SSH launcher reaches it."""

    hostname: str               # the device's name in config.yaml (--device on the PC)
    address: str                # where ssh connects (device address, else hostname)
    settings: SSHHostConfig

    @property
    def location(self) -> str:
        """``user@host:port``, the key of ipyparallel's ``SSHEngineSetLauncher.engines``."""
        user = f"{self.settings.user}@" if self.settings.user else ""
        port = f":{self.settings.port}" if self.settings.port else ""
        return f"{user}{self.address}{port}"

    @property
    def python(self) -> str:
        return self.settings.python or sys.executable

    @property
    def shell(self) -> str:
        """The PC's login shell as ``launcher.shell`` names it: "posix" (default) or "powershell"."""
        return getattr(self.settings, "shell", None) or "posix"

    def ssh_options(self, extra: tuple[str, ...] = ()) -> list[str]:
        """Options shared by ssh and scp: never prompt, fail fast, the configured key."""
        options = ["-o", "BatchMode=yes", "-o", f"ConnectTimeout={SSH_CONNECT_TIMEOUT_S}"]
        if self.settings.identity_file:
            options += ["-i", self.settings.identity_file, "-o", "IdentitiesOnly=yes"]
        for option in extra:
            options += ["-o", option]
        return options

    def ssh_command(self, extra: tuple[str, ...] = ()) -> list[str]:
        """``ssh [options] [-p port] [user@]address`` (append the remote command)."""
        port = ["-p", str(self.settings.port)] if self.settings.port else []
        user = f"{self.settings.user}@" if self.settings.user else ""
        return ["ssh", *self.ssh_options(extra), *port, f"{user}{self.address}"]


def ssh_targets(config: ClusterConfig) -> list[SSHTarget]:
    """The compute PCs other than the coordinator, each with its SSH settings."""
    return [SSHTarget(d.hostname, d.address or d.hostname, config.launcher.ssh_for(d.hostname))
            for d in config.compute_devices if not d.is_coordinator]


def remote_config_path(config: ClusterConfig) -> str:
    """config.yaml's path on the compute PCs: ``launcher.config``, else this file's own path."""
    if config.launcher.config:
        return config.launcher.config
    if config.source.startswith("<"):
        raise ConfigError("launcher: ssh/slurm starts `python -m exo_lab.worker --config PATH` on the "
                          "compute PCs, but this config came from no file; set launcher.config")
    return str(Path(config.source).absolute())


def worker_command(python: str, config_path: str, device: str | None) -> list[str]:
    """The command a launcher runs on a compute PC: exo-lab's worker service."""
    command = [python, "-m", "exo_lab.worker", "--config", config_path]
    return command + (["--device", device] if device else [])


# ------------------------------------------------------------------ remote command lines

def remote_command(args: list[str], shell: str = "posix") -> str:
    """The one string ssh hands to the PC's login shell to run ``args`` as they are."""
    if shell == "powershell":
        return powershell_command(args)
    if shell != "posix":
        raise ConfigError(f"unknown launcher shell {shell!r}; use posix or powershell")
    return shlex.join(args)


def powershell_command(args: list[str]) -> str:
    """``powershell -EncodedCommand ...`` running ``args``: Windows PowerShell runs it the same
    whether OpenSSH's default shell is cmd.exe or PowerShell, since the script travels as base64
    (nothing in it for cmd's ``%`` or PowerShell's ``$`` to expand). The script exits with the
    program's status, or 127 (as POSIX shells do) when there is no such program."""
    script = ("& " + " ".join(powershell_quote(a) for a in args)
              + "; if ($null -eq $LASTEXITCODE) { exit 127 }; exit $LASTEXITCODE")
    encoded = base64.b64encode(script.encode("utf-16-le")).decode("ascii")
    return f"powershell -NoProfile -NonInteractive -EncodedCommand {encoded}"


def powershell_quote(arg: str) -> str:
    """``arg`` as a PowerShell single-quoted string: literal (no ``$``, backtick or ``%``
    expansion; backslashes stay); its single quotes, typographic ones included, are doubled."""
    if '"' in arg:
        # Windows PowerShell 5.1 passes a double quote inside an argument on to the program
        # unescaped, which splits the argument; no Windows path holds one
        raise ConfigError(f"cannot pass {arg!r} to a program through Windows PowerShell: it holds a "
                          f"double quote; remove it (Windows paths cannot contain one)")
    return "'" + re.sub("(['\u2018\u2019\u201a\u201b])", r"\1\1", arg) + "'"


# ------------------------------------------------------------------ the SSH probe

def classify_probe(target: SSHTarget, returncode: int, output: str, config_path: str = "config.yaml") -> str | None:
    """Why ``target`` cannot run a worker, from the probe's exit status and output; None: fine."""
    from .. import __version__

    text = output.strip()
    last = text.splitlines()[-1] if text else ""
    if returncode == 0 and last.startswith("exo-lab-probe "):
        version, config_found = last.split()[1:3]
        if version != __version__:
            return (f"exo-lab {version} is installed there, but this coordinator runs {__version__}; "
                    f"install the same version on every PC")
        if config_found != "True":
            return (f"there is no {config_path} there; put config.yaml at that path on every PC "
                    f"(a shared folder), or set launcher.config to where it is")
        return None
    lowered = text.lower()
    if returncode == 255:
        if "permission denied" in lowered or "too many authentication failures" in lowered:
            key = target.settings.identity_file or "ssh's default keys"
            return (f"SSH authentication failed as {target.settings.user or 'this user'} with {key}; "
                    f"add the public key to that account's ~/.ssh/authorized_keys, or fix "
                    f"launcher.user / identity_file")
        if "host key verification failed" in lowered or "remote host identification" in lowered:
            return (f"its SSH host key is not known (or changed); connect once with `ssh {target.address}` "
                    f"to check and accept it")
        return (f"unreachable over SSH at {target.address}:{target.settings.port or 22} ({last or 'no answer'}); "
                f"check that the PC is on, sshd runs and launcher.port is right")
    if (returncode == 127 or "no such file or directory" in lowered or "command not found" in lowered
            or "is not recognized as" in lowered):     # cmd.exe and PowerShell
        return (f"python {target.python!r} is missing there ({last}); set launcher.python (or "
                f"launcher.devices.{target.hostname}.python) to the interpreter that has exo-lab")
    if "modulenotfounderror" in lowered or "no module named" in lowered:
        return (f"exo-lab is not installed for {target.python} there ({last}); "
                f"`{target.python} -m pip install exo-lab` (the same version as here)")
    return f"the probe `{target.python} -c 'import exo_lab'` failed with status {returncode}: {last}"


def probe_target(target: SSHTarget, extra_options: tuple[str, ...] = (), config_path: str = "config.yaml",
                 timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
    """One ``ssh PC python -c 'import exo_lab'`` (and is config.yaml there?): None when the PC
    can run a worker, else why not."""
    remote = remote_command([target.python, "-c", _PROBE_CODE, config_path], target.shell)
    command = [*target.ssh_command(extra_options), remote]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return f"unreachable: no answer over SSH within {timeout_s:.0f} s"
    except FileNotFoundError:
        return "this PC has no `ssh` command (install openssh-client)"
    return classify_probe(target, done.returncode, done.stdout + done.stderr, config_path)


def probe_all(targets: list[SSHTarget], extra_options: tuple[str, ...] = (), config_path: str = "config.yaml",
              progress=None) -> None:
    """Probe every PC at once; raise one ClusterError naming each PC that cannot come up."""
    progress = progress or (lambda line: logger.info("%s", line))
    with concurrent.futures.ThreadPoolExecutor(max(1, len(targets))) as pool:
        reasons = dict(zip([t.hostname for t in targets],
                           pool.map(lambda t: probe_target(t, extra_options, config_path), targets)))
    for target in targets:
        reason = reasons[target.hostname]
        progress(f"{target.hostname}: " + (f"cannot start: {reason}" if reason else
                                           f"ssh {target.location} ok, starting its worker"))
    failed = {name: reason for name, reason in reasons.items() if reason}
    if failed:
        raise ClusterError("launcher ssh: " + "; ".join(f"{name}: {why}" for name, why in failed.items()))


# ------------------------------------------------------------------ ipyparallel launchers

def ssh_engine_map(config: ClusterConfig) -> dict:
    """ipyparallel's ``SSHEngineSetLauncher.engines``: one worker per PC (it starts that PC's
    ``engines`` itself), each with its own ssh options, remote python and worker command.
    ``to_send`` is empty: the worker joins with the secret, no connection file is copied."""
    config_path = remote_config_path(config)
    engines = {}
    for target in ssh_targets(config):
        options = target.ssh_options(config.launcher.options)
        engines[target.location] = {
            "n": 1, "ssh_args": list(options), "scp_args": list(options), "to_send": [],
            "remote_python": target.python,
            "engine_cmd": worker_command(target.python, config_path, target.hostname)}
    return engines


def print_progress(line: str) -> None:
    """Progress per PC where the user looks: the notebook cell or the server's terminal
    (ipyparallel's own logging is routed away and kept quiet, see launch.make_ipp_cluster)."""
    logger.info("%s", line)
    print(line, flush=True)


def prepare_launch(config: ClusterConfig, secret: bytes | None, progress=print_progress) -> None:
    """Before the controller starts: check the settings and probe every PC over SSH, so that a PC
    that cannot come up is named (with why) before anything runs. Raises ConfigError/ClusterError."""
    check_launchable(config, secret)
    if config.launcher.kind == "ssh":
        probe_all(ssh_targets(config), config.launcher.options, remote_config_path(config), progress)


class HideCommandStream(logging.Filter):
    """Drops ipyparallel's debug records of the Python it pipes to ssh (its Windows path logs
    it whole, and it carries the environment, so the secret), whatever the log level."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = str(record.msg)
        return "python command" not in text and "process with inputs" not in text


def start_launched_workers(ipp_cluster, config: ClusterConfig, secret: bytes, progress=print_progress) -> str:
    """Start the compute PCs' workers through ipyparallel's launcher for ``launcher.kind``, as an
    engine set of ``ipp_cluster`` (so its ``stop_cluster`` stops them too): one set per PC over
    SSH, one job under Slurm. Returns the sets' ids, comma-separated."""
    from ipyparallel.cluster.launcher import SlurmEngineSetLauncher, SSHEngineSetLauncher

    from ..security import secret_environment

    kind = config.launcher.kind
    if not any(isinstance(f, HideCommandStream) for f in ipp_cluster.log.filters):
        ipp_cluster.log.addFilter(HideCommandStream())
    saved = ipp_cluster.engine_launcher_class, ipp_cluster.send_engines_connection_env
    # the workers build their connection info from the secret; the key itself is never sent
    ipp_cluster.send_engines_connection_env = False
    try:
        if kind == "ssh":
            ipp_cluster.engine_launcher_class = SSHEngineSetLauncher
            engines = ssh_engine_map(config)

            def start_one(target: SSHTarget) -> str:
                # one engine set per PC, all at once: each start is four ssh round trips
                # (shell, python, profile folder, start), a PC after another adds up
                set_id = ipp_cluster.start_engines_sync(
                    1, engine_set_id=f"exo-lab-ssh-{target.hostname}",
                    engines={target.location: engines[target.location]},
                    environment=secret_environment(secret))
                progress(f"{target.hostname}: worker started over SSH, its engines are joining")
                return set_id

            targets = ssh_targets(config)
            with concurrent.futures.ThreadPoolExecutor(max(1, len(targets))) as pool:
                set_id = ",".join(pool.map(start_one, targets))
        else:
            ipp_cluster.engine_launcher_class = SlurmEngineSetLauncher
            slurm_launcher_config(config, ipp_cluster.config)
            # no secret here: sbatch would store it with the job; the nodes read secret_file.
            # The batch script goes to the profile folder, not the caller's working directory.
            ipp_cluster.config.SlurmEngineSetLauncher.batch_file_name = str(
                Path(ipp_cluster.profile_dir) / "slurm_engine.sbatch")
            set_id = ipp_cluster.start_engines_sync(config.launcher.nodes, engine_set_id="exo-lab-slurm")
            job = getattr(ipp_cluster.engines.get(set_id), "job_id", "?")
            progress(f"slurm: job {job} submitted ({config.launcher.nodes} node(s)); its workers join when it runs")
    finally:
        ipp_cluster.engine_launcher_class, ipp_cluster.send_engines_connection_env = saved
    return set_id


def slurm_launcher_config(config: ClusterConfig, traitlets_config=None):
    """traitlets settings of ipyparallel's ``SlurmEngineSetLauncher`` for ``launcher: slurm``."""
    from traitlets.config import Config

    settings = traitlets_config if traitlets_config is not None else Config()
    slurm = settings.SlurmEngineSetLauncher
    python = config.launcher.ssh.python or sys.executable
    slurm.engine_cmd = worker_command(python, remote_config_path(config), None)
    slurm.batch_template = slurm_batch_template(config)
    return settings


def slurm_batch_template(config: ClusterConfig) -> str:
    """One worker per node, each starting its node's engine and joining by discovery. Written in
    full here (ipyparallel adds partition/account/time only to its own default template).
    ``--export``: only exo-lab's folders go from the coordinator's environment into the job
    (Slurm stores it), so never a ``$EXO_LAB_SECRET``; the workers read network.secret_file."""
    launcher = config.launcher
    lines = ["#!/bin/sh", f"#SBATCH --nodes={launcher.nodes}", "#SBATCH --ntasks-per-node=1",
             "#SBATCH --job-name=exo-lab-" + config.cluster_name, f"#SBATCH --export={envvars.HOME},{envvars.CACHE}",
             "#SBATCH --output={profile_dir}/slurm-%j.out"]
    for option, value in (("partition", launcher.partition), ("account", launcher.account),
                          ("time", launcher.time)):
        if value:
            lines.append(f"#SBATCH --{option}={value}")
    return "\n".join([*lines, "srun {program_and_args}", ""])


def slurm_batch_script(config: ClusterConfig, profile_dir: Path) -> str:
    """The batch script ``launcher: slurm`` submits, as text (what ``sbatch`` gets)."""
    from ipyparallel.cluster.launcher import SlurmEngineSetLauncher

    launcher = SlurmEngineSetLauncher(config=slurm_launcher_config(config), profile_dir=str(profile_dir),
                                      cluster_id="", work_dir=str(profile_dir))
    launcher.write_batch_script(config.launcher.nodes)
    return Path(launcher.batch_file).read_text()


def check_launchable(config: ClusterConfig, secret: bytes | None) -> None:
    """ssh and slurm need a shared secret (remote workers join with it); slurm needs it in a file."""
    kind = config.launcher.kind
    if kind == "manual":
        return
    if secret is None:
        raise ConfigError(f"{config.source}: launcher {kind} starts workers on other PCs, which join "
                          f"with the cluster secret; set network.secret_file (or $EXO_LAB_SECRET)")
    if kind == "slurm" and config.network.discovery != "auto":
        raise ConfigError(f"{config.source}: launcher slurm: the job's nodes are not listed in devices, "
                          f"so they find and join the coordinator by discovery; set network.discovery: auto")
    if kind == "slurm" and not config.network.secret_file:
        raise ConfigError(f"{config.source}: launcher slurm: the job reads the secret from "
                          f"network.secret_file on the shared folder (it is never put in the batch "
                          f"script or the job's environment); set network.secret_file")


def expected_launched_engines(config: ClusterConfig) -> int:
    """Engines the launcher's workers bring: per PC over SSH, one per node under Slurm."""
    if config.launcher.kind == "ssh":
        return sum(d.engines for d in config.compute_devices if not d.is_coordinator)
    return config.launcher.nodes



def stop_launched_workers(ipp_cluster) -> None:
    """Stop the workers :func:`start_launched_workers` started, every PC at once (ipyparallel's
    stop_cluster would stop the sets one after another, each a few ssh round trips)."""
    def stop_one(set_id: str) -> None:
        try:
            ipp_cluster.stop_engines_sync(set_id)
        except Exception:   # stopping goes on for the other PCs; stop_cluster tries again
            logger.exception("stopping the workers of %s failed", set_id)

    sets = [set_id for set_id in list(ipp_cluster.engines) if set_id.startswith("exo-lab-")]
    if sets:
        with concurrent.futures.ThreadPoolExecutor(len(sets)) as pool:
            list(pool.map(stop_one, sets))


def exited_workers(ipp_cluster) -> dict[str, str]:
    """The launched SSH workers that have already ended, by PC: {hostname: last lines of its
    output}. One short ssh per PC (ipyparallel's own watch polls once a minute)."""
    exited = {}
    for set_id, engine_set in list(ipp_cluster.engines.items()):
        if not set_id.startswith("exo-lab-ssh-"):
            continue
        for launcher in list(getattr(engine_set, "launchers", {}).values()):
            try:
                if launcher.ssh_sender.cmd_running(launcher.pid):
                    continue
                output = launcher.get_output() or ""
            except Exception as exc:   # the PC went away: that is the news
                output = f"(its output could not be fetched: {exc})"
            tail = " | ".join(line.strip() for line in output.strip().splitlines()[-3:])
            exited[set_id[len("exo-lab-ssh-"):]] = tail or "(no output)"
    return exited


def exited_workers_message(exited: dict[str, str]) -> str:
    return "; ".join(f"{name}: its worker ended: {tail}" for name, tail in exited.items())


def wait_for_launched_engines(client, ipp_cluster, count: int, timeout_s: float, check_every_s: float = 5.0) -> None:
    """``client.wait_for_engines``, but a PC whose launched worker has ended fails the wait at
    once, named with the worker's last words. Raises TimeoutError or ClusterError."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        left_s = deadline - time.monotonic()
        try:
            client.wait_for_engines(count, timeout=max(0.1, min(check_every_s, left_s)), interactive=False)
            return
        except TimeoutError:
            exited = exited_workers(ipp_cluster)
            if exited:
                raise ClusterError("launcher ssh: " + exited_workers_message(exited)) from None
            if left_s <= check_every_s:
                raise
