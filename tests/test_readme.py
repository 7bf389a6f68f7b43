"""The README's quick paths run as written, so they cannot go stale.

Every fenced block of README.md is preceded, on the line right above its opening fence, by an
HTML comment that says how it is checked (a block without one fails
``test_every_readme_block_says_how_it_is_checked``):

``<!-- test: cell -->``
    Python (IPython magics allowed). All of them, in README order, are the cells of one notebook
    run top to bottom in a real Jupyter kernel.
``<!-- test: serve -->``
    One ``exo-lab serve ...`` line. It is started as written, with ``--port <a free port>``
    added; the ``test: openai`` blocks talk to it.
``<!-- test: openai -->``
    Python run in a subprocess against that server; only the ``8000`` of ``127.0.0.1:8000``
    becomes the server's port.
``<!-- test: output -->``
    A transcript: ``$ command`` lines, each followed by exactly what it prints (stdout and
    stderr, as a terminal shows them). Each command is run from the repository root. The
    transcripts in docs/*.md are checked the same way. When a change means to alter what they
    print, ``python tests/test_readme.py --update-transcripts`` rewrites them all.
``<!-- test: flags -->``
    A command synopsis (docs/usage.md): every ``--flag`` of each ``exo-lab COMMAND`` or
    ``python -m MODULE`` line (and its indented continuation lines) is in that command's --help.
``<!-- test: no: REASON -->``
    Not run here, for the reason given (installs packages, runs elsewhere, ...).
``<!-- run: PLACE -->``
    The office recipe: PLACE is ``system-a``, ``system-b``, ``system-c`` or ``every PC`` (run
    literally, each on its PC, by the netlab test), or ``install``, ``firewall``, ``check``
    (not run there). Here, the one-shot ``exo-lab ...`` blocks of system-a and every PC run
    in a folder holding a copy of examples/config.yaml as config.yaml, and every ``python -m``
    line's flags must be flags of that command.

Besides: the README stays at most ``MAX_README_LINES`` lines, its links and anchors (and those
of docs/*.md) resolve, every ```yaml block of them is a valid config (a fragment on top of the
seed's), one torch pin is used by README.md, Makefile and environment.yml, and
docs/config.md's key table is what ``python docs/make_config_doc.py`` writes.
"""
from __future__ import annotations

import importlib.util
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import nbformat
import psutil
import pytest
import yaml
from browser import end_processes
from kernels import kernel_manager
from nbclient import NotebookClient
from ports import free_port

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
BIN = Path(sys.executable).parent
EXO_LAB = BIN / "exo-lab"
MAX_README_LINES = 250
SERVER_START_TIMEOUT_S = 150
OFFICE_PLACES = {"system-a", "system-b", "system-c", "every PC", "install", "firewall", "check"}
TEST_KINDS = {"cell", "serve", "openai", "output", "flags"}

MARKER = re.compile(r"^<!-- (test|run): (.+?) -->$")
FENCE = re.compile(r"^(```+)(\S*)\s*$")


# ------------------------------------------------------------------ reading the blocks
class Block:
    """One fenced block: its marker (kind, value), fence language, text and line number."""

    def __init__(self, marker, language: str, text: str, line: int, path: Path):
        self.marker, self.language, self.text, self.line, self.path = marker, language, text, line, path

    def __repr__(self) -> str:
        return f"{self.path.name}:{self.line} ({self.marker})"


