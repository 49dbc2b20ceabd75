"""The per-batch changelog of the monitor's open records: what the table keeps always
restores exactly the live records, and it stays small."""

from __future__ import annotations

import random

import pytest

from streamfuse.monitor.changelog import PREFIX, BatchLog


def run(seed: int, steps: int = 3000) -> tuple[BatchLog, dict]:
    """A KPI engine's pattern: records and labels written, records rewritten when their
    label arrives, whole windows retired; flushed every few writes; the table keeps what
    the log says and drops what it says can go."""
    rng, log, table = random.Random(seed), BatchLog(), {}
    open_records: list[str] = []
    for i in range(steps):
        r = rng.random()
        if r < 0.5:
            key = f"r:{i}"
            log.put(key, {"i": i})
            open_records.append(key)
        elif r < 0.7 and open_records:
            log.put(rng.choice(open_records), {"truth": i})  # the label joined
        elif r < 0.8:
            log.put(f"l:{i}", {"label": i})
            if rng.random() < 0.8:
                log.put(f"l:{i}", None)  # joined in the same batch
        elif r < 0.85 and open_records:
            cut = rng.randrange(len(open_records) + 1)  # a window retired
            for key in open_records[:cut]:
                log.put(key, None)
            del open_records[:cut]
        if rng.random() < 0.1 or i == steps - 1:
            out = log.flush()
            if out is not None:
                key, ops, gone = out
                table[key] = dict(ops)
                for g in gone:
                    table.pop(g)
            assert BatchLog.replay(table.items()) == log.live
    return log, table


@pytest.mark.parametrize("seed", range(6))
def test_the_kept_entries_restore_exactly_the_live_records(seed) -> None:
    log, table = run(seed)
    restored = BatchLog()
    assert restored.restore(table.items()) == [] and restored.live == log.live
    # a restored log goes on as the original would
    for lg in (log, restored):
        lg.put("r:new", 1)
    assert log.flush()[0] == restored.flush()[0]


def test_retired_windows_leave_the_table() -> None:
    log, table = BatchLog(), {}
    for window in range(50):
        for i in range(40):
            log.put(f"r:{window}:{i}", {"w": window})
        if window >= 3:  # three windows retained, as the KPI engine does
            for i in range(40):
                log.put(f"r:{window - 3}:{i}", None)
        key, ops, gone = log.flush()
        table[key] = ops
        for g in gone:
            table.pop(g)
    assert len(log.live) == 120 and len(table) <= 4, sorted(table)
    assert BatchLog.replay(table.items()) == log.live


def test_a_restore_drops_what_a_crash_left_behind() -> None:
    log, table = BatchLog(), {}
    log.put("r:a", 1)
    table.update([log.flush()[:2]])
    log.put("r:a", 2)
    key, ops, gone = log.flush()
    table[key] = ops  # killed before the tombstone of b:1 was written
    assert gone == [f"{PREFIX}1"]
    restored = BatchLog()
    assert restored.restore(table.items()) == [f"{PREFIX}1"] and restored.live == {"r:a": 2}
    assert restored.flush() is None and restored.pending == 0
