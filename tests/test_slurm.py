"""``launcher: slurm``: the batch script on paper, and a real one-node Slurm in a netlab PC.

The real part runs Debian's slurmctld + slurmd + munged (slurm-wlm 22.05) inside one netlab PC
"hpc" (its own network namespace on the lab bridge; the daemons listen on its address only);
the coordinator in "coord" submits the job with ipyparallel's SlurmEngineSetLauncher, the job's
worker finds the coordinator by mDNS on the bridge, joins with the secret from
``network.secret_file``, its engine registers, and stop() cancels the job (scancel) with
nothing of it left running. What is only checked on paper: several nodes, partitions, accounts
and time limits (one partition, no accounting database here), and a site's shared filesystem
(the namespaces share this machine's).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import netlab


def _unavailable() -> str | None:
    reason = netlab.unavailable()
    if reason:
        return reason
    for tool in ("slurmctld", "slurmd", "munged", "sbatch", "scancel", "squeue"):
        if shutil.which(tool) is None:
            return f"needs Debian's slurmctld, slurmd, slurm-client and munge ({tool!r} missing; .ci/run installs them)"
    return None


REASON = _unavailable()

CONFIG = """\
cluster_name: {name}
devices:
  - hostname: coord
    roles: [coordinator, storage]
    address: {coord}
  - hostname: hpc
    roles: [compute]
network:
  discovery: auto
  secret_file: {secret_file}
launcher:
  kind: slurm
  partition: {partition}
  time: "{time}"
  {account}nodes: {nodes}
  python: {python}
"""

SLURM_CONF = """\
ClusterName=exolab
SlurmctldHost=hpc({address})
SlurmctldPort=16817
SlurmdPort=16818
AuthType=auth/munge
AuthInfo=socket={root}/munge.sock
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmUser=root
SlurmdUser=root
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
NodeName=hpc NodeAddr={address} CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def write_config(path, name: str, *, coord="198.18.0.1", partition="debug", time_limit="10:00", account="", nodes=1) -> None:
    secret_file = path.parent / "secret"
    if not secret_file.exists():
        from exo_lab.security import new_secret

        secret_file.write_text(new_secret() + "\n")
        secret_file.chmod(0o600)
    path.write_text(CONFIG.format(name=name, coord=coord, secret_file=secret_file, partition=partition, time=time_limit,
                                  account=f"account: {account}\n  " if account else "", nodes=nodes,
                                  python=sys.executable))


def test_the_batch_script_runs_one_worker_per_node_and_holds_no_secret(tmp_path):
    from exo_lab.config import load_config
    from exo_lab.membership.launchers import slurm_batch_script

    config_path = tmp_path / "config.yaml"
    write_config(config_path, "hpc-site", partition="cpu", time_limit="4:00:00", account="lab42", nodes=3)
    script = slurm_batch_script(load_config(config_path), tmp_path)
    assert script.splitlines() == [
        "#!/bin/sh", "#SBATCH --nodes=3", "#SBATCH --ntasks-per-node=1", "#SBATCH --job-name=exo-lab-hpc-site",
        "#SBATCH --export=EXO_LAB_HOME,EXO_LAB_CACHE", f"#SBATCH --output={tmp_path}/slurm-%j.out",
        "#SBATCH --partition=cpu", "#SBATCH --account=lab42",
        "#SBATCH --time=4:00:00",
        f"srun {sys.executable} -m exo_lab.worker --config {config_path}"]
    assert (tmp_path / "secret").read_text().strip() not in script


def test_slurm_needs_discovery_and_a_secret_file(tmp_path):
    from exo_lab.config import config_from_dict
    from exo_lab.membership.launchers import check_launchable
    from exo_lab.errors import ConfigError

    devices = [{"hostname": "a", "roles": ["coordinator"]}, {"hostname": "b", "roles": ["compute"]}]
    manual = config_from_dict({"cluster_name": "c", "devices": devices, "launcher": "slurm"})
    with pytest.raises(ConfigError, match="set network.discovery: auto"):
        check_launchable(manual, b"x" * 32)
    auto = config_from_dict({"cluster_name": "c", "devices": devices, "launcher": "slurm",
                             "network": {"discovery": "auto"}})
    with pytest.raises(ConfigError, match="never put in the batch script"):
        check_launchable(auto, b"x" * 32)


