"""Served model names and the one server command line, without a cluster (the openai client
calling a served name on a real cluster is in tests/test_api.py)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from exo_lab.api.server import ApiServer, check_served_model_names
from exo_lab.cli import build_parser as build_cli_parser
from exo_lab.config import config_from_dict
from exo_lab.errors import ConfigError
from exo_lab.quickstart import ThisPC, write_starter_config
from exo_lab.server import build_parser as build_server_parser
from exo_lab.server import choose_served_model_names, server_arguments

ROOT = Path(__file__).resolve().parent.parent
LOCAL_ONLY = {"--engines", "--max-cores"}     # `exo-lab serve` only: a local cluster has no config


def option_strings(parser) -> set[str]:
    return {option for action in parser._actions for option in action.option_strings}


def serve_subparser():
    commands = next(a for a in build_cli_parser()._actions if a.dest == "command")
    return commands.choices["serve"]


def test_both_server_command_lines_take_the_same_flags():
    server, serve = option_strings(build_server_parser()), option_strings(serve_subparser())
    assert server == serve - LOCAL_ONLY
    assert {"--dtype", "--max-context", "--max-batch", "--objective", "--served-model-name", "--config"} <= server


FLAGS = ["--model", "demo", "--dtype", "bfloat16", "--max-context", "512", "--max-batch", "4", "--objective",
         "throughput", "--min-stages", "2", "--host", "0.0.0.0", "--port", "0", "--api-key", "sk-x",
         "--served-model-name", "llama-70b", "--served-model-name", "gpt-4o", "gpt-4"]


def test_both_command_lines_parse_the_same_flags_alike():
    by_server = build_server_parser().parse_args(["--config", "c.yaml", *FLAGS])
    by_cli = build_cli_parser().parse_args(["serve", "--config", "c.yaml", *FLAGS])
    assert server_arguments(by_server) == server_arguments(by_cli)
    arguments = server_arguments(by_server)
    assert arguments["served_model_names"] == ["llama-70b", "gpt-4o", "gpt-4"]   # repeated, and several at once
    assert arguments["load_args"] == {"model": "demo", "dtype": "bfloat16", "max_context": 512, "max_batch": 4,
                                      "objective": "throughput", "min_stages": 2}


def test_verbose_before_or_after_the_subcommand():
    assert build_cli_parser().parse_args(["-v", "serve", "--engines", "2"]).verbose is True
    assert build_cli_parser().parse_args(["serve", "--engines", "2", "-v"]).verbose is True
    assert build_cli_parser().parse_args(["serve", "--engines", "2"]).verbose is False


def run(*command: str, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *command], capture_output=True, text=True, timeout=120, cwd=cwd)


def assert_one_error_line(result: subprocess.CompletedProcess, fragment: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and fragment in errors[0], result.stderr


@pytest.mark.parametrize("flags, fragment", [
    (["--port", "99999"], "--port"),
    (["--dtype", "int3"], "invalid choice"),
    (["--max-batch", "0"], "must be >= 1"),
    (["--max-context", "lots"], "not an integer"),
    (["--served-model-name"], "expected at least one argument"),
    (["--no-such-flag"], "unrecognized arguments"),
])
@pytest.mark.parametrize("command", [["exo_lab.server", "--config", "c.yaml"], ["exo_lab.cli", "serve", "--engines", "2"]])
def test_bad_flags_are_one_error_line_exit_2(command, flags, fragment):
    assert_one_error_line(run(*command, *flags), fragment)


def test_server_needs_its_config():
    assert_one_error_line(run("exo_lab.server", "--model", "demo"), "--config")


@pytest.fixture
def one_pc_config(tmp_path):
    write_starter_config(str(tmp_path / "config.yaml"), pc=ThisPC("system-a", 64 * 10**9, 4, False))
    return tmp_path / "config.yaml"


@pytest.mark.parametrize("names, fragment", [(["llama", "llama"], "given twice"), ([""], "not a word")])
def test_a_bad_served_name_stops_the_server_before_it_starts(one_pc_config, names, fragment):
    flags = [arg for name in names for arg in ("--served-model-name", name)]
    result = run("exo_lab.server", "--config", str(one_pc_config), *flags)
    assert_one_error_line(result, fragment)
    assert "engine(s) up" not in result.stdout


# ---------------------------------------------------------------- the names, as values
def config_with_names(*names: str):
    data = {"cluster_name": "c", "devices": [{"hostname": "system-a", "roles": ["coordinator", "compute"]}]}
    if names:
        data["served_model_names"] = list(names)
    return config_from_dict(data)


def test_flags_win_over_the_config():
    config = config_with_names("from-config", "other")
    assert choose_served_model_names(["from-flag"], config) == ("from-flag",)
    assert choose_served_model_names(None, config) == ("from-config", "other")
    assert choose_served_model_names(None, config_with_names()) == ()


@pytest.mark.parametrize("names, fragment", [
    (["a b"], "without spaces"), ([""], "non-empty"), (["x", "y", "x"], "'x' is given twice"), (["tab\t"], "spaces"),
    ([None], "not a word"),
])
def test_bad_names_are_refused_with_the_fix(names, fragment):
    with pytest.raises(ConfigError, match=fragment):
        check_served_model_names(names)


def test_one_string_is_one_name():
    assert check_served_model_names("llama-70b") == ("llama-70b",)
    assert check_served_model_names(None) == ()


def fake_server(*names: str) -> ApiServer:
    from exo_lab.coordinator.adapters import AdapterRegistry

    cluster = SimpleNamespace(model_id="/models/llama-3.1-70b", loaded=True, metrics_source=lambda: None,
                              adapters=AdapterRegistry())
    return ApiServer(cluster, host="127.0.0.1", api_key=None, served_model_names=names)


def test_served_names_replace_the_model_id_as_in_vllm():
    server = fake_server("llama-70b", "gpt-4o")
    assert server.model_names() == ("llama-70b", "gpt-4o")
    card = server.model_card("gpt-4o")
    assert card["id"] == "gpt-4o" and card["root"] == "/models/llama-3.1-70b" and card["object"] == "model"


def test_without_names_the_model_id_is_the_one_name():
    assert fake_server().model_names() == ("/models/llama-3.1-70b",)
