"""A real JupyterLab server for the browser tests (tests/test_jupyterlab.py) and the README's
screenshot (docs/make_screenshots.py).

:func:`running_lab` starts ``jupyter lab`` of this interpreter on 127.0.0.1 with a random token in
a folder of its own (config, runtime, settings and workspaces inside it; nothing of the user's
~/.jupyter is read or written) with everything that could reach the internet turned off (news,
update checks, the PyPI extension manager). On exit it stops the server and then ends, by pid,
every process that was running under it (kernels and what they started: ipyparallel controllers
and engines).
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import nbformat
import psutil
from browser import end_processes
from ports import free_port

START_TIMEOUT_S = 90.0
NOTEBOOK_NAME = "dashboard.ipynb"
PAGE_CONFIG = {"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}}
SERVER_CONFIG = {"LabApp": {"news_url": None, "check_for_updates_class": "jupyterlab.NeverCheckForUpdate",
                            "extension_manager": "readonly"}}


def dashboard_notebook(model: str = "demo", question: str | None = None) -> nbformat.NotebookNode:
    """Start a 2-engine local cluster, load ``model``, show ``cluster.widget()``; then, with a
    ``question``, chat (else a short generation) while the widget is on screen."""
    last = (f"print(cluster.chat({question!r}, max_new_tokens=32).text)" if question
            else 'print(cluster.generate("Hello", max_new_tokens=8).finish_reason)')
    notebook = nbformat.v4.new_notebook()
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)",
                                       "language": "python"}
    notebook.cells = [
        nbformat.v4.new_code_cell("import exo_lab\n\ncluster = exo_lab.Cluster.local(engines=2, max_cores=1).start()\n"
                                  f"plan = cluster.load({model!r}, min_stages=2, progress=False)"),
        nbformat.v4.new_code_cell("dashboard = cluster.widget()\ndashboard"),
        nbformat.v4.new_code_cell(last),
    ]
    return notebook


@dataclass
class Lab:
    url: str            # http://127.0.0.1:PORT
    token: str
    root: Path
    process: subprocess.Popen

    def notebook_url(self, name: str = NOTEBOOK_NAME) -> str:
        return f"{self.url}/lab/tree/{name}?token={self.token}"


def _write_config(root: Path) -> Path:
    config = root / ".jupyter"
    (config / "labconfig").mkdir(parents=True)
    (config / "labconfig" / "page_config.json").write_text(json.dumps(PAGE_CONFIG))
    (config / "jupyter_server_config.json").write_text(json.dumps(SERVER_CONFIG))
    return config


def _wait_until_up(lab: Lab, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if lab.process.poll() is not None:
            raise RuntimeError(f"jupyter lab exited with {lab.process.returncode}: {log.read_text()[-2000:]}")
        try:
            urllib.request.urlopen(f"{lab.url}/api/status?token={lab.token}", timeout=2).close()
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"jupyter lab did not answer within {START_TIMEOUT_S:.0f} s: {log.read_text()[-2000:]}")


@contextlib.contextmanager
def running_lab(root: Path, notebook: nbformat.NotebookNode):
    """JupyterLab serving ``root`` (which gets ``notebook`` as dashboard.ipynb); yields a :class:`Lab`."""
    nbformat.write(notebook, root / NOTEBOOK_NAME)
    config = _write_config(root)
    port, token = free_port(), secrets.token_hex(16)
    (root / ".tmp").mkdir()
    # TMPDIR: what the kernel's cluster leaves in temporary folders stays inside root.
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(config), "JUPYTER_RUNTIME_DIR": str(root / ".runtime"),
           "TMPDIR": str(root / ".tmp")}
    log = root / ".lab.log"
    command = [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", "--ServerApp.ip=127.0.0.1",
               f"--ServerApp.port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
               f"--ServerApp.root_dir={root}", f"--LabApp.user_settings_dir={root / '.settings'}",
               f"--LabApp.workspaces_dir={root / '.workspaces'}"]
    with open(log, "wb") as output:
        process = subprocess.Popen(command, env=env, cwd=root, stdout=output, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL)
    lab = Lab(url=f"http://127.0.0.1:{port}", token=token, root=root, process=process)
    try:
        _wait_until_up(lab, log)
        yield lab
    finally:
        stop_lab(lab)


def stop_lab(lab: Lab) -> None:
    """SIGTERM the server (it shuts its kernels down), then end whatever ran under it, by pid."""
    try:
        under = [child.pid for child in psutil.Process(lab.process.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        under = []
    end_processes([lab.process.pid], timeout_s=20)
    end_processes(under)


def run_all_cells(page, lab: Lab) -> None:
    """Open the notebook, wait for its kernel, and run every cell from JupyterLab's Run menu."""
    from playwright.sync_api import expect

    page.goto(lab.notebook_url())
    expect(page.locator(".jp-Notebook .jp-Cell")).to_have_count(3, timeout=60_000)
    expect(page.locator(".jp-StatusBar-TextItem", has_text="| Idle").first).to_be_visible(timeout=60_000)
    page.get_by_role("menuitem", name="Run", exact=True).click()
    page.get_by_text("Run All Cells", exact=True).click()
