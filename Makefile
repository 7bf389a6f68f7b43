# The two commands a new user runs (see README.md):
#   make demo   set up .venv and run the demo (a local 2-engine cluster, the embedded demo model)
#   make test   set up .venv and run the whole test suite
PYTHON ?= python3
VENV   ?= .venv
# torch first: an explicit version keeps pip from pulling a multi-GB CUDA build where a CPU
# wheel is available locally; a torch already in the venv (CUDA or not) is kept as it is.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo test bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -c "import torch" 2>/dev/null || $(VENV)/bin/python -m pip install --quiet "$(TORCH_SPEC)"
	$(VENV)/bin/python -m pip install --quiet -e ".[test]"
	$(VENV)/bin/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/exo-lab demo

test: setup
	$(VENV)/bin/python -m pytest -q

bench: setup
	$(VENV)/bin/exo-lab bench

clean:
	rm -rf $(VENV) .pytest_cache
