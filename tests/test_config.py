"""config.yaml loading: the user's example, the documented extensions, and one table of bad
inputs (BAD_CONFIGS_TABLE), each checking that the message names the file, the device, the key
and the fix."""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from dataclasses import replace

from exo_lab.config import (
    ApiConfig,
    ClusterConfig,
    DeviceConfig,
    NetworkConfig,
    config_from_dict,
    format_config_summary,
    load_config,
)
from exo_lab.units import format_bytes, parse_bandwidth, parse_size
from exo_lab.errors import ConfigError, ExoLabError

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
BAD_CONFIGS = Path(__file__).resolve().parent / "data" / "configs"

# The seed's example (three PCs, see shared/DESIGN.md), character for character.
USER_EXAMPLE = """\
cluster_name: engineering_cluster

devices:
  - hostname: system-a.local
    roles: [coordinator, storage]
    max_memory: 128GB
    max_cores: 16
    gpu: false

  - hostname: system-b.local
    roles: [compute]
    max_memory: 128GB
    max_cores: 16
    gpu: true

  - hostname: system-c.local
    roles: [compute]
    max_memory: 128GB
    max_cores: 16
    gpu: true

network:
  discovery: auto
"""


def write(tmp_path: Path, text: str, name: str = "cluster.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def variant(old: str, new: str, count: int = 1) -> str:
    """The user's example with one edit; fails loudly if the edit does not apply."""
    assert USER_EXAMPLE.count(old) >= count, old
    return USER_EXAMPLE.replace(old, new, count)


def second_device(old: str, new: str) -> str:
    """The user's example with one edit inside system-b's entry only."""
    head, sep, tail = USER_EXAMPLE.partition("  - hostname: system-b.local\n")
    assert old in tail, old
    return head + sep + tail.replace(old, new, 1)


# --------------------------------------------------------------------------- sizes

@pytest.mark.parametrize("text, expected", [
    ("128GB", 128 * 10**9),
    ("128 GiB", 128 * 2**30),
    ("512MB", 512 * 10**6),
    ("1.5TB", 1_500_000_000_000),
    ("64KiB", 65_536),
    ("1KB", 1000),
    ("2MiB", 2 * 2**20),
    ("1TiB", 2**40),
    ("128gb", 128 * 10**9),
    ("128 gib", 128 * 2**30),
    ("20B", 20),
    ("137438953472", 137_438_953_472),
    (137_438_953_472, 137_438_953_472),
    ("  8 GB ", 8 * 10**9),
    ("1.1KiB", 1126),          # 1126.4 rounds down to whole bytes
    ("0", 0),
])
def test_parse_size_accepts_documented_forms(text, expected):
    assert parse_size(text) == expected


def test_parse_size_unknown_unit_lists_allowed_units():
    with pytest.raises(ConfigError, match=r"invalid max_memory '128XB': unknown size unit 'XB'.*"
                                          r"KB, MB, GB, TB \(powers of 1000\).*KiB, MiB, GiB, TiB"):
        parse_size("128XB", what="max_memory")


def test_parse_size_bare_letter_unit_is_ambiguous():
    with pytest.raises(ConfigError, match=r"'G' alone is ambiguous: write 'GB' or 'GiB'"):
        parse_size("128G")


def test_parse_size_rejects_negative():
    with pytest.raises(ConfigError, match=r"'-5GB': a size cannot be negative"):
        parse_size("-5GB")


def test_parse_size_rejects_negative_int():
    with pytest.raises(ConfigError, match=r"-1: a size cannot be negative"):
        parse_size(-1)


def test_parse_size_rejects_fractional_bytes():
    with pytest.raises(ConfigError, match=r"'1\.5B': a byte count must be a whole number"):
        parse_size("1.5B")


@pytest.mark.parametrize("value, shown", [(1.5e9, r"1500000000\.0 \(float\)"),
                                          (True, r"True \(bool\)"),
                                          (None, "no value"),
                                          ([128], r"\[128\] \(list\)")])
def test_parse_size_rejects_wrong_types(value, shown):
    with pytest.raises(ConfigError, match=rf"max_memory must be a size like '128GB'.*got {shown}"):
        parse_size(value, what="max_memory")


@pytest.mark.parametrize("text", ["", "GB", "lots", "1e9", "1,000", "12 G B"])
def test_parse_size_rejects_non_sizes(text):
    with pytest.raises(ConfigError, match=rf"invalid size {re.escape(repr(text))}: not a size"):
        parse_size(text)


@pytest.mark.parametrize("text, expected", [
    ("20GB/s", 20e9), ("20 GiB / s", 20 * 2**30), ("20GB", 20e9), ("1.5 gb/S", 1.5e9),
    (20_000_000_000, 20e9), (2.5e10, 2.5e10),
])
def test_parse_bandwidth(text, expected):
    assert parse_bandwidth(text) == expected


def test_parse_bandwidth_error_quotes_what_was_written():
    with pytest.raises(ConfigError, match=r"invalid memory_bandwidth '20XB/s': unknown size unit"):
        parse_bandwidth("20XB/s")


@pytest.mark.parametrize("n, text", [
    (0, "0 B"), (512, "512 B"), (999, "999 B"), (1000, "1 KB"), (1500, "1.5 KB"),
    (128 * 10**9, "128 GB"), (141_100_000_000, "141.1 GB"), (128 * 2**30, "137.4 GB"),
    (999_960_000_000, "1 TB"), (2 * 10**15, "2 PB"), (-1500, "-1.5 KB"),
])
def test_format_bytes(n, text):
    assert format_bytes(n) == text


# --------------------------------------------------------------------------- good configs

SECRET_LINE = "  secret_file: secret.txt    # made once with `exo-lab secret secret.txt`; the same file on every PC\n"


def test_example_file_is_the_issue_example_verbatim_plus_its_secret_line():
    assert (EXAMPLES / "config.yaml").read_text(encoding="utf-8") == USER_EXAMPLE + SECRET_LINE


def test_user_example_loads_as_written():
    cfg = load_config(EXAMPLES / "config.yaml")
    assert cfg.cluster_name == "engineering_cluster"
    assert cfg.source == str(EXAMPLES / "config.yaml")
    assert cfg.network == NetworkConfig(discovery="auto", controller_port=10101, hop_latency_ms=None,
                                        secret_file=str((EXAMPLES / "secret.txt").absolute()))
    assert (cfg.network.port_range, cfg.network.service_port) == ((10100, 10199), 10100)
    assert cfg.api == ApiConfig()
    assert (cfg.model, cfg.dtype, cfg.max_context, cfg.max_batch, cfg.objective) == (None,) * 5
    assert cfg.devices == (
        DeviceConfig("system-a.local", ("coordinator", "storage"), 128 * 10**9, 16, False, None),
        DeviceConfig("system-b.local", ("compute",), 128 * 10**9, 16, True, None, engines=2),
        DeviceConfig("system-c.local", ("compute",), 128 * 10**9, 16, True, None, engines=2),
    )
    assert cfg.coordinator.hostname == "system-a.local"
    assert [d.hostname for d in cfg.compute_devices] == ["system-b.local", "system-c.local"]
    assert [d.hostname for d in cfg.storage_devices] == ["system-a.local"]
    a, b, c = cfg.devices
    assert (a.is_coordinator, a.is_compute, a.is_storage) == (True, False, True)
    assert (b.is_coordinator, b.is_compute, b.is_storage) == (False, True, False)
    assert (b.engines, b.address) == (2, None)    # gpu: true: a GPU stage and a CPU stage
    assert c == replace(b, hostname="system-c.local")


def test_two_compute_example_uses_every_optional_key():
    cfg = load_config(str(EXAMPLES / "two-compute.yaml"))
    assert [d.hostname for d in cfg.compute_devices] == ["system-a.local", "system-b.local"]
    assert cfg.coordinator.hostname == "system-a.local"
    a, b = cfg.devices
    assert a.roles == ("coordinator", "storage", "compute")
    assert (a.max_memory_bytes, b.max_memory_bytes) == (128 * 10**9, 128 * 10**9)
    assert a.memory_bandwidth_bytes_per_s == 60e9
    assert b.memory_bandwidth_bytes_per_s is None   # a GPU PC: the planner default for its kind
    assert (a.engines, a.address, b.address) == (1, "192.168.1.10", None)
    assert cfg.network == NetworkConfig("manual", 10101, 0.5, str((EXAMPLES / "secret.txt").absolute()),
                                        10100, (10100, 10199))
    assert cfg.served_model_names == ("demo", "exo-demo")
    assert (a.gpu_memory_bytes, b.gpu_memory_bytes) == (None, 24 * 10**9)
    assert cfg.api == ApiConfig("0.0.0.0", 8000, "EXO_LAB_API_KEY", None)
    assert (cfg.model, cfg.dtype, cfg.max_context, cfg.max_batch, cfg.objective) == (
        "demo", "float32", 4096, 1, "latency")


def test_two_compute_example_documents_every_key():
    text = (EXAMPLES / "two-compute.yaml").read_text(encoding="utf-8")
    keys = ("cluster_name", "devices", "hostname", "roles", "max_memory", "max_cores", "gpu",
            "memory_bandwidth", "engines", "address", "network", "discovery",
            "controller_port", "hop_latency_ms", "service_port", "api", "host", "port", "api_key_env",
            "api_key_file", "model", "dtype", "max_context", "max_batch", "objective", "replan",
            "port_range", "secret_file", "gpu_memory", "served_model_names")
    for key in keys:
        assert re.search(rf"^\s*(- |# )?{key}:.*#", text, re.MULTILINE), f"{key} not commented"


def test_settings_schema_documents_every_key():
    from exo_lab.settings import iter_settings

    documented = {item.key for _, item in iter_settings() if item.help}
    for key in ("cluster_name", "devices", "network", "api", "model", "dtype", "max_context",
                "max_batch", "objective", "hostname", "roles", "max_memory", "max_cores",
                "gpu", "memory_bandwidth", "engines", "address", "discovery",
                "controller_port", "hop_latency_ms", "service_port", "host", "port", "api_key_env",
                "api_key_file", "replan", "port_range", "gpu_memory", "served_model_names", "shell"):
        assert key in documented, key


def test_minimal_config_gets_documented_defaults():
    cfg = config_from_dict({"cluster_name": "lab", "devices": [
        {"hostname": "solo", "roles": ["coordinator", "compute"]}]})
    assert cfg.source == "<dict>"
    assert cfg.devices == (DeviceConfig("solo", ("coordinator", "compute"), None, None, False,
                                        None, 1, None),)
    assert cfg.network == NetworkConfig("manual", 10101, None)
    assert cfg.api == ApiConfig("127.0.0.1", 8000, None, None)


def test_plain_byte_counts_and_gpu_yes_boolean_load(tmp_path):
    # YAML 1.1 reads an unquoted yes as the boolean true: a real boolean, so it is accepted.
    text = second_device("max_memory: 128GB", "max_memory: 137438953472").replace(
        "gpu: true", "gpu: yes")
    cfg = load_config(write(tmp_path, text))
    assert cfg.devices[1].max_memory_bytes == 137_438_953_472
    assert cfg.devices[1].gpu is True


def test_engines_and_bandwidth_as_number(tmp_path):
    text = second_device("gpu: true", "gpu: true\n    engines: 2\n    memory_bandwidth: 2.5e+10")
    device = load_config(write(tmp_path, text)).devices[1]
    assert (device.engines, device.memory_bandwidth_bytes_per_s) == (2, 2.5e10)


def test_relative_api_key_file_is_relative_to_the_config_file(tmp_path):
    (tmp_path / "conf").mkdir()
    path = write(tmp_path, USER_EXAMPLE + "api:\n  api_key_file: secrets/key.txt\n",
                 "conf/cluster.yaml")
    cfg = load_config(path)
    assert cfg.api.api_key_file == str((tmp_path / "conf" / "secrets" / "key.txt").absolute())


def test_absolute_api_key_file_is_kept(tmp_path):
    key_path = (tmp_path / "key.txt").absolute()
    cfg = load_config(write(tmp_path, USER_EXAMPLE + f"api:\n  api_key_file: '{key_path}'\n"))
    assert cfg.api.api_key_file == str(key_path)


def test_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "bom.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + USER_EXAMPLE.encode())
    assert load_config(path).cluster_name == "engineering_cluster"


def test_config_is_frozen():
    cfg = load_config(EXAMPLES / "config.yaml")
    with pytest.raises(AttributeError):
        cfg.cluster_name = "other"          # type: ignore[misc]
    with pytest.raises(AttributeError):
        cfg.devices[0].gpu = True           # type: ignore[misc]


def test_summary_lists_cluster_discovery_and_each_device():
    summary = format_config_summary(load_config(EXAMPLES / "config.yaml"))
    lines = summary.splitlines()
    assert lines[0].startswith("cluster engineering_cluster")
    assert lines[1].startswith("discovery: auto")
    a_line = next(line for line in lines if "system-a.local" in line)
    b_line = next(line for line in lines if "system-b.local" in line)
    assert re.search(r"coordinator,storage\s+max_memory 128 GB\s+max_cores 16\s+gpu no", a_line)
    assert re.search(r"compute\s+max_memory 128 GB\s+max_cores 16\s+gpu yes", b_line)
    assert "settings" not in summary          # nothing optional set in the user's example


def test_summary_shows_optional_settings():
    summary = format_config_summary(load_config(EXAMPLES / "two-compute.yaml"))
    assert "bandwidth 60 GB/s" in summary
    assert "address 192.168.1.10" in summary
    assert "hop latency 0.5 ms" in summary
    assert "model demo, dtype float32, max_context 4096, max_batch 1, objective latency" in summary
    assert "api: 0.0.0.0:8000, key from environment variable EXO_LAB_API_KEY" in summary


def test_summary_says_no_cap_when_limits_absent():
    cfg = config_from_dict({"cluster_name": "lab", "devices": [
        {"hostname": "solo", "roles": ["coordinator", "compute"], "engines": 3}]})
    assert re.search(r"solo\s+coordinator,compute\s+max_memory no cap\s+max_cores no cap\s+"
                     r"gpu no\s+engines 3", format_config_summary(cfg))


# --------------------------------------------------------------------------- errors: one table

NETWORK_EXTRA = "  discovery: auto\n"       # the last line of the user's example: network keys follow it


def network(lines: str) -> str:
    return variant(NETWORK_EXTRA, NETWORK_EXTRA + lines)


# (id, config.yaml text, parts of the message after "<file>: ", in order)
BAD_CONFIGS_TABLE = [
    # the file and its YAML
    ("empty file", "", ["the file is empty; it needs at least cluster_name and devices"]),
    ("comments only", "# nothing here yet\n\n", ["the file is empty"]),
    ("yaml indentation", second_device("    max_memory: 128GB", "   max_memory: 128GB"),
     ["invalid YAML at line 12, column 4: ", "check the indentation"]),
    ("yaml unclosed list", second_device("roles: [compute]", "roles: [compute"),
     ["invalid YAML at line 12, ", "flow sequence started at line 11"]),
    ("yaml tab", variant("  discovery: auto", "\tdiscovery: auto"),
     ["invalid YAML at line 23, column 1: found character '\\t'"]),
    ("yaml duplicate key", second_device("max_cores: 16", "max_cores: 16\n    max_cores: 8"),
     ["invalid YAML at line 14, ", "found duplicate key 'max_cores'"]),
    ("top level a list", "- system-a.local\n- system-b.local\n",
     ["the configuration must be a mapping of keys to values, got ['system-a.local', 'system-b.local'] (list); "
      "start the file with 'cluster_name: ...'"]),
    # top-level keys
    ("missing cluster_name", variant("cluster_name: engineering_cluster\n", ""),
     ["missing required key 'cluster_name' (required: cluster_name, devices)"]),
    ("missing devices", "cluster_name: lab\n", ["missing required key 'devices'"]),
    ("unknown top key, close", variant("cluster_name:", "cluster_nmae:"),
     ["unknown key 'cluster_nmae' in the top level of the file; did you mean 'cluster_name'? "
      "Allowed keys: cluster_name, devices, network"]),
    ("unknown top key, far", USER_EXAMPLE + "colour: blue\n",
     ["unknown key 'colour' in the top level of the file; it is not a config key. "
      "Allowed keys: cluster_name, devices, network, api, model"]),
    ("cluster_name a number", variant("engineering_cluster", "42"),
     ["'cluster_name' must be a string, got 42 (int); put it in quotes"]),
    ("cluster_name with a space", variant("engineering_cluster", "engineering cluster"),
     ["'cluster_name' may contain only letters, digits, '.', '_' and '-'"]),
    ("devices a mapping", "cluster_name: lab\ndevices:\n  hostname: a\n",
     ["'devices' must be a list of devices ", "got {'hostname': 'a'} (dict)"]),
    ("devices no value", "cluster_name: lab\ndevices:\n", ["'devices' must be a list ", "got no value"]),
    ("devices empty", "cluster_name: lab\ndevices: []\n",
     ["'devices' is empty; list the coordinator and at least one compute PC"]),
    ("dtype", USER_EXAMPLE + "dtype: fp16\n", ["'dtype' must be one of float32, bfloat16, float16, int8, int4, gguf, auto; got 'fp16'"]),
    ("objective", USER_EXAMPLE + "objective: speed\n", ["'objective' must be one of latency, throughput; got 'speed'"]),
    ("dtype near miss", USER_EXAMPLE + "dtype: bfloat\n",
     ["'dtype' must be one of ", "; got 'bfloat' (a string) (did you mean 'bfloat16'?)"]),
    ("max_context zero", USER_EXAMPLE + "max_context: 0\n",
     ["'max_context' must be a positive whole number (1 or more), got 0"]),
    ("max_batch zero", USER_EXAMPLE + "max_batch: 0\n", ["'max_batch' must be a positive whole number (1 or more), got 0"]),
    ("model a list", USER_EXAMPLE + "model: [a, b]\n", ["'model' must be a string, got ['a', 'b'] (list)"]),
    ("served name twice", USER_EXAMPLE + "served_model_names: [a, a]\n", ["'served_model_names' lists a name twice"]),
    # device keys
    ("device a string", variant("  - hostname: system-b.local\n", "  - system-c.local\n  - hostname: system-b.local\n"),
     ["devices[1]: a device must be a mapping of keys to values, got 'system-c.local' (a string); "
      "write each device as '- hostname: ...'"]),
    ("device without hostname", variant("  - hostname: system-b.local\n    roles:", "  - roles:"),
     ["devices[1]: missing required key 'hostname' (required: hostname, roles)"]),
    ("device without roles", second_device("    roles: [compute]\n", ""),
     ["device 'system-b.local': missing required key 'roles'"]),
    ("unknown device key", second_device("max_memory:", "max_memmory:"),
     ["unknown key 'max_memmory' in device 'system-b.local'; did you mean 'max_memory'? "
      "Allowed keys: hostname, roles, max_memory"]),
    ("unknown key, no hostname", variant("  - hostname: system-b.local\n", "  - hostnam: system-b.local\n"),
     ["unknown key 'hostnam' in devices[1]; did you mean 'hostname'?"]),
    ("hostname a number", variant("hostname: system-b.local", "hostname: 1234"),
     ["devices[1]: 'hostname' must be a string, got 1234 (int); put it in quotes"]),
    ("hostname with a space", variant("hostname: system-b.local", "hostname: system b.local"),
     ["device 'system b.local': 'hostname' must not contain spaces"]),
    ("size unit", second_device("128GB", "128XB"),
     ["device 'system-b.local': invalid max_memory '128XB': unknown size unit 'XB'; use B, KB, MB, GB, TB "
      "(powers of 1000) or KiB, MiB, GiB, TiB (powers of 1024)"]),
    ("size negative", second_device("128GB", "-8GB"),
     ["device 'system-b.local': invalid max_memory '-8GB': a size cannot be negative"]),
    ("size zero", second_device("128GB", "0GB"),
     ["device 'system-b.local': 'max_memory' must be more than zero, got '0GB'; delete the line for no cap"]),
    ("size a float", second_device("128GB", "1.28e+11"),
     ["device 'system-b.local': max_memory must be a size like '128GB' or a whole number of bytes, "
      "got 128000000000.0 (float)"]),
    ("key without value", second_device("max_memory: 128GB", "max_memory:"),
     ["device 'system-b.local': 'max_memory' has no value; give one or delete the line to use the default"]),
    ("max_cores zero", second_device("max_cores: 16", "max_cores: 0"),
     ["device 'system-b.local': 'max_cores' must be a positive whole number (1 or more), got 0"]),
    ("max_cores negative", second_device("max_cores: 16", "max_cores: -4"),
     ["device 'system-b.local': 'max_cores' must be a positive whole number (1 or more), got -4"]),
    ("max_cores a fraction", second_device("max_cores: 16", "max_cores: 2.5"),
     ["device 'system-b.local': 'max_cores' must be a positive whole number, got 2.5 (float)"]),
    ("max_cores quoted", second_device("max_cores: 16", 'max_cores: "16"'),
     ["device 'system-b.local': 'max_cores' must be a positive whole number, got '16' (a string)"]),
    ("gpu quoted yes", second_device("gpu: true", 'gpu: "yes"'),
     ["device 'system-b.local': 'gpu' must be true or false, got 'yes' (a string); "
      "write gpu: true or gpu: false without quotes"]),
    ("gpu a number", second_device("gpu: true", "gpu: 1"), ["device 'system-b.local': 'gpu' must be true or false, got 1 (int)"]),
    ("roles a string", second_device("roles: [compute]", "roles: compute"),
     ["device 'system-b.local': 'roles' must be a list like [compute] or [coordinator, storage], "
      "got 'compute' (a string)"]),
    ("roles empty", second_device("roles: [compute]", "roles: []"),
     ["device 'system-b.local': 'roles' is empty; give at least one of coordinator, compute, storage"]),
    ("role near miss", second_device("roles: [compute]", "roles: [compue]"),
     ["device 'system-b.local': unknown role 'compue' in 'roles'; did you mean 'compute'? "
      "Allowed roles: coordinator, compute, storage"]),
    ("role unknown", second_device("roles: [compute]", "roles: [gpu]"),
     ["device 'system-b.local': unknown role 'gpu' in 'roles'. Allowed roles: coordinator, compute, storage"]),
    ("role twice", second_device("roles: [compute]", "roles: [compute, compute]"),
     ["device 'system-b.local': 'roles' lists 'compute' twice"]),
    ("engines zero", second_device("gpu: true", "gpu: true\n    engines: 0"),
     ["device 'system-b.local': 'engines' must be a positive whole number (1 or more), got 0"]),
    ("engines without compute", variant("gpu: false", "gpu: false\n    engines: 2"),
     ["device 'system-a.local': 'engines' is set but the device has no 'compute' role"]),
    ("bandwidth unit", second_device("gpu: true", "gpu: true\n    memory_bandwidth: 20Gbps"),
     ["device 'system-b.local': invalid memory_bandwidth '20Gbps': unknown size unit 'Gbps'",
      "(bytes per second, e.g. '20GB/s')"]),
    ("bandwidth zero", second_device("gpu: true", "gpu: true\n    memory_bandwidth: 0GB/s"),
     ["device 'system-b.local': 'memory_bandwidth' must be more than zero"]),
    ("address a number", second_device("gpu: true", "gpu: true\n    address: 10"),
     ["device 'system-b.local': 'address' must be a string, got 10 (int)"]),
    # cluster-wide rules
    ("no coordinator", variant("[coordinator, storage]", "[storage]"),
     ["no device has the 'coordinator' role; add coordinator to the roles of the PC that runs the "
      "controller and the API (exactly one)"]),
    ("two coordinators", variant("roles: [compute]", "roles: [coordinator, compute]"),
     ["more than one coordinator: system-a.local, system-b.local; exactly one device may have the "
      "'coordinator' role"]),
    ("same hostname, other case", variant("hostname: system-b.local", "hostname: System-A.local"),
     ["duplicate hostname 'System-A.local': devices[0] and devices[1] name the same PC; list each PC once "
      "(use 'engines'"]),
    ("same PC, short name", variant("hostname: system-c.local", "hostname: system-b"),
     ["duplicate hostname 'system-b': devices[1] and devices[2] name the same PC"]),
    ("no compute", variant("roles: [compute]", "roles: [storage]", count=2),
     ["no device has the 'compute' role; add compute to the roles of at least one PC"]),
    # network
    ("network a string", variant("network:\n  discovery: auto", "network: auto"),
     ["'network' must be a mapping of keys to values, got 'auto' (a string)"]),
    ("discovery", variant("discovery: auto", "discovery: mdns"), ["network: 'discovery' must be one of auto, manual; got 'mdns'"]),
    ("unknown network key", variant("discovery: auto", "discovry: auto"),
     ["unknown key 'discovry' in network; did you mean 'discovery'? "
      "Allowed keys: discovery, port_range, controller_port, hop_latency_ms, service_port"]),
    ("controller_port zero", network("  controller_port: 0\n"),
     ["network: 'controller_port' must be a positive whole number (1 or more), got 0"]),
    ("controller_port too high", network("  controller_port: 70000\n"),
     ["network: 'controller_port' must be a TCP port from 1 to 65535, got 70000"]),
    ("hop latency negative", network("  hop_latency_ms: -1\n"),
     ["network: 'hop_latency_ms' must be a finite number, 0 or more, got -1"]),
    ("port_range one port", network("  port_range: 10100\n"),
     ["network: 'port_range' must be two TCP ports joined by '-', like 10100-10199, got 10100"]),
    ("port_range backwards", network("  port_range: 10199-10100\n"),
     ["network: 'port_range' must run from a lower to a higher port"]),
    ("port_range too high", network("  port_range: 10100-70000\n"),
     ["network: 'port_range' must run from a lower to a higher port within 1-65535, got 10100-70000"]),
    ("port_range too small", network("  port_range: 10100-10120\n"),
     ["network: 'port_range' 10100-10120 holds 21 ports; exo-lab needs at least 35"]),
    ("service_port outside", network("  service_port: 9000\n"),
     ["network: 'service_port' 9000 is outside network.port_range 10100-10199"]),
    ("controller outside", network("  controller_port: 10180\n"),
     ["network: 'controller_port' 10180 puts the controller's 30 ports (10180-10209) outside"]),
    ("service_port in controller's", network("  service_port: 10105\n"),
     ["network: 'service_port' 10105 is one of the controller's ports 10101-10130"]),
    # api
    ("unknown api key", USER_EXAMPLE + "api:\n  prot: 8000\n",
     ["unknown key 'prot' in api; did you mean 'port'? Allowed keys: host, port, api_key_env, api_key_file"]),
    ("the api key itself", USER_EXAMPLE + "api:\n  api_key: sk-123\n",
     ["unknown key 'api_key' in api; did you mean 'api_key_env'?"]),
    ("api port zero", USER_EXAMPLE + "api:\n  port: 0\n", ["api: 'port' must be a positive whole number (1 or more), got 0"]),
    ("api_key_env holds a key", USER_EXAMPLE + "api:\n  api_key_env: sk-abc123\n",
     ["api: 'api_key_env' must be the NAME of an environment variable ", "not the key itself"]),
    ("api key env and file", USER_EXAMPLE + "api:\n  api_key_env: KEY\n  api_key_file: key.txt\n",
     ["api: set only one of 'api_key_env' and 'api_key_file', not both"]),
    ("api no value", USER_EXAMPLE + "api:\n", ["'api' must be a mapping of keys to values, got no value"]),
    ("per client above server", USER_EXAMPLE + "api:\n  max_connections: 100\n  max_connections_per_client: 200\n",
     ["api: 'max_connections_per_client' is 200 but 'max_connections' is 100: one client cannot hold more "
      "than the server accepts; set it to at most 100 (leave room for other clients, e.g. 25)"]),
    ("per client connections zero", USER_EXAMPLE + "api:\n  max_connections_per_client: 0\n",
     ["api: 'max_connections_per_client' must be a positive whole number (1 or more), got 0"]),
    ("per client running 'all'", USER_EXAMPLE + "api:\n  max_running_per_client: all\n",
     ["api: 'max_running_per_client' must be a positive whole number, got 'all' (a string)"]),
    ("per client queued negative", USER_EXAMPLE + "api:\n  max_queued_per_client: -3\n",
     ["api: 'max_queued_per_client' must be a positive whole number (1 or more), got -3"]),
    ("per client queued fraction", USER_EXAMPLE + "api:\n  max_queued_per_client: 2.5\n",
     ["api: 'max_queued_per_client' must be a positive whole number, got 2.5 (float)"]),
    # launcher
    ("launcher kind", USER_EXAMPLE + "launcher: sssh\n", ["launcher: 'kind' must be one of manual, ssh, slurm", "did you mean 'ssh'"]),
    ("launcher slurm key with ssh", USER_EXAMPLE + "launcher:\n  kind: ssh\n  partition: gpu\n",
     ["launcher: 'partition' is a setting of the slurm launcher, but kind is 'ssh'; set kind: slurm or delete the line"]),
    ("launcher unknown PC", USER_EXAMPLE + "launcher:\n  kind: ssh\n  devices:\n    system-z: {port: 22}\n",
     ["launcher: launcher.devices names 'system-z', which is not a compute PC of this file; use one of: "
      "system-b.local, system-c.local"]),
    ("launcher unknown PC key", USER_EXAMPLE + "launcher:\n  kind: ssh\n  devices:\n    system-b: {prot: 22}\n",
     ["unknown key 'prot' in launcher.devices.system-b; did you mean 'port'?"]),
]


@pytest.mark.parametrize("text, parts", [case[1:] for case in BAD_CONFIGS_TABLE],
                         ids=[case[0] for case in BAD_CONFIGS_TABLE])
def test_bad_config_message_names_file_place_key_and_fix(tmp_path, text, parts):
    """The message starts with the file, then says (in this order) each part: where (the device or
    section), the key, what is wrong and what to write instead."""
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: "), message
    position = len(f"{path}: ")
    for part in parts:
        found = message.find(part, position)
        assert found >= 0, f"{part!r} not in {message!r} (after position {position})"
        position = found + len(part)


def test_file_not_found_names_the_path(tmp_path):
    missing = tmp_path / "nope" / "config.yaml"
    with pytest.raises(ConfigError, match=rf"config file not found: {re.escape(str(missing))}"):
        load_config(missing)


def test_folder_instead_of_file(tmp_path):
    with pytest.raises(ConfigError, match=rf"{re.escape(str(tmp_path))}: is a folder"):
        load_config(tmp_path)


def test_not_utf8(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("cluster_name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=rf"{re.escape(str(path))}: not UTF-8 text"):
        load_config(path)


def test_config_error_is_an_exo_lab_error():
    assert issubclass(ConfigError, ExoLabError)


def test_top_level_not_a_mapping_from_dict():
    with pytest.raises(ConfigError, match=r"^<dict>: the configuration must be a mapping.*'hello' \(a string\)"):
        config_from_dict("hello")


def test_per_client_caps(tmp_path):
    cfg = load_config(write(tmp_path, USER_EXAMPLE + "api:\n  max_connections: 100\n  max_running_per_client: 4\n"
                                                     "  max_queued_per_client: 8\n"))
    assert (cfg.api.max_connections_per_client, cfg.api.max_running_per_client, cfg.api.max_queued_per_client) \
        == (25, 4, 8)       # a quarter of max_connections unless given
    assert ApiConfig().max_connections_per_client == ApiConfig().max_connections // 4


# --------------------------------------------------------------------------- fixture files

@pytest.mark.parametrize("name, pattern", [
    ("unknown-key.yaml", r"unknown key 'max_memmory' in device 'system-b.local'; did you mean "
                         r"'max_memory'\?"),
    ("bad-size.yaml", r"device 'system-b.local': invalid max_memory '128XB': unknown size unit"),
    ("yaml-syntax.yaml", r"invalid YAML at line 8, column 4"),
    ("no-coordinator.yaml", r"no device has the 'coordinator' role"),
])
def test_bad_fixture_files(name, pattern):
    path = BAD_CONFIGS / name
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: .*{pattern}"):
        load_config(path)


def test_load_accepts_pathlike_and_str_alike():
    assert load_config(EXAMPLES / "config.yaml") == load_config(
        os.fspath(EXAMPLES / "config.yaml"))


def test_cluster_config_can_be_built_directly():
    device = DeviceConfig("solo", ("coordinator", "compute"), None, 4, False, None)
    cfg = ClusterConfig("lab", (device,))
    assert cfg.coordinator is device and cfg.compute_devices == (device,)
    assert cfg.storage_devices == ()


# --------------------------------------------------------------------------- ports

def network_config(tmp_path, lines: str):
    return load_config(write(tmp_path, variant("  discovery: auto\n", "  discovery: auto\n" + lines)))


def test_every_port_lies_in_the_port_range(tmp_path):
    network = network_config(tmp_path, "  port_range: 20000-20099\n").network
    assert (network.service_port, network.controller_ports) == (20000, range(20001, 20031))
    assert network.data_ports == tuple(range(20031, 20100))
    listening = {network.service_port, *network.controller_ports, *network.data_ports}
    assert listening == set(range(20000, 20100))


def test_data_ports_skip_a_service_port_set_inside_the_range(tmp_path):
    network = network_config(tmp_path, "  port_range: 20000-20099\n  service_port: 20050\n").network
    assert 20050 not in network.data_ports and 20000 in network.data_ports
    assert network.controller_ports == range(20001, 20031)


def test_served_model_names_and_gpu_memory(tmp_path):
    cfg = load_config(write(tmp_path, USER_EXAMPLE.replace("    gpu: true\n", "    gpu: true\n    gpu_memory: 80GB\n", 1)
                            + "served_model_names: [llama-70b, gpt-4o]\n"))
    assert cfg.served_model_names == ("llama-70b", "gpt-4o")
    assert [d.gpu_memory_bytes for d in cfg.devices] == [None, 80 * 10**9, None]
