"""`exo-lab` as a user runs it: exit codes, one-line errors, the plan table and its JSON."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "config.yaml"
TWO_COMPUTE = ROOT / "examples" / "two-compute.yaml"
MODELS = ROOT / "examples" / "models"
BAD_CONFIGS = ROOT / "tests" / "data" / "configs"


def exo_lab(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "exo_lab.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=120, cwd=ROOT, env={**os.environ, **(env or {})})


def assert_user_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def test_check_config_accepts_the_users_example():
    # its secret_file is written by `exo-lab secret` (tests/test_init.py); $EXO_LAB_SECRET wins over it
    result = exo_lab("check-config", EXAMPLE, env={"EXO_LAB_SECRET": "a-secret-for-this-test-0123456789"})
    assert result.returncode == 0, result.stderr
    assert "engineering_cluster" in result.stdout
    assert "system-a.local" in result.stdout and "system-b.local" in result.stdout
    assert "128 GB" in result.stdout


@pytest.mark.parametrize("name, fragments", [
    ("unknown-key.yaml", ["unknown key", "did you mean"]),
    ("bad-size.yaml", ["max_memory", "GB"]),
    ("yaml-syntax.yaml", ["line 8"]),
    ("no-coordinator.yaml", ["coordinator"]),
])
def test_check_config_errors_are_one_clear_line(name, fragments):
    result = exo_lab("check-config", BAD_CONFIGS / name)
    assert_user_error(result, name, *fragments)


def test_check_config_missing_file():
    assert_user_error(exo_lab("check-config", "no/such/config.yaml"), "no/such/config.yaml")


def test_plan_70b_fits_on_two_compute_pcs_as_json():
    result = exo_lab("plan", "--config", TWO_COMPUTE, "--model", MODELS / "llama-3.1-70b", "--dtype",
                     "bfloat16", "--json")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["dtype"] == "bfloat16" and plan["objective"] == "latency"
    stages = plan["stages"]
    # system-b's GPU (gpu_memory 24GB) takes what fits; system-a's RAM the rest; system-b's RAM
    # (its second engine, a CPU stage) does not pay: slower than both
    assert [(s["node"], s["kind"], s["start_layer"], s["stop_layer"]) for s in stages] == [
        ("system-a.local", "cpu", 0, 69), ("system-b.local", "cuda", 69, 80)]
    assert [s["budget_bytes"] for s in stages] == [128 * 10**9, 24 * 10**9]
    assert all(s["total_bytes"] <= s["budget_bytes"] for s in stages)
    assert sum(s["weights_bytes"] for s in stages) >= 141 * 10**9
    assert plan["predicted_ms_per_token"] > 0
    assert [u["node"] for u in plan["unused_nodes"]] == ["system-b.local/cpu"]


def test_plan_70b_bfloat16_fits_on_the_seed_example():
    """The seed's GPU PCs hold a GPU stage (VRAM; `plan` says it assumed 24 GB without gpu_memory)
    and a CPU stage in their 128 GB of RAM (their second engine, the default for gpu: true)."""
    result = exo_lab("plan", "--config", EXAMPLE, "--model", MODELS / "llama-3.1-70b", "--dtype", "bfloat16",
                     "--json")
    assert result.returncode == 0, result.stderr
    stages = json.loads(result.stdout)["stages"]
    assert [(s["node"], s["kind"], s["start_layer"], s["stop_layer"]) for s in stages] == [
        ("system-b.local", "cuda", 0, 10), ("system-c.local", "cuda", 10, 22), ("system-c.local/cpu", "cpu", 22, 80)]
    assert [s["budget_bytes"] for s in stages] == [24 * 10**9, 24 * 10**9, 128 * 10**9]
    assert all(s["total_bytes"] <= s["budget_bytes"] for s in stages)
    assert result.stderr.count("assumed one GPU with 24 GB of free VRAM") == 2


def test_plan_70b_float32_does_not_fit_the_seed_example():
    result = exo_lab("plan", "--config", EXAMPLE, "--model", MODELS / "llama-3.1-70b", "--dtype", "float32")
    assert_user_error(result, "does not fit", "282.2 GB", "304 GB", "system-b.local 24 GB",
                      "system-b.local/cpu 128 GB", "system-c.local/cpu 128 GB", "bfloat16")


def test_plan_405b_fails_with_the_numbers():
    result = exo_lab("plan", "--config", TWO_COMPUTE, "--model", MODELS / "llama-3.1-405b", "--dtype",
                     "bfloat16")
    assert_user_error(result, "does not fit", "811.7 GB", "280 GB", "add compute nodes")


def test_plan_table_for_the_demo_model():
    result = exo_lab("plan", "--config", TWO_COMPUTE, "--model", "demo", "--objective", "throughput",
                     "--min-stages", "2")
    assert result.returncode == 0, result.stderr
    assert "system-a.local" in result.stdout and "system-b.local" in result.stdout
    assert "ms/token" in result.stdout


MEASURE_CONFIG = """\
cluster_name: measured
devices:
  - hostname: {here}
    roles: [coordinator, compute]
    max_memory: 4GB
    max_cores: 1
  - hostname: system-z.local
    roles: [compute]
    max_memory: 4GB
    memory_bandwidth: 20GB/s
