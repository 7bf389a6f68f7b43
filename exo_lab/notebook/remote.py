"""Functions the notebook layer runs inside an engine, shipped with ``view.apply``.

ipyparallel sends them by reference, so each engine imports this module (no ipywidgets or
matplotlib here). They run on the engine's main thread while the stage worker thread may be
serving the data plane: a private KV cache (``stage.new_cache``) keeps them apart from the KV
slots of live requests.
"""
from __future__ import annotations

import socket
import threading
import time

def tensor_stats(tensor) -> dict:
    """Summary numbers of a tensor, computed in float32: shape, mean, std, rms, absmax."""
    values = tensor.detach().float()
    return {"shape": list(values.shape), "mean": float(values.mean()),
            "std": float(values.std()) if values.numel() > 1 else 0.0,
            "rms": float(values.pow(2).mean().sqrt()), "absmax": float(values.abs().max())}


def describe_device(device: str) -> str:
    """A readable name for a torch device string: "CPU", "NVIDIA H200 (cuda:0)", "Apple MPS"."""
    if device.startswith("cuda"):
        import torch

        return f"{torch.cuda.get_device_name(torch.device(device))} ({device})"
    return {"cpu": "CPU", "mps": "Apple MPS"}.get(device, device)


def live_worker():
    """This engine's :class:`exo_lab.engine.StageWorker` (``exo_stage`` in %%px), or None."""
    from ..engine import worker as engine

    return engine.current_worker()


def experiment_forward(inputs, *, layer_stats: bool = True) -> dict:
    """Run this engine's stage once on ``inputs`` (a prefill at position 0) for an experiment.

    ``inputs``: token ids (1, T) on the first stage, else the previous stage's hidden states
    (1, T, hidden). Returns ``output`` (what leaves the stage, on the CPU: hidden states, or on
    the last stage the float32 logits of the last position (1, vocab)), ``output_stats``,
    ``forward_ms`` (including the stats hooks when layer_stats is on), ``layers`` (per decoder
    layer: global index and :func:`tensor_stats` of its output) and the stage's identity.
    Forwards the data plane runs meanwhile (in the worker thread) are not recorded.
    """
    worker = live_worker()
    if worker is None:
        raise RuntimeError("no stage is loaded on this engine; call cluster.load(...) first")
    stage = worker.stage
    # a private KV cache of its own, sized for these inputs: live requests' slots stay untouched
    cache = stage.new_cache(1, int(inputs.shape[1]))
    layers: list[dict] = []
    handles = _layer_stat_hooks(stage, layers) if layer_stats else []
    started = time.perf_counter()
    try:
        output = stage.forward(inputs, [0], [0], cache=cache)
        forward_ms = (time.perf_counter() - started) * 1e3
    finally:
        for handle in handles:
            handle.remove()
    spec = stage.spec
    # clone() outside inference mode: the caller gets an ordinary tensor it can use in autograd.
    return {"stage_index": worker.stage_index, "start_layer": spec.start_layer, "stop_layer": spec.stop_layer,
            "is_last": spec.is_last, "hostname": socket.gethostname(), "device": str(stage.device),
            "output": output.detach().cpu().clone(), "output_stats": tensor_stats(output),
            "forward_ms": forward_ms, "layers": layers}


def _layer_stat_hooks(stage, records: list) -> list:
    """Forward hooks that append each layer's output stats, for this thread's forwards only."""
    caller = threading.get_ident()

    def hook_for(global_index: int):
        def record(module, args, output):
            if threading.get_ident() == caller:   # not the data plane's forwards in the worker thread
                hidden = output[0] if isinstance(output, tuple) else output
                records.append({"layer": global_index, **tensor_stats(hidden)})
        return record

    start = stage.spec.start_layer
    return [layer.register_forward_hook(hook_for(start + i)) for i, layer in enumerate(stage.layers)]
