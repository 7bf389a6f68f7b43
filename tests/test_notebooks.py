"""Every example notebook runs top to bottom in a real Jupyter kernel of this interpreter, and the
committed .ipynb files are exactly what notebooks/make_notebooks.py writes (no outputs)."""
from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import nbformat
import psutil
import pytest
from kernels import kernel_manager
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
RUN_LIMIT_S = 90.0
CELL_TIMEOUT_S = 120

# What each notebook must show besides running without an error: text in some output.
EXPECTED_TEXT = {
    "quickstart.ipynb": ["Plan for smollm2 (gguf)", "cluster local: ready, model smollm2, 2 engines",
                         "Paris", "CompletionUsage(completion_tokens="],
    "experiments.ipynb": ["('localhost#0', 0, 15), ('localhost#1', 15, 30)",   # from_config's one-PC cluster
                          "12 forwards (1 prefill + 11 decode steps)", "-> logits (1, "],
    "benchmark.ipynb": ["the cluster generated the same tokens as the single process: True"],
    "finetune.ipynb": ["adapter knows: True | base knows: False", "'zorblat'"],
}


# Rich outputs each notebook must produce: (mime type, at least how many).
EXPECTED_DISPLAYS = {
    "quickstart.ipynb": [("application/vnd.jupyter.widget-view+json", 1), ("image/png", 2)],   # dashboard; plots
    "experiments.ipynb": [("image/png", 1)],
    "benchmark.ipynb": [("image/png", 2)],
    "finetune.ipynb": [("application/vnd.jupyter.widget-view+json", 1), ("image/png", 1)],   # the job; its loss
}
# Notebooks that train need longer than RUN_LIMIT_S (measured: about 30 s of training on 2 cores).
RUN_LIMITS_S = {"finetune.ipynb": 180.0}


def make_notebooks_module():
    spec = importlib.util.spec_from_file_location("make_notebooks", NOTEBOOKS / "make_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def outputs_text(notebook) -> str:
    parts = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            parts.append(output.get("text", ""))
            parts.append(output.get("data", {}).get("text/plain", ""))
    return "\n".join(parts)


def assert_dashboard_updated_from_its_thread(widget_state: dict) -> None:
    """The frontend (here nbclient) got the dashboard's tokens/s while cells ran: only the
    refresh thread sets it, so its comm messages reached the kernel's iopub."""
    bars = [state for state in widget_state.values()          # model id -> its synced state
            if state.get("_model_name") == "FloatProgressModel" and state.get("description") == "tokens/s"]
    assert len(bars) == 1
    assert bars[0]["max"] > 1.0, f"the dashboard never showed a tokens/s above 1: {bars[0]}"


@pytest.mark.parametrize("name", sorted(EXPECTED_TEXT))
@pytest.mark.timeout(240)
def test_notebook_runs_top_to_bottom(name, tmp_path):
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    # First, prove the kernel is this environment's interpreter (not some python3 on PATH).
    notebook.cells.insert(0, nbformat.v4.new_code_cell("import sys; print('prefix:', sys.prefix)"))
    manager = kernel_manager()
    client = NotebookClient(notebook, km=manager, timeout=CELL_TIMEOUT_S,
                            resources={"metadata": {"path": str(tmp_path)}})
    children_before = {p.pid for p in psutil.Process().children(recursive=True)}
    started = time.monotonic()
    try:
        client.execute()        # raises CellExecutionError, naming the cell, if any cell fails
        elapsed_s = time.monotonic() - started
    finally:
        if manager.has_kernel:  # a kernel manager we pass in is ours to shut down
            manager.shutdown_kernel(now=False)
    assert notebook.cells[0].outputs[0]["text"].strip() == f"prefix: {sys.prefix}"
    errors = [o for c in notebook.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    text = outputs_text(notebook)
    for expected in EXPECTED_TEXT[name]:
        assert expected in text, f"{name}: no output contains {expected!r}"
    for mime, least in EXPECTED_DISPLAYS[name]:
        count = sum(mime in o.get("data", {}) for c in notebook.cells for o in c.get("outputs", []))
        assert count >= least, f"{name}: {count} outputs of {mime}, expected at least {least}"
    if name == "quickstart.ipynb":
        assert_dashboard_updated_from_its_thread(client.widget_state)
    limit_s = RUN_LIMITS_S.get(name, RUN_LIMIT_S)
    assert elapsed_s < limit_s, f"{name} took {elapsed_s:.0f} s (limit {limit_s:.0f} s)"
    # the kernel and every engine the notebook started are gone
    left = [p for p in psutil.Process().children(recursive=True) if p.pid not in children_before]
    gone, alive = psutil.wait_procs(left, timeout=10)
    assert not alive, f"{name} left processes running: {[p.cmdline() for p in alive]}"


@pytest.mark.parametrize("name", sorted(EXPECTED_TEXT))
def test_committed_notebook_is_what_the_generator_writes(name):
    module = make_notebooks_module()
    on_disk = nbformat.read(NOTEBOOKS / name, as_version=4)
    assert all(not cell.get("outputs") and cell.get("execution_count") is None
               for cell in on_disk.cells if cell.cell_type == "code"), f"{name} was committed with outputs"
    built = module.build(module.NOTEBOOKS[name])
    assert [(c.cell_type, c.source) for c in on_disk.cells] == [(c.cell_type, c.source) for c in built.cells], (
        f"{name} differs from notebooks/make_notebooks.py: run `python notebooks/make_notebooks.py`")
    assert on_disk.metadata["kernelspec"]["name"] == "python3"
