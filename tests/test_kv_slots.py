"""Slot choice of the prompt cache (pure Python): reuse first, then empty slots by lowest
seq_id, then the least recently used cache."""
from __future__ import annotations

from selar_local.kv_slots import SlotTable


def _take(table: SlotTable, seq_id: int, tokens: list[int]) -> None:
    slot = table.slots[seq_id]
    table.take(slot)
    slot.tokens[:] = tokens


def test_the_longest_reusable_prefix_wins():
    table = SlotTable(3)
    _take(table, 2, [5, 6, 7])
    table.release(table.slots[2], keep_cache=True)
    assert table.plan([5, 6, 7, 8]).slot.seq_id == 2


def test_on_a_tie_the_lowest_empty_slot_then_the_least_recently_used_cache():
    table = SlotTable(4)
    for seq_id, tokens in ((3, [1]), (1, [2]), (0, [3]), (2, [4])):
        _take(table, seq_id, tokens)
    for seq_id in (2, 1, 0, 3):
        table.release(table.slots[seq_id], keep_cache=True)
    table.slots[2].forget(0), table.slots[0].forget(0)  # 0 and 2 empty; 3 used before 1
    assert table.plan([9]).slot.seq_id == 0
    table.take(table.slots[0])
    assert table.plan([9]).slot.seq_id == 2
    table.take(table.slots[2])
    assert table.plan([9]).slot.seq_id == 3  # both hold a cache: the least recently used goes
    table.take(table.slots[3])
    assert table.plan([9]).slot.seq_id == 1


def test_without_the_cache_freed_slots_are_refilled_lowest_first():
    table = SlotTable(4, enabled=False)
    for seq_id in range(4):
        _take(table, seq_id, [seq_id])
    table.release(table.slots[3], keep_cache=False)
    table.release(table.slots[1], keep_cache=False)
    assert table.plan([7]).slot.seq_id == 1
