"""Re-balancing while serving: how much slower (or faster) each stage's PC runs now than when
the plan in force began, from the stage times the pipeline reports. Pure: no engines, no torch.

Each decode step comes back with every stage's forward time. The first ``BASELINE_STEPS`` steps
of each batch size after a load are that size's baseline; a stage whose median time over the
last steps is ``x`` times its baseline runs ``x`` times slower than when the plan began. The
baseline, not the plan's figure, is the reference: the plan predicts one stream, and a stage
holding the head (its logits and sampling grow with the rows) slows more with more rows than a
stage of layers only, which is no reason to move anything. Steps of one batch size are only
compared with steps of that size.

Contexts growing, or a busier coordinator, slow every stage alike: only the ratios *between*
stages say that one PC got busier, so the least slowed stage is taken as running as fast as
when measured. With ``f`` the slowdown each stage's node was planned with (1 at first), a
stage's slowdown now is ``g = f x`` (its time / its baseline), and its new factor
``g / min(g)``; ``exo_lab.planning.planner.slowed`` plans a node with it. A PC that gets freer
comes back the same way: its stage runs faster than its baseline, its ``g`` falls, and the plan
moves layers back.

The supervisor acts only ``REBALANCE_INTERVAL_S`` after the pipeline loaded, on a drift of more
than ``REBALANCE_DRIFT`` that two checks in a row see alike (``REBALANCE_STEADY``), and moves
layers only when the planner's gain clears the re-plan margin (``pipeline.is_better``):
hysteresis, a minimum interval, no flapping on noise.
"""
from __future__ import annotations

import collections
import statistics
from collections.abc import Mapping, Sequence

BASELINE_STEPS = 24           # decode steps of one batch size that make its baseline
STAGE_CLOCK_STEPS = 48        # the median over the last this many steps of that size
REBALANCE_INTERVAL_S = 10.0   # since the pipeline loaded (or last moved) before it may move
REBALANCE_DRIFT = 0.25        # a stage's factor must change by this much to re-plan at all
REBALANCE_STEADY = 0.10       # ... and be within this much of the one seen at the check before


class StageClock:
    """Each stage's forward time over the last decode steps, per batch size, against that
    size's baseline (module docstring). The scheduler records on its loop; the supervisor reads
    through the loop."""

    def __init__(self, steps: int = STAGE_CLOCK_STEPS, baseline_steps: int = BASELINE_STEPS):
        self.steps, self.baseline_steps = steps, baseline_steps
        self._baseline: dict[int, list[tuple[float, ...]]] = {}
        self._recent: dict[int, collections.deque[tuple[float, ...]]] = {}
        self._last: dict[int, int] = {}              # rows -> the number of its newest step
        self._count = 0

    def record(self, stage_ms: Sequence[float], rows: int) -> None:
        """One decode step of ``rows`` rows and its stages' forward ms."""
        if not stage_ms:
            return
        step = tuple(float(ms) for ms in stage_ms)
        baseline = self._baseline.setdefault(rows, [])
        if len(baseline) < self.baseline_steps:
            baseline.append(step)
        else:
            self._recent.setdefault(rows, collections.deque(maxlen=self.steps)).append(step)
            self._count += 1
            self._last[rows] = self._count

    def reset(self) -> None:
        """A new pipeline: its stages are others."""
        self._baseline.clear()
        self._recent.clear()
        self._last.clear()

    def ratios(self) -> tuple[float, ...] | None:
        """Each stage's median time over the last steps of a batch size, over its baseline: the
        size seen most recently among those with a baseline and as many steps after it; None
        while there is none."""
        ready = [rows for rows, steps in self._recent.items() if len(steps) >= self.baseline_steps]
        if not ready:
            return None
        rows = max(ready, key=self._last.__getitem__)
        recent = self._recent[rows]
        base, now = _medians(self._baseline[rows]), _medians(recent)
        if base is None or now is None or len(base) != len(now) or min(base) <= 0:
            return None
        return tuple(n / b for n, b in zip(now, base))


def _medians(steps) -> tuple[float, ...] | None:
    if len({len(step) for step in steps}) != 1:
        return None
    return tuple(statistics.median(column) for column in zip(*steps))


def slowdowns(nodes: Sequence[str], ratios: Sequence[float],
              planned_factors: Mapping[str, float]) -> dict[str, float] | None:
    """Each stage node's slowdown now against its measured speed, the least slowed at 1
    (module docstring); ``ratios``: each stage's time over its baseline. None when a ratio is
    missing or not positive."""
    if not nodes or len(ratios) != len(nodes) or any(ratio <= 0 for ratio in ratios):
        return None
    now = {node: planned_factors.get(node, 1.0) * ratio for node, ratio in zip(nodes, ratios)}
    least = min(now.values())
    return {node: value / least for node, value in now.items()}


def steady(factors: Mapping[str, float], before: Mapping[str, float] | None,
           tolerance: float = REBALANCE_STEADY) -> bool:
    """Whether ``factors`` are what the check before saw (within ``tolerance``): a PC that just
    got busy shows part of its slowdown at first, and a plan for that part would stay wrong (the
    next baseline takes the new speeds as they are)."""
    return before is not None and set(before) == set(factors) and all(
        abs(value / before[node] - 1.0) <= tolerance for node, value in factors.items())


def drifted(factors: Mapping[str, float], planned_factors: Mapping[str, float],
            drift: float = REBALANCE_DRIFT) -> bool:
    """Whether any stage's factor moved by more than ``drift`` from the one it was planned with."""
    return any(abs(value / planned_factors.get(node, 1.0) - 1.0) > drift for node, value in factors.items())
