"""The memory watch: what a serving pipeline may hold and feed as its PCs' free memory changes.

Pure policy (no engine, no clock of its own), in the manner of :mod:`.balance`; the supervisor
feeds it each stage engine's :class:`~exo_lab.control_types.MemoryReport` on every tick and
after a stage refused a step, and carries out what it returns.

A stage's memory is flat while it serves: weights and KV slots are allocated at load. What a PC
can lose is the room beside them: its owner opens a browser with 30 tabs, a build starts, a
container's limit is lowered. Each step needs room of its own (activations, masks, attention
scores), most for a prefill chunk, and every engine checks that room before each step and
refuses the step rather than allocate past its PC's memory (engine/worker.py). Two levers give
a PC room, tried in this order:

- **Smaller prefill chunks.** A long prompt is fed in chunks of ``prefill_chunk`` tokens; the
  step of one chunk needs room roughly in proportion. Halving the chunk (down to MIN_CHUNK)
  costs a little prefill speed and no concurrency, so it goes first. The scheduler takes the
  new size at its next step; nothing pauses.
- **Fewer KV slots.** With ``s`` slots a stage frees ``(slots - s) x kv_slot_bytes`` (the KV
  cache is reallocated smaller, the old one freed first and handed back to the OS). Every
  request goes back to the queue and replays on the smaller cache (identical tokens); queued
  requests wait for a slot. Nothing is lost.

A setting (slots, chunk) is safe when every stage's free memory, plus what the slots given up
free, covers its worst step: a chunk of ``chunk`` tokens (spread over up to ``slots`` rows, as
embeddings are), or ``slots`` decode rows. The watch keeps as many slots as it can, then the
largest chunk; a new setting must leave SHED_HEADROOM x the worst step free, so a PC whose
memory creeps down is not cut one notch at a time.

- **Move away.** When no setting is safe somewhere, the model is planned again on the engines'
  fresh probes (each PC's free memory now plus what its engine holds), which moves layers off
  the PC that shrank; when no plan fits, the model fails with the reason and loads again by
  itself once it fits.
- **Give back.** Once every PC keeps RESTORE_HEADROOM x the worst step free with more (slots,
  chunk), and RESTORE_AFTER_S have passed since the last change, they come back (up to the
  load's own). The margins and the wait keep a PC whose memory hovers at the edge from flapping.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..control_types import MemoryReport
from ..units import format_bytes

MIN_CHUNK = 32             # the smallest prefill chunk the watch sets
SHED_HEADROOM = 1.25       # a new, smaller setting leaves this times its worst step free
RESTORE_AFTER_S = 30.0     # the least time between a change and giving back
RESTORE_HEADROOM = 2.0     # give back only when twice the worst step stays free


@dataclass(frozen=True)
class Setting:
    """What the stages hold and are fed: KV slots, and prefill chunk tokens."""

    slots: int
    chunk: int

    def describe(self, planned: "Setting") -> str:
        text = f"{self.slots} of {planned.slots} KV slots"
        if self.chunk != planned.chunk:
            text += f", prefill chunks of {self.chunk} (not {planned.chunk}) tokens"
        return text


def chunks(planned_chunk: int) -> tuple[int, ...]:
    """The prefill chunks the watch may set, largest first: the load's, halved down to MIN_CHUNK."""
    sizes = [planned_chunk]
    while sizes[-1] // 2 >= MIN_CHUNK:
        sizes.append(sizes[-1] // 2)
    return tuple(sizes)


@dataclass(frozen=True)
class StageMemory:
    """One stage's report, with the node it runs on."""

    node: str
    report: MemoryReport

    def room(self, slots_now: int, setting: Setting) -> int:
        """Free bytes on the PC with ``setting.slots`` slots instead of ``slots_now``."""
        return self.report.free_bytes + (slots_now - setting.slots) * self.report.kv_slot_bytes

    def need(self, setting: Setting) -> int:
        """The most a step takes with ``setting``: a prefill chunk, or the decode rows."""
        report = self.report
        decode = report.decode_bytes[min(setting.slots, len(report.decode_bytes)) - 1]
        prefill = dict(zip(report.prefill_chunks, report.prefill_bytes)).get(setting.chunk, max(report.prefill_bytes))
        return int(max(decode, prefill))

    def spare(self, slots_now: int, setting: Setting, headroom: float = 1.0) -> float:
        return self.room(slots_now, setting) - headroom * self.need(setting)


@dataclass(frozen=True)
class Change:
    """Serve with ``setting`` from now on; ``replan``: plan again on fresh probes (no setting
    is safe on some PC: layers move away from it)."""

    setting: Setting
    reason: str
    replan: bool = False


def candidates(slots: int, planned_chunk: int) -> list[Setting]:
    """Every setting up to ``slots`` slots, most slots first, then the largest chunk."""
    return [Setting(s, c) for s in range(slots, 0, -1) for c in chunks(planned_chunk)]


def below(setting: Setting, now: Setting) -> bool:
    """Whether ``setting`` holds and feeds no more than ``now`` (and is not it)."""
    return setting.slots <= now.slots and setting.chunk <= now.chunk and setting != now


def safe(stages: list[StageMemory], slots_now: int, setting: Setting, headroom: float = 1.0) -> bool:
    return all(stage.spare(slots_now, setting, headroom) >= 0 for stage in stages)


def relaxed(stages: list[StageMemory], now: Setting, steps: float) -> bool:
    """Whether every stage has ``steps`` times its worst step free: far from needing a change."""
    return safe(stages, now.slots, now, steps)


def decide(stages: list[StageMemory], *, now: Setting, planned: Setting, since_change_s: float,
           refused: bool = False) -> Change | None:
    """What to do with ``now`` in force, ``planned`` the load's own setting and
    ``since_change_s`` since the last change (module docstring). ``refused``: a stage refused a
    step, so the pipeline waits and is loaded again whatever this finds, at least one notch down
    (the step needed more than the reports foresee, or the room came and went)."""
    if not stages:
        return None
    if not safe(stages, now.slots, now):
        options = candidates(now.slots, planned.chunk)
        target = (next((s for s in options if below(s, now) and safe(stages, now.slots, s, SHED_HEADROOM)), None)
                  or next((s for s in options if below(s, now) and safe(stages, now.slots, s)), None))
        short = min(stages, key=lambda stage: stage.spare(now.slots, now))
        if target is None:
            return Change(Setting(1, MIN_CHUNK if MIN_CHUNK <= planned.chunk else planned.chunk),
                          f"{short.node} is short of memory even with one KV slot and prefill chunks of "
                          f"{min(MIN_CHUNK, planned.chunk)} tokens ({_room(short, now)}): planning again on the "
                          f"memory the PCs have now", replan=True)
        return Change(target, f"{short.node} is short of memory ({_room(short, now)})")
    if now != planned and since_change_s >= RESTORE_AFTER_S:
        back = next((s for s in candidates(planned.slots, planned.chunk)
                     if s.slots >= now.slots and s.chunk >= now.chunk and s != now
                     and safe(stages, now.slots, s, RESTORE_HEADROOM)), None)
        if back is not None:
            return Change(back, "memory is back on every PC" if back == planned else "more memory is free on every PC")
    if refused:
        lower = next((s for s in candidates(now.slots, planned.chunk) if below(s, now)), None)
        if lower is None:
            return Change(now, "a stage refused a step at the smallest setting", replan=True)
        return Change(lower, "a stage refused a step the reports did not foresee")
    return None


def _room(stage: StageMemory, setting: Setting) -> str:
    limit = f" of its {format_bytes(stage.report.limit_bytes)} limit" if stage.report.limit_bytes else ""
    return (f"{format_bytes(stage.report.free_bytes)} free{limit}, a step with {setting.slots} slot(s) and "
            f"prefill chunks of {setting.chunk} tokens needs {format_bytes(stage.need(setting))}")