@pytest.mark.skipif(REASON is not None, reason=f"real Slurm test skipped: {REASON}")
def test_a_real_one_node_slurm_job_joins_and_is_cancelled_on_stop(tmp_path):
    root = tmp_path / "slurm"
    for folder in ("state", "spool"):
        (root / folder).mkdir(parents=True)
    key = root / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    with netlab.Netlab(["coord", "hpc"], tmp_path / "pcs") as net:
        hpc = net.pcs["hpc"]
        conf = root / "slurm.conf"
        conf.write_text(SLURM_CONF.format(address=hpc.address, root=root, cpus=os.cpu_count()))
        env = {"SLURM_CONF": str(conf)}
        quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
        net.start("hpc", ["munged", "-F", "--force", f"--socket={root}/munge.sock", f"--key-file={key}",
                          f"--pid-file={root}/munged.pid", f"--log-file={root}/munged.log",
                          f"--seed-file={root}/munge.seed"], env=env, **quiet)
        time.sleep(0.3)
        net.start("hpc", ["slurmctld", "-D", "-c", "-i"], env=env, **quiet)
        plugin, mounts = cgroup_mounts()
        (root / "cgroup.conf").write_text(f"CgroupPlugin={plugin}\nIgnoreSystemd=yes\n")
        net.start("hpc", ["sh", "-c", f"{mounts} && exec slurmd -D -N hpc"], env=env, **quiet)
        wait_for_idle_node(net, env)

        config_path = tmp_path / "config.yaml"
        write_config(config_path, f"slurm-{net.run_id}", coord=net.pcs["coord"].address)
        script = ("import sys, time; from exo_lab import Cluster; t = time.monotonic(); "
                  "c = Cluster.from_config(sys.argv[1]).start(); "
                  "print('up', len(c.control.ids), round(time.monotonic() - t, 1), flush=True); c.stop(); "
                  "print('stopped', flush=True)")
        result = net.run("coord", [sys.executable, "-c", script, str(config_path)], env=env, timeout_s=120)
        assert result.returncode == 0, result.stdout
        print("\n" + result.stdout)
        assert "slurm: job " in result.stdout and "up 1 " in result.stdout, result.stdout
        assert "stopped" in result.stdout, result.stdout
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and squeue(net, env):
            time.sleep(0.5)
        assert squeue(net, env) == "", "the job outlived stop()"
        # the job got exo-lab's folders from the submitter (--export), not this machine's ~/.exo_lab
        assert not (Path.home() / ".exo_lab" / "profiles" / f"profile_slurm-{net.run_id}").exists()
        left = [pid for pid in net.pids("hpc") if "exo_lab" in cmdline(pid) or "ipyparallel" in cmdline(pid)]
        assert left == [], [cmdline(pid) for pid in left]


def cgroup_mounts() -> tuple[str, str]:
    """slurmd needs cgroups, but `ip netns exec` mounts a fresh /sys without them: mount them
    again inside the PC's own mount namespace, as this machine has them (slurmd 22.05 refuses a
    hybrid v1/v2 view, so a hybrid machine gets its v1 controllers only)."""
    if os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
        return "cgroup/v2", "mount -t cgroup2 none /sys/fs/cgroup"
    controllers = [c for c in ("freezer", "cpuset", "memory", "devices")
                   if os.path.isdir(f"/sys/fs/cgroup/{c}")]
    mounts = " && ".join(f"mkdir -p /sys/fs/cgroup/{c} && mount -t cgroup -o {c} none /sys/fs/cgroup/{c}"
                         for c in controllers)
    return "cgroup/v1", "mount -t tmpfs none /sys/fs/cgroup && " + mounts


def squeue(net, env) -> str:
    return net.run("coord", ["squeue", "-h", "-o", "%i %T"], env=env, timeout_s=20).stdout.strip()


def cmdline(pid: int) -> str:
    try:
        return open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def wait_for_idle_node(net, env, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    out = ""
    while time.monotonic() < deadline:
        out = net.run("coord", ["sinfo", "-h", "-o", "%t"], env=env, timeout_s=20).stdout.strip()
        if out == "idle":
            return
        time.sleep(0.5)
    raise AssertionError(f"the one-node Slurm never became idle: sinfo says {out!r}")
