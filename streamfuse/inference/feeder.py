"""The worker's intake: Kafka → decoded micro-batches, on its own thread.

While the models run on one batch, the feeder polls, decodes and checks the next one, so
that Kafka and msgpack overlap with compute. The consumer is librdkafka's
(confluent-kafka): fetching and parsing run in its C threads, which never hold Python's
GIL — with kafka-python's pure-Python I/O threads beside the models, the worker ran at a
third of this speed, each thread waiting for the GIL behind the others. The feeder's
thread owns the consumer, so offsets are committed here too, when the worker hands back
a batch whose outputs the broker has acknowledged (:meth:`Feeder.commit`): at-least-once.

Batching follows Triton's two knobs: a batch is handed over when it holds ``max_batch``
samples, or ``max_delay_ms`` after its first sample arrived. While the worker is still
busy with the previous batch, the ready batch keeps growing up to ``max_batch`` instead of
waiting idle — under load batches fill up, at low load the delay bounds latency.

*Stream batches* (``stream_batches``, used by replays) are cut by the records alone:
each partition's records in offset order, up to ``max_batch`` of them, ending early after
a record whose headers carry :data:`BATCH_END` (the replay marks the last sample it
publishes to each partition before it waits). A model's output for a row depends on the
batch it ran in (float sums in another order at another batch size), so batches that
depend on arrival times would make replays differ in the last digits; batches that
depend only on the records make the same recording give the same outputs bit for bit.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from typing import NamedTuple

from confluent_kafka import KafkaException, TopicPartition

from streamfuse.errors import InvalidEvent
from streamfuse.events import (
    BATCH_END,
    Sample,
    content_type_of,
    decode,
)
from streamfuse.readings import split_bad_readings

log = logging.getLogger(__name__)
IDLE_POLL_MS = 50  # an idle feeder comes back this often to commit and to check for stop
GROW_POLL_MS = 5  # a due batch waiting for the worker polls this long between offers
OFFER_S = 0.02  # a full batch is offered this long at a time (commits are done in between)
REVOKE_WAIT_S = 10.0  # on a rebalance, wait this long for the worker's batches to be committed


class Record(NamedTuple):
    """A consumed record (the fields of kafka-python's ``ConsumerRecord`` the worker uses)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]] | None

    @classmethod
    def of(cls, msg) -> Record:
        """From a confluent-kafka ``Message``."""
        return cls(msg.topic(), msg.partition(), msg.offset(), msg.key(), msg.value(), msg.headers())


Offsets = dict[tuple[str, int], int]  # (topic, partition) -> next offset to read


def decode_record(msg: Record, expect: type, max_bytes: int):
    """:func:`~streamfuse.events.decode` of a record's value; a failure the decoder did
    not foresee is an ``undecodable`` :class:`InvalidEvent` too, so that no record, however
    malformed, can stop a consumer (it goes to the dead-letter topic instead).

    Raises:
        InvalidEvent: the record is not a valid ``expect``.

    Examples:
        >>> decode_record(Record("t", 0, 0, None, b"\\x91\\x01", None), Sample, 1000)
        Traceback (most recent call last):
        ...
        streamfuse.errors.InvalidEvent: undecodable: expected a map, got list
    """
    try:
        return decode(msg.value, content_type_of(msg.headers), expect=expect, max_bytes=max_bytes)
    except InvalidEvent:
        raise
    except Exception as exc:
        raise InvalidEvent("undecodable", f"the decoder failed on it: {type(exc).__name__}: {exc}") from None


class Batch(NamedTuple):
    """One micro-batch, decoded.

    Attributes:
        samples: ``(record, sample)`` for each sample that decoded; readings that failed
            their header checks are already removed (and listed in ``dead``).
        dead: ``(record, error)`` for each record or reading to dead-letter.
        first_at: ``time.monotonic()`` when the batch's first record arrived.
        offsets: per partition, the offset to commit once this batch's outputs are out.
    """

    samples: list[tuple[Record, Sample]]
    dead: list[tuple[Record, InvalidEvent]]
    first_at: float
    offsets: Offsets


class Feeder:
    """Args:
        consumer: a confluent-kafka consumer in a group; the feeder's thread subscribes it
            to ``topic`` on :meth:`start`, owns it from then on, and closes it.
        topic: the samples topic.
        max_batch: at most this many records per batch.
        max_delay_ms: hand a batch over at most this long after its first record.
        max_payload_bytes: the readings' size limit.
        stream_batches: cut batches where the stream says, never by the clock (replays).
    """

    def __init__(self, consumer, topic: str, max_batch: int, max_delay_ms: int, max_payload_bytes: int,
                 stream_batches: bool = False) -> None:
        self.consumer = consumer
        self.topic = topic
        self.stream_batches = stream_batches
        self._handed = self._returned = 0  # batches given to the worker / handed back to commit
        self._generation = 0  # + 1 per revocation
        self._open: dict[tuple[str, int], Batch] = {}  # stream batches being filled, per partition
        self._cut: deque[Batch] = deque()  # stream batches complete, in order
        self.max_batch = max_batch
        self.max_delay_s = max_delay_ms / 1000
        self.max_payload_bytes = max_payload_bytes
        self._ready: queue.Queue[Batch] = queue.Queue(maxsize=1)
        self._commits: queue.SimpleQueue[Offsets] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="sf-feeder", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def get(self, timeout_s: float) -> Batch | None:
        """The next batch, or None after ``timeout_s``; re-raises the feeder's failure."""
        try:
            return self._ready.get(timeout=timeout_s)
        except queue.Empty:
            if self._error is not None:
                raise self._error
            if not self._thread.is_alive() and not self._stop.is_set():
                raise RuntimeError("the feeder thread stopped")
            return None

    def commit(self, offsets: Offsets) -> None:
        """Commit ``offsets`` (from :attr:`Batch.offsets`) on the feeder's thread, soon."""
        self._commits.put(offsets)

    def close(self) -> None:
        """Commit what was handed back, close the consumer and stop. Batches polled but
        not yet processed are not committed: whoever owns their partitions next re-reads them."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
        elif self._thread.ident is None:  # never started
            self.consumer.close()

    # ------------------------------------------------------------------ the thread

    def _run(self) -> None:
        try:
            self.consumer.subscribe([self.topic], on_revoke=self._on_revoke)
            pending: Batch | None = None
            while not self._stop.is_set():
                self._do_commits()
                if self.stream_batches:
                    self._read_stream()
                    self._offer_cut()
                    continue
                pending = self._fill(pending)
                if pending is not None and self._handed_over(pending):
                    pending = None
        except BaseException as exc:  # surfaces in get()
            self._error = exc
            log.exception("feeder failed")
        finally:
            try:
                self._do_commits()
            finally:
                self.consumer.close()

    def _fill(self, batch: Batch | None) -> Batch | None:
        """Poll once into ``batch``, or start one: a new batch starts with the first record
        to arrive (waiting up to :data:`IDLE_POLL_MS`) plus whatever is already fetched; an
        open one waits for more until it is full or its delay has passed."""
        gen = self._generation
        if batch is None:
            records = self._poll(self.max_batch)
        else:
            room = self.max_batch - len(batch.samples) - len(batch.dead)
            if room <= 0:
                return batch
            left = self.max_delay_s - (time.monotonic() - batch.first_at)
            # past due: the worker is busy with the previous batch; grow this one meanwhile
            records = self._consume(room, left if left > 0 else GROW_POLL_MS / 1000)
        if self._generation != gen:
            batch = None  # its partitions were revoked while polling: their next owner reads them
        if not records:
            return batch
        if batch is None:
            batch = Batch([], [], time.monotonic(), {})
        for msg in records:
            self._add(batch, msg)
        return batch

    def _read_stream(self) -> None:
        """Stream batches: each partition's records in offset order, cut after
        ``max_batch`` records or after a record with the :data:`BATCH_END` header."""
        for msg in self._poll(self.max_batch):
            tp = (msg.topic, msg.partition)
            batch = self._open.get(tp)
            if batch is None:
                batch = self._open[tp] = Batch([], [], time.monotonic(), {})
            self._add(batch, msg)
            marked = any(k == BATCH_END for k, _ in msg.headers or ())
            if marked or len(batch.samples) + len(batch.dead) >= self.max_batch:
                self._cut.append(self._open.pop(tp))

    def _offer_cut(self) -> None:
        while self._cut:
            try:
                self._ready.put(self._cut[0], timeout=OFFER_S)
            except queue.Full:
                return
            self._cut.popleft()
            self._handed += 1

    def _on_revoke(self, consumer, partitions) -> None:
        """A rebalance takes partitions away (librdkafka calls this inside poll, on this
        thread). Batches the worker has not started are dropped — the partitions' next
        owner reads them from the last commit — and the ones it has are waited for and
        committed first, so that no record is predicted twice by the same group unless a
        worker dies."""
        self._generation += 1
        self._open.clear()
        self._cut.clear()
        try:
            while True:
                self._ready.get_nowait()
                self._handed -= 1
        except queue.Empty:
            pass
        deadline = time.monotonic() + REVOKE_WAIT_S
        while self._returned < self._handed and time.monotonic() < deadline and not self._stop.is_set():
            self._do_commits()
            time.sleep(0.005)
        self._do_commits()

    def _poll(self, n: int) -> list[Record]:
        """The first record to arrive (waiting up to :data:`IDLE_POLL_MS`) and up to
        ``n - 1`` more that are already fetched."""
        first = self._records([m for m in [self.consumer.poll(IDLE_POLL_MS / 1000)] if m is not None])
        if not first:
            return []
        return first + self._consume(n - 1, 0)

    def _consume(self, n: int, timeout_s: float) -> list[Record]:
        """Up to ``n`` records, waiting at most ``timeout_s`` for them."""
        return self._records(self.consumer.consume(num_messages=n, timeout=timeout_s)) if n > 0 else []

    @staticmethod
    def _records(msgs) -> list[Record]:
        out = []
        for msg in msgs:
            err = msg.error()
            if err is None:
                out.append(Record.of(msg))
            elif err.fatal():
                raise KafkaException(err)
            else:  # transient (the client retries); nothing was consumed
                log.warning("consumer: %s", err)
        return out

    def _add(self, batch: Batch, msg: Record) -> None:
        """Decode and check one record into ``batch``."""
        tp = (msg.topic, msg.partition)
        batch.offsets[tp] = max(batch.offsets.get(tp, 0), msg.offset + 1)
        try:
            sample = decode_record(msg, Sample, self.max_payload_bytes)
            # Image bodies are decoded once, in the batch; a body that fails there is set aside then.
            sample, errors = split_bad_readings(sample, self.max_payload_bytes, decode=False)
        except InvalidEvent as exc:
            batch.dead.append((msg, exc))
            return
        except Exception as exc:  # a poison record must never stop the consumer
            batch.dead.append((msg, InvalidEvent("bad_field", f"the checks failed on it: {type(exc).__name__}: {exc}")))
            return
        batch.dead.extend((msg, exc) for exc in errors)
        batch.samples.append((msg, sample))

    def _handed_over(self, batch: Batch) -> bool:
        full = len(batch.samples) + len(batch.dead) >= self.max_batch
        due = time.monotonic() - batch.first_at >= self.max_delay_s
        if not (full or due):
            return False
        try:
            # A due batch that is not full waits for the worker by growing, not idly.
            self._ready.put(batch, timeout=OFFER_S if full else 0.0005)
        except queue.Full:
            return False
        self._handed += 1
        return True

    def _do_commits(self) -> None:
        offsets: Offsets = {}
        while True:
            try:
                handed = self._commits.get_nowait()
            except queue.Empty:
                break
            self._returned += 1
            for tp, off in handed.items():
                offsets[tp] = max(offsets.get(tp, 0), off)
        if not offsets:
            return
        try:
            self.consumer.commit(offsets=[TopicPartition(t, p, off) for (t, p), off in offsets.items()],
                                 asynchronous=False)
        except KafkaException as exc:
            # The group rebalanced: these partitions' new owner re-reads the records since
            # their last commit (duplicates downstream, made harmless by sample_id).
            log.warning("offsets not committed after a rebalance (%s); the new owner re-processes them", exc)
