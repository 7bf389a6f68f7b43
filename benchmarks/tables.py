"""The plain-text table the benchmarks print: one row per dict, columns in the first row's order."""
from __future__ import annotations


def table(rows: list[dict]) -> str:
    keys = list(rows[0])
    widths = [max(len(str(k)), *(len(str(r[k])) for r in rows)) for k in keys]
    lines = ["  ".join(str(k).ljust(w) for k, w in zip(keys, widths))]
    lines += ["  ".join(str(r[k]).ljust(w) for k, w in zip(keys, widths)) for r in rows]
    return "\n".join(lines)
