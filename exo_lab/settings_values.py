"""What a setting's value may be: the checks of config.yaml values and of command-line flags.

Each :class:`Kind` pairs the check of a value read from config.yaml (``check(where, key,
value)``, raising :class:`~exo_lab.errors.ConfigError` through :meth:`Where.error`, so every
message names the file, the device or section, and the key, and says what to write instead)
with the argparse type of the same setting given as a flag. :mod:`exo_lab.settings` gives each
setting its kind; nothing here knows a key by name.
"""
from __future__ import annotations

import argparse
import difflib
import math
import re
from collections.abc import Callable
from dataclasses import dataclass

from .errors import ConfigError
from .units import describe_value, parse_bandwidth, parse_size

_CLUSTER_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_ENV_NAME_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SLURM_TIME_PATTERN = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$")


@dataclass(frozen=True)
class Where:
    """Where a value sits, for messages: the file, and the device or section."""

    source: str
    label: str | None          # "device 'system-b.local'", "devices[2]", "network", or None
    in_phrase: str             # used in "unknown key 'x' in <in_phrase>"

    def error(self, message: str) -> ConfigError:
        prefix = f"{self.source}: {self.label}: " if self.label else f"{self.source}: "
        return ConfigError(prefix + message)


@dataclass(frozen=True)
class Kind:
    """A value type: its check in config.yaml, and how a command-line flag reads it."""

    check: Callable[[Where, str, object], object] | None   # None: a section, read by exo_lab.config
    flag_type: Callable[[str], object] = str
    choices: tuple[str, ...] | None = None
    many: bool = False                  # a flag given several times (or with several values) adds up


def require_mapping(where: Where, value: object, name: str, fix: str) -> dict:
    """``value`` when it is a mapping, else an error naming ``name`` and saying ``fix``."""
    if not isinstance(value, dict):
        raise where.error(f"{name} must be a mapping of keys to values, got {describe_value(value)}; {fix}")
    return value


def closest(word: object, allowed: tuple[str, ...]) -> str | None:
    """The allowed word ``word`` is most likely a typo of, or None."""
    found = difflib.get_close_matches(str(word), allowed, n=1, cutoff=0.6)
    return found[0] if found else None


# --------------------------------------------------------------------------- command-line types

def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 1")
    return value


