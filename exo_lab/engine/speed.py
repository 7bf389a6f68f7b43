"""Inside an engine: how fast this PC decodes a given model, measured rather than assumed.

The planner's speed figure of a stage is the bytes it reads per token over a bandwidth. A PC's
memory bandwidth alone predicts badly: decode's products on a model's own small matrices run
well below a streaming copy, and each layer adds fixed costs (norms, attention, rotary, Python)
that no bandwidth sees. Measured on this 2-core dev machine, float32: a 16384 x 4096 product at
22 GB/s, SmolLM2's 576-wide matrices at 11-16 GB/s, and SmolLM2 over its 30 layers and head at
10 GB/s all told; the planner's default of 20 GB/s predicted 26.9 ms a token against 54-59
measured, these measured figures 52-64 against 58-59 (benchmarks/bench_prediction.py).

So each CPU engine times the real thing once per (model shape, dtype, threads): a scratch stage
of the model's last layers and its head (the code a stage runs: transformers' classes, the lean
layers, int8 or packed kernels by dtype), its weights constant (the time does not depend on
the values), its layers reading at least 4x the last-level cache per step (and 128 MB) so every
step streams from memory as decode does, at most :data:`SCRATCH_MAX_BYTES` with the head (past
that the model's layers are large enough that bandwidth is what counts, and the configured or
default figure is kept). Two warm-up steps, then the median of :data:`TIMED_STEPS` whole steps
and of the final norm + head alone; a layer's time is the rest over the layers. The planner
then times a stage as its layers x the time of a layer, plus the head's time on the last stage
(``NodeSpec.measured_ms``).
"""
from __future__ import annotations

import json
import logging
import math
import statistics
import time
from pathlib import Path

logger = logging.getLogger(__name__)

SCRATCH_MIN_BYTES = 128 * 2**20
SCRATCH_MAX_BYTES = 1024 * 2**20
TIMED_STEPS = 6
DEFAULT_CACHE_BYTES = 32 * 2**20


def last_level_cache_bytes() -> int:
    """The largest CPU cache this PC reports (Linux sysfs), else DEFAULT_CACHE_BYTES."""
    sizes, units = [], {"K": 2**10, "M": 2**20, "G": 2**30}
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = path.read_text().strip().upper()
        try:
            sizes.append(int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text))
        except (ValueError, IndexError):
            continue
    return max(sizes, default=DEFAULT_CACHE_BYTES)


def measure_decode(config: dict, dtype: str) -> dict | None:
    """{"layer_seconds", "head_seconds"}: one decode step's time per decoder layer and for the
    final norm + head of ``config``'s model (a dict of config.json) at ``dtype`` on this
    engine's torch threads, measured on a scratch stage (module docstring); None when it would
    read more than SCRATCH_MAX_BYTES, or the model has a single layer. Measured on the engine's
    one torch thread (exo_lab.engine.worker.torch_thread): a second thread entering OpenMP would
    leave libgomp two thread pools, and it then parks their workers between every parallel region
    (measured: SmolLM2's 4-bit decode step 14.3 ms before, 18.5 ms in every later step).
    A stage serving on that thread holds it: then a figure measured before is returned, or None.
    """
    import torch

    from .worker import current_worker, torch_thread

    key = (json.dumps(config, sort_keys=True), dtype, torch.get_num_threads())
    if key not in _MEASURED and current_worker() is None:
        _MEASURED[key] = torch_thread().submit(_measure, *key).result()
    return _MEASURED.get(key)


_MEASURED: dict[tuple, dict | None] = {}


def _measure(config_json: str, dtype: str, threads: int) -> dict | None:
    from ..model.profile import profile_from_config

    started = time.perf_counter()
    config = json.loads(config_json)
    if dtype == "gguf":     # a GGUF file's blocks run the int4 kernels (Q8_0/Q6_K matrices: the q8 ones)
        dtype = "int4"
    profile = profile_from_config(config, dtype=dtype)
    num_layers, per_layer = profile.num_layers, profile.layer_bytes
    head = profile.final_norm_bytes + profile.lm_head_bytes
    target = max(4 * last_level_cache_bytes(), SCRATCH_MIN_BYTES)
    layers = min(num_layers - 1, max(1, math.ceil(target / per_layer)))   # a first stage would take token ids
    if num_layers < 2 or layers * per_layer + head > SCRATCH_MAX_BYTES:
        return None
    step_seconds, head_seconds = _step_seconds(config, dtype, num_layers - layers, num_layers)
    layer_seconds = max(step_seconds - head_seconds, 0.0) / layers
    logger.info("decode speed of %s at %s on %d thread(s): %.3f ms a layer, %.3f ms the head (measured in "
                "%.1f s)", config.get("model_type"), dtype, threads, layer_seconds * 1000, head_seconds * 1000,
                time.perf_counter() - started)
    return {"layer_seconds": layer_seconds, "head_seconds": head_seconds}


def _step_seconds(config: dict, dtype: str, start: int, stop: int) -> tuple[float, float]:
    """(the median decode step, the median of its final norm + head alone) of a scratch last
    stage of layers [start, stop), constant weights."""
    import torch
    from transformers import AutoConfig

    from ..control_types import ShardSpec
    from ..model.shard import Stage
    from ..weights.checkpoint import make_ready

    fields = {key: value for key, value in config.items() if key != "model_type"}
    hf_config = AutoConfig.for_model(config["model_type"], **fields)
    spec = ShardSpec(model_dir="scratch", start_layer=start, stop_layer=stop, num_layers=config["num_hidden_layers"],
                     dtype=dtype, max_context=TIMED_STEPS + 4, max_batch=1)
    stage = Stage(spec, hf_config)
    stage.load_weights({name: torch.full(tensor.shape, 0.01, dtype=tensor.dtype)
                        for name, tensor in stage.state_dict().items()})
    make_ready(stage)
    hidden = torch.full((1, 1, hf_config.hidden_size), 0.01, dtype=stage.dtype)
    steps, heads = [], []
    for position in range(TIMED_STEPS + 2):
        begun = time.perf_counter()
        stage(hidden, [0], [position])
        middle = time.perf_counter()
        with torch.inference_mode():
            stage.head(stage.norm(hidden[:, -1, :]))
        steps.append(middle - begun)
        heads.append(time.perf_counter() - middle)
    return statistics.median(steps[2:]), statistics.median(heads[2:])