"""


def test_plan_measure_times_this_pc_and_plans_its_stage_with_that(tmp_path, capsys):
    """`exo-lab plan --measure`: this PC's stages at the decode speed measured here (as an engine
    measures at load), the other PC at its config figure."""
    import socket

    import torch

    from exo_lab.cli import main
    from exo_lab.engine.speed import measure_decode
    from exo_lab.weights.resolve import read_model_config, resolve_model

    config = tmp_path / "config.yaml"
    config.write_text(MEASURE_CONFIG.format(here=socket.gethostname()))
    base = ["plan", "--config", str(config), "--model", "demo", "--min-stages", "2", "--objective", "throughput"]
    threads = torch.get_num_threads()
    try:
        assert main([*base, "--json"]) == 0
        assumed = json.loads(capsys.readouterr().out)
        assert main([*base, "--json", "--measure"]) == 0
        out = capsys.readouterr()
        measured = json.loads(out.out)
        # the figures the command planned with (cached in this process: the same measurement)
        model_config = read_model_config(resolve_model("demo", need_weights=False))
        speed = measure_decode(model_config, "float32")
    finally:
        torch.set_num_threads(threads)
    assert "measured on" in out.err and "1 thread(s)" in out.err
    here = next(s for s in measured["stages"] if s["node"] != "system-z.local")
    other = next(s for s in measured["stages"] if s["node"] == "system-z.local")
    layers = here["stop_layer"] - here["start_layer"]
    last = here["stop_layer"] == model_config["num_hidden_layers"]
    expected = layers * speed["layer_seconds"] * 1e3 + (speed["head_seconds"] * 1e3 if last else 0)
    assert here["ms_per_token"] == pytest.approx(expected, rel=1e-3, abs=1e-6)
    assumed_here = next(s for s in assumed["stages"] if s["node"] == here["node"])
    assert assumed_here["ms_per_token"] != pytest.approx(here["ms_per_token"], rel=1e-3)
    assumed_other = next(s for s in assumed["stages"] if s["node"] == "system-z.local")
    if (other["start_layer"], other["stop_layer"]) == (assumed_other["start_layer"], assumed_other["stop_layer"]):
        assert other["ms_per_token"] == assumed_other["ms_per_token"]     # the config figure stands


@pytest.mark.parametrize("args, fragment", [
    (["plan", "--config", str(EXAMPLE), "--model", "nobody/not-cached"], "hf download"),
    (["plan", "--config", str(EXAMPLE), "--model", "./missing-folder"], "missing-folder"),
])
def test_plan_bad_model_ids(args, fragment):
    assert_user_error(exo_lab(*args), fragment)


@pytest.mark.parametrize("args, fragment", [
    (["plan", "--config", str(EXAMPLE), "--model", "demo", "--dtype", "int3"], "invalid choice"),
    (["plan", "--config", str(EXAMPLE), "--model", "demo", "--max-context", "-5"], "must be >= 1"),
    (["serve", "--engines", "0"], "must be >= 1"),
    (["serve", "--engines", "2", "--port", "99999"], "port"),
    (["no-such-command"], "invalid choice"),
])
def test_bad_flags_exit_2_with_usage(args, fragment):
    result = exo_lab(*args)
    assert_user_error(result, fragment)
    assert len([line for line in result.stderr.splitlines() if "error:" in line]) == 1, result.stderr
