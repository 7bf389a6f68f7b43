"""The shipped IPython profile and the settings exo-lab passes on the command line agree."""
from pathlib import Path

from traitlets.config.loader import PyFileConfigLoader

from exo_lab.membership import launch

PROFILE = Path(__file__).resolve().parent.parent / "profiles" / "profile_exo_lab"


def test_controller_profile_matches_launch_settings():
    config = PyFileConfigLoader("ipcontroller_config.py", path=str(PROFILE)).load_config()
    assert config.HeartMonitor.period == launch.HEARTBEAT_PERIOD_MS
    assert config.HeartMonitor.max_heartmonitor_misses == launch.HEARTBEAT_MISSES
    args = launch.controller_args()
    assert f"--HeartMonitor.period={config.HeartMonitor.period}" in args
    assert f"--HeartMonitor.max_heartmonitor_misses={config.HeartMonitor.max_heartmonitor_misses}" in args
    assert f"--IPController.db_class={config.IPController.db_class}" in args


def test_engine_environment_limits_threads_and_keeps_openmp_spinning():
    env = launch.engine_environment(threads=3, device_name="system-b.local")
    assert env["OMP_NUM_THREADS"] == "3" and "OMP_WAIT_POLICY" not in env   # PASSIVE: 2x slower steps
    assert env["EXO_LAB_DEVICE"] == "system-b.local"
    assert "OMP_NUM_THREADS" not in launch.engine_environment(threads=None)


def test_engine_profile_matches_the_workers_engine_command(tmp_path, monkeypatch):
    from exo_lab import worker
    from exo_lab.config import DeviceConfig

    config = PyFileConfigLoader("ipengine_config.py", path=str(PROFILE)).load_config()
    started = []
    monkeypatch.setattr(worker.subprocess, "Popen", lambda command, env: started.append(command))
    device = DeviceConfig(hostname="system-b.local", roles=("compute",), max_memory_bytes=None, max_cores=2,
                          gpu=False, memory_bandwidth_bytes_per_s=None, engines=2)
    worker.start_engines(device, {}, tmp_path)
    assert len(started) == 2
    assert all(f"--log-level={config.IPEngine.log_level}" in command for command in started)