def fenced_blocks(path: Path) -> list[Block]:
    """Every fenced block of a Markdown file, with the marker on the line above its fence."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, index = [], 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if not opening:
            index += 1
            continue
        close = next(i for i in range(index + 1, len(lines)) if lines[i].strip() == opening.group(1))
        above = MARKER.match(lines[index - 1]) if index else None
        marker = (above.group(1), above.group(2)) if above else None
        blocks.append(Block(marker, opening.group(2), "\n".join(lines[index + 1:close]) + "\n", index + 1, path))
        index = close + 1
    return blocks


def readme_blocks(kind: str, value: str | None = None) -> list[Block]:
    return [b for b in fenced_blocks(README)
            if b.marker and b.marker[0] == kind and (value is None or b.marker[1] == value)]


def command_words(line: str) -> list[str]:
    """A shell line's words, its comment dropped, `exo-lab` / `python` as this environment's."""
    words = shlex.split(line, comments=True)
    if words and words[0] == "exo-lab":
        words[0] = str(EXO_LAB)
    elif words and words[0] == "python":
        words[0] = sys.executable
    return words


def environment() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}


# ------------------------------------------------------------------ the README's shape
def test_every_readme_block_says_how_it_is_checked():
    blocks = fenced_blocks(README)
    unmarked = [b for b in blocks if b.marker is None]
    assert not unmarked, f"README blocks without a `<!-- test: ... -->` or `<!-- run: ... -->` line above: {unmarked}"
    for block in blocks:
        kind, value = block.marker
        if kind == "run":
            assert value in OFFICE_PLACES, f"{block}: run: must name one of {sorted(OFFICE_PLACES)}"
        elif not value.startswith("no: "):
            assert value in TEST_KINDS, f"{block}: test: must be one of {sorted(TEST_KINDS)} or 'no: REASON'"
    kinds = {b.marker for b in blocks}
    for needed in [("test", "cell"), ("test", "serve"), ("test", "openai"), ("test", "output"),
                   ("run", "system-a"), ("run", "system-b"), ("run", "system-c")]:
        assert needed in kinds, f"the README lost its {needed} blocks"


def test_readme_is_short_and_starts_with_the_two_make_commands():
    text = README.read_text(encoding="utf-8")
    count = len(text.splitlines())
    assert count <= MAX_README_LINES, f"README.md has {count} lines; move details to docs/ (limit {MAX_README_LINES})"
    first = fenced_blocks(README)[0].text.splitlines()
    assert [line.split()[:2] for line in first] == [["make", "demo"], ["make", "test"]]
    assert "about 20 minutes" in first[1]
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^demo: .*\n\t\$\(VENV\)/bin/exo-lab demo$", makefile, re.M)
    assert re.search(r"^test: .*\n\t\$\(VENV\)/bin/python -m pytest", makefile, re.M)


def test_one_torch_pin_for_readme_makefile_and_environment_yml():
    pin = re.search(r"^TORCH_SPEC \?= (torch==\S+)$", (ROOT / "Makefile").read_text(), re.M).group(1)
    readme_pins = set(re.findall(r"torch==[0-9][\w.]*", README.read_text(encoding="utf-8")))
    assert readme_pins == {pin}
    environment_yml = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in environment_yml["dependencies"] if isinstance(d, dict))
    assert pip[0] == pin and "-e .[test]" in pip, pip


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    return {_slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", text, re.M)}


@pytest.mark.parametrize("path", [README, *sorted(DOCS.glob("*.md")), ROOT / "profiles" / "README.md"],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve(path):
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            broken.append(target)
        elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
            broken.append(target)
    assert not broken, f"{path.name}: links that lead nowhere: {broken}"


def test_config_doc_is_generated_from_exo_lab_config():
    spec = importlib.util.spec_from_file_location("make_config_doc", DOCS / "make_config_doc.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    current = module.CONFIG_DOC.read_text()
    assert module.render(current) == current, "docs/config.md is stale: run `python docs/make_config_doc.py`"


def yaml_blocks():
    return [b for path in [README, *sorted(DOCS.glob("*.md"))] for b in fenced_blocks(path) if b.language == "yaml"]


@pytest.mark.parametrize("block", yaml_blocks(), ids=repr)
def test_config_snippets_are_valid_config(block):
    """A whole config loads as it is; a fragment (a launcher: section ...) on top of the seed's."""
    from exo_lab.config import config_from_dict

    data = yaml.safe_load(block.text)
    if "cluster_name" not in data:
        seed = yaml.safe_load((ROOT / "examples" / "config.yaml").read_text())
        data = {**seed, **data, "network": {**seed["network"], **data.get("network", {})}}
    config_from_dict(data, source=repr(block))


# ------------------------------------------------------------------ transcripts
def transcripts() -> list[tuple[Block, str, list[str]]]:
    """(block, command, expected lines) of every `test: output` block in README.md and docs/."""
    found = []
    for path in [README, *sorted(DOCS.glob("*.md"))]:
        for block in fenced_blocks(path):
            if block.marker != ("test", "output"):
                continue
            command, expected = None, []
            for line in block.text.splitlines():
                if line.startswith("$ "):
                    if command:
                        found.append((block, command, expected))
                    command, expected = line[2:], []
                else:
                    expected.append(line)
            assert command, f"{block}: a `test: output` block starts with a `$ command` line"
            found.append((block, command, expected))
    return found


