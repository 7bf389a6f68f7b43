"""The memory watch's policy (coordinator/memory.py), pure: what a PC's room lets the stages hold
(KV slots) and feed (prefill chunks)."""
from __future__ import annotations

from exo_lab.control_types import MemoryReport
from exo_lab.coordinator import memory
from exo_lab.coordinator.memory import Setting

MiB = 2**20
PLANNED = Setting(4, 256)
PREFILL = {256: 90, 128: 70, 64: 55, 32: 50}


def stage(free_mib: float, *, slots: int = 4, kv_slot_mib: int = 100, node: str = "b", prefill=PREFILL):
    return memory.StageMemory(node, MemoryReport(
        free_bytes=int(free_mib * MiB), limit_bytes=0, slots=slots, kv_slot_bytes=kv_slot_mib * MiB,
        decode_bytes=tuple((20 + 10 * s) * MiB for s in range(1, 5)), prefill_chunks=tuple(prefill),
        prefill_bytes=tuple(m * MiB for m in prefill.values())))


def decide(stages, now=PLANNED, since=0.0, refused=False):
    return memory.decide(stages, now=now, planned=PLANNED, since_change_s=since, refused=refused)


def test_the_chunks_the_watch_may_set_halve_down_to_the_floor():
    assert memory.chunks(256) == (256, 128, 64, 32) and memory.chunks(48) == (48,) and memory.chunks(20) == (20,)


def test_room_for_the_worst_step_needs_no_change():
    assert decide([stage(90)]) is None                   # exactly a 256-token chunk's step
    assert decide([stage(500), stage(90, node="c")]) is None


def test_a_pc_a_little_short_gets_smaller_chunks_before_any_slot_is_shed():
    change = decide([stage(89)])           # with 1.25 x headroom a 128-token chunk needs 87.5
    assert change.setting == Setting(4, 128) and not change.replan and "b is short of memory" in change.reason
    assert decide([stage(80)]).setting == Setting(4, 64)              # 68.75


def test_a_pc_shorter_sheds_slots_keeping_the_largest_chunk_that_then_fits():
    assert decide([stage(20)]).setting == Setting(3, 256)             # 120 >= 1.25 x 90
    small = stage(0, kv_slot_mib=30)      # each slot given up frees 30
    assert decide([small]).setting == Setting(1, 128)     # 2 slots free 60 < 1.25 x 50; 1 frees 90 >= 87.5
    assert decide([stage(500), small]).setting == Setting(1, 128)     # every stage must fit
    # no setting with headroom: the first one that fits at all (1 slot frees 51: 32 tokens need 50)
    assert decide([stage(0, kv_slot_mib=17)]).setting == Setting(1, 32)


def test_no_safe_setting_plans_again_on_fresh_probes():
    change = decide([stage(0, kv_slot_mib=10)])          # 30 MiB with one slot: a step needs 50
    assert change.replan and change.setting == Setting(1, 32) and "even with one KV slot" in change.reason


def test_giving_back_waits_and_needs_twice_the_worst_step():
    now = Setting(3, 256)
    assert decide([stage(500, slots=3)], now=now, since=memory.RESTORE_AFTER_S - 1) is None
    assert decide([stage(279, slots=3)], now=now, since=memory.RESTORE_AFTER_S) is None   # 179 < 2 x 90
    back = decide([stage(280, slots=3)], now=now, since=memory.RESTORE_AFTER_S)
    assert back.setting == PLANNED and back.reason == "memory is back on every PC"
    # chunks come back too, never past the load's own
    assert decide([stage(500)], now=Setting(4, 64), since=memory.RESTORE_AFTER_S).setting == PLANNED


def test_a_refused_step_always_goes_one_notch_down():
    assert decide([stage(500)], refused=True).setting == Setting(4, 128)
    assert decide([stage(500)], now=Setting(4, 32), refused=True).setting == Setting(3, 32)
    last = decide([stage(500)], now=Setting(1, 32), refused=True)
    assert last.replan and last.setting == Setting(1, 32)
    assert decide([], refused=True) is None and decide([]) is None
