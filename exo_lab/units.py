"""Sizes and dtypes: the units every side of the wire speaks.

Sizes are bytes in ints. As in accelerate's ``max_memory``, ``KB MB GB TB`` are powers of 1000
and ``KiB MiB GiB TiB`` powers of 1024. Stage dtypes are named here and nowhere else.
"""
from __future__ import annotations

import math
import re
from decimal import Decimal

from .errors import ConfigError

# The dtypes a stage's weights can have, and the bytes per parameter of each. "int8" is weight-only:
# the decoder layers' Linear matrices in int8 with one bfloat16 scale per output row (2 / in_features
# bytes per parameter more, counted by exo_lab.model.profile); everything else in COMPUTE_DTYPES's.
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1}
# Group-wise dtypes, whose bytes exo_lab.model.profile counts per matrix (exo_lab.model.quant4):
# "int4" (4-bit codes, float16 scale and min per 32 weights: 5 bits a weight) and "gguf" (a GGUF
# model's own tensor types: Q4_K, Q6_K, Q8_0, ... as its file has them).
GROUPED_DTYPES = ("int4", "gguf")
DTYPES = (*DTYPE_BYTES, *GROUPED_DTYPES)
# What each stage dtype computes in: activations, the KV cache and every weight left unquantized
# (embeddings, norms, biases, lm_head).
COMPUTE_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16", "int8": "bfloat16",
                  "int4": "bfloat16", "gguf": "bfloat16"}
QUANTIZED_DTYPES = ("int8", "int4", "gguf")
# the llama.cpp quantizations `exo-lab plan --gguf` plans a config-only model as (model.profile.recipe_table)
GGUF_RECIPES = ("Q4_K_M", "Q4_0", "Q4_1", "Q8_0", "F16")
# "auto": "gguf" for a GGUF model (its file's own formats), "float32" for any other
AUTO_DTYPE = "auto"
DEFAULT_DTYPE = AUTO_DTYPE

_SIZE_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_UNITS_HELP = ("use B, KB, MB, GB, TB (powers of 1000) or KiB, MiB, GiB, TiB (powers of 1024), "
               "e.g. '128GB' or '64 GiB'")
_SIZE_PATTERN = re.compile(r"^([+-]?)(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)$")
_PER_SECOND_PATTERN = re.compile(r"\s*/\s*s$", re.IGNORECASE)


def describe_value(value: object) -> str:
    """How an error message shows a bad value: ``'12x' (a string)``, ``no value``."""
    if value is None:
        return "no value"
    return f"{value!r} ({'a string' if isinstance(value, str) else type(value).__name__})"


def check_dtype(dtype: str) -> str:
    """``dtype`` when it names a stage dtype, else ConfigError naming the choices."""
    if dtype not in DTYPES and dtype != AUTO_DTYPE:
        raise ConfigError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)} or {AUTO_DTYPE}")
    return dtype


def parse_size(text: str | int, *, what: str = "size") -> int:
    """Return the number of bytes a size means.

    Accepts a whole byte count (``137438953472`` or ``"137438953472"``) or a number and a unit:
    ``"128GB"``, ``"128 GiB"``, ``"1.5TB"``, ``"64KiB"``. ``KB MB GB TB`` are powers of 1000,
    ``KiB MiB GiB TiB`` powers of 1024, ``B`` is bytes; units ignore case. Fractions of a unit
    round down to whole bytes. Zero is allowed here; callers that need a positive size check.

    ``what`` names the value in the error message (e.g. ``"max_memory"``).

    Raises:
        ConfigError: not a size, an unknown unit, a negative size, a fractional byte count,
            or a type other than str or int.
    """
    if isinstance(text, bool) or not isinstance(text, (int, str)):
        raise ConfigError(f"{what} must be a size like '128GB' or a whole number of bytes, "
                          f"got {describe_value(text)}")
    if isinstance(text, int):
        return _non_negative_bytes(Decimal(text), 1, text, what)
    return _parse_size_text(text, text, what)


def parse_bandwidth(text: str | int | float, *, what: str = "memory_bandwidth") -> float:
    """Return bytes per second from a size with an optional ``/s`` (``"20GB/s"``,
    ``"20 GiB/s"``, ``"20GB"``) or a plain number of bytes per second (int or float).
    Units as in :func:`parse_size`. Raises ConfigError like :func:`parse_size`."""
    if isinstance(text, float):
        if not math.isfinite(text) or text < 0:
            raise ConfigError(f"invalid {what} {text!r}: must be a finite number, 0 or more")
        return text
    if isinstance(text, str):
        size_text = _PER_SECOND_PATTERN.sub("", text.strip())
        return float(_parse_size_text(size_text, text, what))
    return float(parse_size(text, what=what))


def _parse_size_text(body: str, shown: str, what: str) -> int:
    # ``shown`` is what the user wrote ('20XB/s'), quoted in messages instead of ``body``.
    match = _SIZE_PATTERN.match(body.strip())
    if match is None:
        raise ConfigError(f"invalid {what} {shown!r}: not a size; {_UNITS_HELP}")
    sign, number, unit = match.groups()
    multiplier = _size_multiplier(unit, shown, what)
    return _non_negative_bytes(Decimal(sign + number), multiplier, shown, what)


def _size_multiplier(unit: str, text: str, what: str) -> int:
    multiplier = _SIZE_UNITS.get(unit.lower())
    if multiplier is not None:
        return multiplier
    hint = ""
    if unit.lower() in ("k", "m", "g", "t"):
        # A bare 'G' is ambiguous between the two conventions; make the user choose.
        letter = unit.upper()
        hint = f" ('{letter}' alone is ambiguous: write '{letter}B' or '{letter}iB')"
    raise ConfigError(f"invalid {what} {text!r}: unknown size unit '{unit}'{hint}; {_UNITS_HELP}")


def _non_negative_bytes(value: Decimal, multiplier: int, text: object, what: str) -> int:
    if value < 0:
        raise ConfigError(f"invalid {what} {text!r}: a size cannot be negative")
    if multiplier == 1 and value != value.to_integral_value():
        raise ConfigError(f"invalid {what} {text!r}: a byte count must be a whole number; "
                          f"{_UNITS_HELP}")
    return int(value * multiplier)   # int() truncates: fractions round down to whole bytes


def format_bytes(n: int) -> str:
    """Human-readable size in decimal units with one decimal: ``"141.1 GB"``, ``"128 GB"``,
    ``"512 B"``. A trailing ``.0`` is dropped. Negative values keep their sign."""
    sign = "-" if n < 0 else ""
    value = float(abs(n))
    units = ("B", "KB", "MB", "GB", "TB", "PB")
    index = 0
    # Round before comparing, so 999.96 GB prints as "1 TB", not "1000 GB".
    while index < len(units) - 1 and round(value, 1) >= 1000:
        value /= 1000
        index += 1
    if index == 0:
        return f"{sign}{int(value)} B"
    text = f"{value:.1f}".removesuffix(".0")
    return f"{sign}{text} {units[index]}"