def port_number(text: str) -> int:
    """argparse type: a TCP port, 0-65535 (0 picks a free one)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (0-65535; 0 picks a free one)")
    return value


# --------------------------------------------------------------------------- config.yaml checks

def _positive_int(where: Where, key: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise where.error(f"'{key}' must be a positive whole number, got {describe_value(value)}")
    if value <= 0:
        raise where.error(f"'{key}' must be a positive whole number (1 or more), got {value}")
    return value


def _port(where: Where, key: str, value: object) -> int:
    port = _positive_int(where, key, value)
    if port > 65535:
        raise where.error(f"'{key}' must be a TCP port from 1 to 65535, got {port}")
    return port


def _boolean(where: Where, key: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise where.error(f"'{key}' must be true or false, got {describe_value(value)}; write "
                          f"{key}: true or {key}: false without quotes")
    return value


def _non_negative_float(where: Where, key: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise where.error(f"'{key}' must be a number, got {describe_value(value)}")
    if not math.isfinite(value) or value < 0:
        raise where.error(f"'{key}' must be a finite number, 0 or more, got {value}")
    return float(value)


def _nonblank_string(where: Where, key: str, value: object) -> str:
    if not isinstance(value, str):
        raise where.error(f"'{key}' must be a string, got {describe_value(value)}; put it in quotes")
    if not value.strip() or value != value.strip():
        raise where.error(f"'{key}' must be a non-empty string without leading or trailing "
                          f"spaces, got {value!r}")
    return value


def _single_word(where: Where, key: str, value: object) -> str:
    text = _nonblank_string(where, key, value)
    if any(ch.isspace() for ch in text):
        raise where.error(f"'{key}' must not contain spaces, got {text!r}")
    return text


def _choice_check(allowed: tuple[str, ...]):
    def check(where: Where, key: str, value: object) -> str:
        if not isinstance(value, str) or value not in allowed:
            close = closest(value, allowed)
            hint = f" (did you mean '{close}'?)" if close else ""
            raise where.error(f"'{key}' must be one of {', '.join(allowed)}; got "
                              f"{describe_value(value)}{hint}")
        return value
    return check


def _size(where: Where, key: str, value: object) -> int:
    try:
        size = parse_size(value, what=key)
    except ConfigError as exc:
        raise where.error(str(exc)) from exc
    if size == 0:
        raise where.error(f"'{key}' must be more than zero, got {value!r}; delete the line for no cap")
    return size


def _bandwidth(where: Where, key: str, value: object) -> float:
    try:
        rate = parse_bandwidth(value, what=key)
    except ConfigError as exc:
        raise where.error(f"{exc} (bytes per second, e.g. '20GB/s')") from exc
    if rate <= 0:
        raise where.error(f"'{key}' must be more than zero, got {value!r}")
    return rate


def _cluster_name(where: Where, key: str, value: object) -> str:
    name = _nonblank_string(where, key, value)
    if not _CLUSTER_NAME_PATTERN.match(name):
        raise where.error(f"'{key}' may contain only letters, digits, '.', '_' and '-' and must start "
                          f"with a letter or digit, got {name!r} (e.g. engineering_cluster)")
    return name


def _name_list(where: Where, key: str, value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise where.error(f"'{key}' must be a list of names like [llama-70b, gpt-4o], got {describe_value(value)}")
    names = tuple(_single_word(where, f"{key}[{index}]", name) for index, name in enumerate(value))
    if len(set(names)) != len(names):
        raise where.error(f"'{key}' lists a name twice: {', '.join(names)}")
    return names


def _host_list(where: Where, key: str, value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise where.error(f"'{key}' must be a list of host names like [llm.example.lan], got {describe_value(value)}")
    return tuple(_single_word(where, f"{key}[{index}]", name) for index, name in enumerate(value))


def _env_name(where: Where, key: str, value: object) -> str:
    name = _nonblank_string(where, key, value)
    if not _ENV_NAME_PATTERN.match(name):
        # Usually the key itself was pasted here; it must not live in config.yaml.
        raise where.error(f"'{key}' must be the NAME of an environment variable (letters, "
                          f"digits, '_'), e.g. EXO_LAB_API_KEY, not the key itself")
    return name


def _roles_check(allowed: tuple[str, ...]):
    def check(where: Where, key: str, value: object) -> tuple[str, ...]:
        if not isinstance(value, list):
            raise where.error(f"'{key}' must be a list like [compute] or [coordinator, storage], "
                              f"got {describe_value(value)}")
        if not value:
            raise where.error(f"'{key}' is empty; give at least one of {', '.join(allowed)}")
        for index, role in enumerate(value):
            if role not in allowed:
                close = closest(role, allowed)
                hint = f"; did you mean '{close}'?" if close else "."
                raise where.error(f"unknown role {role!r} in '{key}'{hint} Allowed roles: {', '.join(allowed)}")
            if role in value[:index]:
                raise where.error(f"'{key}' lists {role!r} twice; list each role once")
        return tuple(value)
    return check


def _port_range_check(min_ports: int, why: str):
    def check(where: Where, key: str, value: object) -> tuple[int, int]:
        text = value if isinstance(value, str) else None
        found = re.fullmatch(r"\s*(\d{1,5})\s*-\s*(\d{1,5})\s*", text or "")
        if found is None:
            raise where.error(f"'{key}' must be two TCP ports joined by '-', like 10100-10199, got "
                              f"{describe_value(value)}")
        first, last = int(found.group(1)), int(found.group(2))
        if not 1 <= first <= last <= 65535:
            raise where.error(f"'{key}' must run from a lower to a higher port within 1-65535, got {text.strip()}")
        if last - first + 1 < min_ports:
            raise where.error(f"'{key}' {first}-{last} holds {last - first + 1} ports; exo-lab needs at least "
                              f"{min_ports} ({why}), e.g. {first}-{first + 99}")
        return first, last
    return check


def _ssh_options(where: Where, key: str, value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise where.error(f"'{key}' must be a list of ssh -o settings like [StrictHostKeyChecking=accept-new], "
                          f"got {describe_value(value)}")
    options = tuple(_single_word(where, f"{key}[{index}]", item) for index, item in enumerate(value))
    for option in options:
        if "=" not in option:
            raise where.error(f"'{key}' entries are Name=value (as after `ssh -o`), got {option!r}")
    return options


def _slurm_time(where: Where, key: str, value: object) -> str:
    text = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
    text = _single_word(where, key, text)
    if not _SLURM_TIME_PATTERN.match(text):
        raise where.error(f"'{key}' must be a Slurm time limit like 30, 4:00:00 or 1-12:00:00 "
                          f"(minutes, hours:minutes:seconds, days-hours...), got {text!r}")
    return text


# --------------------------------------------------------------------------- the kinds

POSITIVE_INT = Kind(_positive_int, positive_int)
PORT = Kind(_port, port_number)
BOOLEAN = Kind(_boolean)
NON_NEGATIVE = Kind(_non_negative_float, float)
TEXT = Kind(_nonblank_string)           # a non-empty string: a path, a model id
WORD = Kind(_single_word)               # a string without spaces: a host name, a user name
SIZE = Kind(_size)
BANDWIDTH = Kind(_bandwidth)
CLUSTER_NAME = Kind(_cluster_name)
NAMES = Kind(_name_list, many=True)
HOSTS = Kind(_host_list)
ENV_NAME = Kind(_env_name)
SSH_OPTIONS = Kind(_ssh_options)
SLURM_TIME = Kind(_slurm_time)
SECTION = Kind(None)                    # a mapping or list of its own (devices, network, api, launcher)


def choice(allowed: tuple[str, ...]) -> Kind:
    """One of ``allowed``; a near miss is named in the message."""
    return Kind(_choice_check(allowed), choices=allowed)


def roles(allowed: tuple[str, ...]) -> Kind:
    """A non-empty list of distinct words from ``allowed``."""
    return Kind(_roles_check(allowed))


def port_range(min_ports: int, why: str) -> Kind:
    """``first-last`` holding at least ``min_ports`` ports; ``why`` says what needs them."""
    return Kind(_port_range_check(min_ports, why))