def run_transcript_command(command: str) -> str:
    run = subprocess.run(command_words(command), cwd=ROOT, env=environment(), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, timeout=60)
    return run.stdout.rstrip("\n")


def update_transcripts() -> None:
    """Rewrite every `test: output` block with what its commands print now."""
    for path in [README, *sorted(DOCS.glob("*.md"))]:
        text = path.read_text(encoding="utf-8")
        for block in fenced_blocks(path):
            if block.marker != ("test", "output"):
                continue
            commands = [line[2:] for line in block.text.splitlines() if line.startswith("$ ")]
            fresh = "".join(f"$ {command}\n{run_transcript_command(command)}\n" for command in commands)
            text = text.replace(f"<!-- test: output -->\n```\n{block.text}```",
                                f"<!-- test: output -->\n```\n{fresh}```", 1)
        path.write_text(text, encoding="utf-8")
        print(f"updated {path.relative_to(ROOT)}")


@pytest.mark.parametrize("block, command, expected", transcripts(),
                         ids=lambda value: value if isinstance(value, str) else None)
def test_transcript_is_what_the_command_prints(block, command, expected):
    printed = run_transcript_command(command)
    assert printed.splitlines() == expected, (f"{block}: `{command}` now prints:\n{printed}\n"
                                              f"to take it: python tests/test_readme.py --update-transcripts")


def synopses() -> list[tuple[Block, list[str], list[str]]]:
    """(block, command words, flags) of each command of every `test: flags` block."""
    found = []
    for path in [README, *sorted(DOCS.glob("*.md"))]:
        for block in fenced_blocks(path):
            if block.marker != ("test", "flags"):
                continue
            for line in block.text.splitlines():
                text = line.split("#")[0]
                if not line.startswith(" "):
                    words = text.split()
                    found.append((block, words[:3] if words[0] == "python" else words[:2], []))
                found[-1][2].extend(re.findall(r"--[a-z][a-z-]*", text))
    return found


@pytest.mark.parametrize("block, command, flags", synopses(), ids=lambda value: " ".join(value) if isinstance(value, list) else None)
def test_synopsis_flags_exist(block, command, flags):
    helped = subprocess.run(command_words(" ".join(command)) + ["--help"], cwd=ROOT, env=environment(),
                            capture_output=True, text=True, timeout=60)
    assert helped.returncode == 0, helped.stderr
    missing = [flag for flag in flags if not re.search(rf"{re.escape(flag)}\b", helped.stdout)]
    assert not missing, f"{block}: `{' '.join(command)}` has no {missing}"


