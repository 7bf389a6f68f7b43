"""Write docs/config.md's key table from exo_lab/settings.py, where each key is declared once.

    python docs/make_config_doc.py          # rewrites the part of docs/config.md between the markers

Each row is one :class:`exo_lab.settings.Setting` of ``exo_lab.settings.SCHEMA``: its key,
whether it is required, its default and its help, section by section. The rest of
docs/config.md is written by hand and left alone. tests/test_settings.py fails when the two differ.
"""
from __future__ import annotations

import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))        # run from a checkout without installing it
CONFIG_DOC = HERE / "config.md"
BEGIN = "<!-- BEGIN key table: generated from exo_lab/settings.py by `python docs/make_config_doc.py` -->"
END = "<!-- END key table -->"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def key_table() -> str:
    """The schema's keys as one Markdown table, a heading row for each section but the top level."""
    from exo_lab import settings

    rows = ["| key | required | default | meaning |", "|---|---|---|---|"]
    for section in settings.SCHEMA:
        if section.name:
            rows.append(f"| {_cell(section.title or f'**{section.name}**')} |  |  |  |")
        rows += [f"| `{item.key}` | {'yes' if item.required else 'no'} | "
                 f"{'' if item.required else _cell(item.shown_default())} | {_cell(item.help)} |"
                 for item in section.settings]
    return "\n".join(rows) + "\n"


def render(current: str) -> str:
    """``current`` (docs/config.md) with the part between the markers regenerated."""
    head, rest = current.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{key_table()}{END}{tail}"


def main() -> None:
    CONFIG_DOC.write_text(render(CONFIG_DOC.read_text()))
    print(f"wrote {CONFIG_DOC}")


if __name__ == "__main__":
    main()
