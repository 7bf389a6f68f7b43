"""Write docs/config.md's key table from exo_lab/config.py, where each key is declared once.

    python docs/make_config_doc.py          # rewrites the part of docs/config.md between the markers

The table in ``exo_lab.config``'s docstring (an RST simple table) is the source; this script
turns it into Markdown between the BEGIN and END markers of docs/config.md and leaves the rest
of that file alone. tests/test_readme.py fails when the two differ.
"""
from __future__ import annotations

import pathlib
import re

HERE = pathlib.Path(__file__).resolve().parent
CONFIG_DOC = HERE / "config.md"
BEGIN = "<!-- BEGIN key table: generated from exo_lab/config.py by `python docs/make_config_doc.py` -->"
END = "<!-- END key table -->"


def _markdown(text: str) -> str:
    """RST inline literals (``x``) to Markdown ones (`x`); pipes escaped for the table."""
    return re.sub(r"``(.+?)``", r"`\1`", text).replace("|", "\\|")


def _join(old: str, new: str) -> str:
    """A cell's text and its next line; a word broken after a hyphen ("stage-to-") stays whole."""
    if not old or not new:
        return old or new
    return old + new if old.endswith("-") and not old.endswith(" -") else f"{old} {new}"


def _columns(ruler: str) -> list[tuple[int, int]]:
    return [(match.start(), match.end()) for match in re.finditer(r"=+", ruler)]


def key_table(docstring: str) -> str:
    """The docstring's key table and the paragraphs after it, as Markdown."""
    lines = docstring.splitlines()
    rulers = [index for index, line in enumerate(lines) if re.fullmatch(r"=+( +=+)+", line.strip())]
    first, header_end, last = rulers[0], rulers[1], rulers[-1]
    spans = _columns(lines[first])
    rows: list[list[str]] = []
    for line in lines[header_end + 1:last]:
        if not line.strip():
            continue
        if line.startswith("**"):                     # a section: **devices[i]**, **network** ...
            rows.append([line.strip(), "", "", ""])
            continue
        cells = [line[start:(spans[i + 1][0] if i + 1 < len(spans) else len(line))].strip()
                 for i, (start, _) in enumerate(spans)]
        if cells[0]:
            rows.append(cells)
        else:                                         # a continuation line of the row above
            rows[-1] = [_join(old, new) for old, new in zip(rows[-1], cells)]
    header = [cell.strip() for cell in
              (lines[first + 1][start:(spans[i + 1][0] if i + 1 < len(spans) else None)]
               for i, (start, _) in enumerate(spans))]
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_markdown(cell) for cell in row) + " |" for row in rows]
    after = "\n".join(lines[last + 1:]).strip()
    return "\n".join(out) + "\n\n" + _markdown(after).replace("\\|", "|") + "\n"


def render(current: str) -> str:
    """``current`` (docs/config.md) with the part between the markers regenerated."""
    import exo_lab.config

    head, rest = current.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{key_table(exo_lab.config.__doc__)}{END}{tail}"


def main() -> None:
    CONFIG_DOC.write_text(render(CONFIG_DOC.read_text()))
    print(f"wrote {CONFIG_DOC}")


if __name__ == "__main__":
    main()
