"""The monitor's open KPI records, changelogged per batch of events instead of per record.

The KPI engine writes one entry per open record and per waiting label through its sink
(``put(key, value | None)``); a faust table turned each write into its own changelog
record, about 1.8 per event. :class:`BatchLog` gathers a batch's writes into one entry
``seq -> {key: value | None}`` (the table holds ``b:<seq>``), and says which older
entries no longer matter, so that the table holds what a restore needs and little more:
applying the entries it keeps, in ``seq`` order, gives exactly the live records.

An entry can go once every write in it is *shadowed* (the same key was written again in
a later entry, which stays as long as it matters itself) or is a deletion that no kept
entry needs any more (no earlier kept entry writes that key). Records of a window are
written within seconds of each other and retired together, so whole entries fall due at
once.

Pure logic: plain values in and out; the faust adapter (:mod:`streamfuse.monitor.app`)
writes and deletes the table entries it names.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

PREFIX = "b:"  # table key of a batch entry: b:<seq>


class BatchLog:
    """Batches of sink writes and the entries that still matter.

    Examples:
        >>> log = BatchLog()
        >>> log.put("r:a", 1); log.put("l:b", 2)
        >>> log.flush()                      # one table entry for the two writes
        ('b:1', {'r:a': 1, 'l:b': 2}, [])
        >>> log.put("l:b", None); log.put("r:a", 3)
        >>> log.flush()                      # every write of b:1 is shadowed: it can go
        ('b:2', {'l:b': None, 'r:a': 3}, ['b:1'])
        >>> log.put("r:a", None)
        >>> log.flush()                      # nothing left to restore: both can go
        ('b:3', {'r:a': None}, ['b:2', 'b:3'])
        >>> BatchLog.replay([]), log.live
        ({}, {})
    """

    def __init__(self) -> None:
        self.seq = 0
        self.live: dict[str, Any] = {}  # what a restore gives: key -> value
        self._pending: dict[str, Any] = {}
        self._keys: dict[int, list[str]] = {}  # kept entry -> its keys
        self._holders: dict[str, set[int]] = {}  # key -> kept entries writing it
        self._latest: dict[str, int] = {}  # key -> entry of its latest write
        self._needed: dict[int, int] = {}  # kept entry -> writes in it that still matter
        self._counted: set[tuple[int, str]] = set()  # (entry, key) of the writes that still matter

    def put(self, key: str, value: Any) -> None:
        """A sink write: ``value`` None deletes ``key``."""
        self._pending[key] = value
        if value is None:
            self.live.pop(key, None)
        else:
            self.live[key] = value

    @property
    def pending(self) -> int:
        """Writes since the last :meth:`flush`."""
        return len(self._pending)

    def flush(self) -> tuple[str, dict[str, Any], list[str]] | None:
        """The batch's table entry ``(key, writes)`` and the entries that can go now
        (possibly this one); None when nothing was written since the last flush."""
        if not self._pending:
            return None
        self.seq += 1
        ops, self._pending = self._pending, {}
        gone = self._add(self.seq, ops)
        return f"{PREFIX}{self.seq}", ops, gone

    def _add(self, seq: int, ops: Mapping[str, Any]) -> list[str]:
        self._keys[seq], self._needed[seq] = list(ops), 0
        due: list[int] = []
        for key, value in ops.items():
            before = self._latest.get(key)
            if before is not None:
                self._release(before, key, due)  # shadowed by this write
            holders = self._holders.setdefault(key, set())
            if value is not None or holders:  # a deletion matters while an older entry writes the key
                self._needed[seq] += 1
                self._counted.add((seq, key))
            holders.add(seq)
            self._latest[key] = seq
        if not self._needed[seq]:
            due.append(seq)
        return self._drop(due)

    def _release(self, seq: int, key: str, due: list[int]) -> None:
        """The write of ``key`` in entry ``seq`` no longer matters."""
        if (seq, key) in self._counted:
            self._counted.discard((seq, key))
            self._needed[seq] -= 1
            if not self._needed[seq]:
                due.append(seq)

    def _drop(self, due: list[int]) -> list[str]:
        gone = []
        while due:
            seq = due.pop()
            if seq not in self._keys:
                continue
            gone.append(f"{PREFIX}{seq}")
            del self._needed[seq]
            for key in self._keys.pop(seq):
                self._counted.discard((seq, key))
                holders = self._holders[key]
                holders.discard(seq)
                if not holders:
                    del self._holders[key], self._latest[key]
                elif len(holders) == 1 and key not in self.live:  # the latest write deletes what nothing holds now
                    self._release(self._latest[key], key, due)
        return sorted(gone, key=lambda k: int(k[len(PREFIX):]))

    @classmethod
    def replay(cls, entries: Iterable[tuple[str, Any]]) -> dict[str, Any]:
        """The live records from the kept table entries (any order)."""
        log = cls()
        log.restore(entries)
        return log.live

    def restore(self, entries: Iterable[tuple[str, Any]]) -> list[str]:
        """Rebuild from the table's batch entries (other keys ignored); returns the entries
        that can go (a crash can leave some behind)."""
        batches = sorted((int(k[len(PREFIX):]), v) for k, v in entries if k.startswith(PREFIX))
        gone: list[str] = []
        for seq, ops in batches:
            for key, value in ops.items():
                self.put(key, value)
            self._pending = {}
            gone += self._add(seq, ops)
            self.seq = seq
        return gone