# ------------------------------------------------------------------ the office recipe, here
def test_office_one_shot_blocks_run_in_a_folder_with_the_example_config(tmp_path):
    shutil.copy(ROOT / "examples" / "config.yaml", tmp_path / "config.yaml")
    ran = []
    for block in fenced_blocks(README):
        if block.marker not in (("run", "system-a"), ("run", "every PC")):
            continue
        if not all(command_words(line)[:1] == [str(EXO_LAB)] for line in block.text.splitlines() if line.strip()):
            continue
        run = subprocess.run(["bash", "-e", "-c", block.text], cwd=tmp_path, env=environment(),
                             capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, f"{block}: {block.text!r} failed:\n{run.stdout}{run.stderr}"
        ran.append(block.text.strip())
    assert ran == ["exo-lab secret secret.txt", "exo-lab check-config config.yaml"], ran
    assert "secret from" in run.stdout and "no shared secret" not in run.stdout


def test_office_python_lines_use_only_flags_that_exist():
    checked = 0
    for block in fenced_blocks(README):
        if not block.marker or block.marker[0] != "run" or block.marker[1] in ("install", "firewall"):
            continue
        for line in block.text.splitlines():
            words = command_words(line)
            if words[:2] != [sys.executable, "-m"]:
                continue
            helped = subprocess.run(words[:3] + ["--help"], cwd=ROOT, env=environment(), capture_output=True,
                                    text=True, timeout=60)
            assert helped.returncode == 0, helped.stderr
            flags = [word.split("=")[0] for word in words[3:] if word.startswith("--")]
            missing = [flag for flag in flags if not re.search(rf"{re.escape(flag)}\b", helped.stdout)]
            assert not missing, f"{block}: `{line}` uses flags {words[2]} does not have: {missing}"
            checked += 1
    assert checked >= 3      # the server, and a worker on system-b and system-c


# ------------------------------------------------------------------ one laptop, JupyterLab, OpenAI
class LaptopServer:
    """The README's `test: serve` line, started as written on a free port."""

    def __init__(self):
        (block,) = readme_blocks("test", "serve")
        (line,) = [line for line in block.text.splitlines() if line.strip()]
        words = command_words(line)
        assert words[:2] == [str(EXO_LAB), "serve"] and "--port" not in words, line
        self.port = free_port()
        self.lines: list[str] = []
        self.ready = threading.Event()
        self.process = subprocess.Popen(words + ["--port", str(self.port)], cwd=ROOT, env=environment(),
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)
            if line.startswith("serving "):
                self.ready.set()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while not self.ready.wait(0.5):
            assert self.process.poll() is None, f"exo-lab serve ended: {''.join(self.lines)}"
            assert time.monotonic() < deadline, f"exo-lab serve not up after {SERVER_START_TIMEOUT_S} s: {''.join(self.lines)}"

    def stop(self) -> int | None:
        children = [p.pid for p in psutil.Process(self.process.pid).children(recursive=True)]
        self.process.send_signal(signal.SIGINT)        # what Ctrl-C does: it stops the cluster
        try:
            return self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            end_processes(children + [self.process.pid])
            return None


@pytest.fixture(scope="module")
def laptop_server():
    """The README's server. Not started while the notebook's cluster runs: two clusters whose
    engines each take every core are slower together, on a 2-core machine, than one after the other."""
    server = LaptopServer()
    yield server
    code = server.stop()
    assert code == 0, f"exo-lab serve did not stop cleanly on Ctrl-C ({code}): {''.join(server.lines)[-2000:]}"


@pytest.mark.timeout(240)
def test_jupyterlab_cells_run_in_a_real_kernel(tmp_path):
    cells = [nbformat.v4.new_code_cell(block.text.strip()) for block in readme_blocks("test", "cell")]
    notebook = nbformat.v4.new_notebook(cells=cells)
    manager = kernel_manager()
    client = NotebookClient(notebook, km=manager, timeout=180, resources={"metadata": {"path": str(tmp_path)}})
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    try:
        client.execute()        # raises CellExecutionError, naming the cell, if any cell fails
    finally:
        if manager.has_kernel:
            manager.shutdown_kernel(now=False)
    outputs = [o for c in notebook.cells for o in c.get("outputs", [])]
    text = "\n".join(o.get("text", "") + o.get("data", {}).get("text/plain", "") for o in outputs)
    assert "Paris" in text, text
    assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in outputs), "no widget shown"
    # %%px printed each engine's stage index, first layer and stop layer: two stages cover [0, 30)
    stages = sorted(tuple(map(int, m)) for m in re.findall(r"^\[stdout:\d+\] (\d+) (\d+) (\d+)$", text, re.M))
    assert [index for index, _, _ in stages] == [0, 1], text
    assert stages[0][1] == 0 and stages[0][2] == stages[1][1], stages
    left = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    _, alive = psutil.wait_procs(left, timeout=10)
    assert not alive, f"the notebook left processes running: {[p.cmdline() for p in alive]}"


@pytest.mark.timeout(240)
def test_openai_snippet_against_the_readme_server(laptop_server, tmp_path):
    (block,) = readme_blocks("test", "openai")
    assert "127.0.0.1:8000" in block.text
    laptop_server.wait_ready()
    script = tmp_path / "snippet.py"
    script.write_text(block.text.replace("127.0.0.1:8000", f"127.0.0.1:{laptop_server.port}"))
    run = subprocess.run([sys.executable, str(script)], env=environment(), capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip(), "the snippet printed no answer"


if __name__ == "__main__":
    if sys.argv[1:] != ["--update-transcripts"]:
        sys.exit("usage: python tests/test_readme.py --update-transcripts")
    update_transcripts()
