"""The settings schema (exo_lab.settings) is the one source: config.yaml's checks and defaults, the
load options, the flags of `exo-lab plan`, `exo-lab serve` and `python -m exo_lab.server`, and
docs/config.md's key table all follow it."""
from __future__ import annotations

import dataclasses
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from exo_lab import settings
from exo_lab.cli import build_parser as build_cli_parser
from exo_lab.config import ApiConfig, NetworkConfig, config_from_dict
from exo_lab.errors import ConfigError
from exo_lab.planning.options import LoadOptions, resolve_load_options
from exo_lab.server import build_parser as build_server_parser

ROOT = Path(__file__).resolve().parent.parent
SOLO = {"cluster_name": "lab", "devices": [{"hostname": "solo", "roles": ["coordinator", "compute"]}]}


def make_config_doc():
    spec = importlib.util.spec_from_file_location("make_config_doc", ROOT / "docs" / "make_config_doc.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def subcommand(name: str):
    commands = next(a for a in build_cli_parser()._actions if a.dest == "command")
    return commands.choices[name]


def help_texts() -> dict[str, str]:
    return {"plan": subcommand("plan").format_help(), "serve": subcommand("serve").format_help(),
            "server": build_server_parser().format_help()}


def with_default(key: str, default) -> tuple:
    """settings.SCHEMA, and COMMAND_LINE, with one setting's default changed."""
    def change(section):
        return dataclasses.replace(section, settings=tuple(
            dataclasses.replace(s, default=default, default_text=None) if s.key == key else s
            for s in section.settings))
    return tuple(change(section) for section in settings.SCHEMA), change(settings.COMMAND_LINE)


def test_docs_config_md_is_the_schema_s_table():
    module = make_config_doc()
    current = module.CONFIG_DOC.read_text()
    assert module.render(current) == current, "docs/config.md is stale: run `python docs/make_config_doc.py`"


@pytest.mark.parametrize("command", ["plan", "server"])
def test_each_command_takes_exactly_the_schema_s_flags(command):
    parsers = {"plan": [subcommand("plan")], "server": [build_server_parser(), subcommand("serve")]}[command]
    wanted = {settings.setting(path).flag_name for path in settings.COMMAND_FLAGS[command]}
    own = {"plan": {"--config", "--json", "--measure", "--gguf"}, "server": {"--config", "--engines", "--max-cores", "-v", "--verbose"}}[command]
    for parser in parsers:
        flags = {option for action in parser._actions for option in action.option_strings} - {"-h", "--help"}
        assert flags - own == wanted


def test_a_default_changed_in_the_schema_shows_in_help_and_docs(monkeypatch):
    schema, _ = with_default("max_batch", 12)
    monkeypatch.setattr(settings, "SCHEMA", schema)
    monkeypatch.setattr(settings, "COMMAND_LINE", with_default("min_stages", 3)[1])
    for name, text in help_texts().items():
        flat = " ".join(text.split())
        assert "(default: the config's max_batch, else 12)" in flat, name
        assert "(default: 3)" in flat, name                     # --min-stages, a flag only
    assert "| `max_batch` | no | `12` |" in make_config_doc().key_table()


def test_flag_help_comes_from_the_schema():
    flat = {name: " ".join(text.split()) for name, text in help_texts().items()}
    for command, paths in (("plan", settings.COMMAND_FLAGS["plan"]), ("server", settings.COMMAND_FLAGS["server"]),
                           ("serve", settings.COMMAND_FLAGS["server"])):
        for path in paths:
            assert " ".join(settings.setting(path).help.split()) in flat[command], (command, path)


def test_flags_check_values_as_the_schema_says():
    parser = build_server_parser()
    args = parser.parse_args(["--config", "c.yaml", "--max-queued", "5", "--prefill-chunk", "64", "--port", "0"])
    assert (args.max_queued, args.prefill_chunk, args.port, args.max_batch) == (5, 64, 0, None)
    for bad in (["--max-batch", "0"], ["--dtype", "int3"], ["--port", "70000"]):
        with pytest.raises(SystemExit):
            parser.parse_args(["--config", "c.yaml", *bad])


def test_load_options_default_to_the_schema():
    options = LoadOptions()
    for key in settings.LOAD_KEYS:
        if key != "dtype":
            assert getattr(options, key) == settings.setting(key).default, key
    # dtype "auto" is settled for the model: the default model (demo, safetensors) runs float32,
    # a GGUF model its file's own formats
    assert settings.setting("dtype").default == "auto" and options.dtype == "float32"
    assert LoadOptions(model="smollm2").dtype == "gguf"
    assert options.hop_ms == settings.DEFAULT_HOP_MS == settings.setting("network.hop_latency_ms").default
    assert options.context_length(10**6) == settings.DEFAULT_MAX_CONTEXT


def test_flags_then_config_then_defaults():
    config = config_from_dict({**SOLO, "max_batch": 3, "prefill_chunk": 32, "network": {"hop_latency_ms": 2}})
    options = resolve_load_options(config, max_batch=5, max_queued=None)
    assert (options.max_batch, options.prefill_chunk, options.hop_ms) == (5, 32, 2.0)
    assert options.max_queued == settings.setting("max_queued").default
    with pytest.raises(TypeError, match="unknown options"):
        resolve_load_options(config, max_batchs=5)


@pytest.mark.parametrize("given, message", [
    ({"max_batch": 0}, "load options: 'max_batch' must be a positive whole number (1 or more), got 0"),
    ({"dtype": "int3"}, "load options: 'dtype' must be one of float32, bfloat16, float16, int8, int4, gguf, auto; got 'int3'"),
    ({"objective": "fast"}, "load options: 'objective' must be one of latency, throughput"),
    ({"model": " "}, "load options: 'model' must be a non-empty string"),
])
def test_bad_load_options_name_the_option(given, message):
    with pytest.raises(ConfigError) as caught:
        LoadOptions(**given)
    assert str(caught.value).startswith(message)


def test_config_value_types_default_to_the_schema():
    assert NetworkConfig().port_range == settings.DEFAULT_PORT_RANGE
    assert (NetworkConfig().service_port, NetworkConfig().controller_port) == (10100, 10101)
    api = ApiConfig()
    for key in ("host", "port", "max_connections", "max_queued_per_client"):
        assert getattr(api, key) == settings.setting(f"api.{key}").default, key
    assert config_from_dict(SOLO).replan == settings.setting("replan").default


def test_every_config_key_is_documented_and_has_a_check_or_is_a_section():
    for section, item in settings.iter_settings():
        assert item.help and item.help == item.help.strip(), item.key
        assert item.in_config, item.key
        assert item.kind.check is not None or item.kind is settings.SECTION, item.key


def test_reading_the_config_imports_no_planning_and_planning_has_no_circle():
    code = ("import sys, exo_lab.config; assert not [m for m in sys.modules if m.startswith('exo_lab.planning')]; "
            "import exo_lab.planning.planner; assert 'exo_lab.planning.options' not in sys.modules")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr
