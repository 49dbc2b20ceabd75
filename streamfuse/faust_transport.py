"""faust's aiokafka transport with the broker profile's fetch wait and a producer flush
that drains faust's buffer.

faust hard-codes ``fetch_max_wait_ms=1500`` for its consumer. Tansu answers a waiting
fetch only when the wait is over, so every record would reach the monitor up to 1.5 s
late. :func:`streamfuse.kafka.faust_config` names this transport for such a profile by
the URL scheme ``sfkafka<ms>`` (e.g. ``sfkafka20://127.0.0.1:9092``); the scheme carries
the wait, the rest is faust's own transport.

faust finds a transport by URL scheme in a process-wide registry
(``faust.transport.drivers.TRANSPORTS``). Rather than add our schemes to it, :func:`install`
hands the transport to the app through faust's public ``App.transport`` and
``App.producer_transport`` setters: building an app changes nothing outside it.

``before_commit``: a function the consumer calls each time, before it commits offsets
(periodically, at a rebalance, at stop: every path goes through ``force_commit``), on
either profile. faust flushes its producer between the two (with this module's producer,
for real), so whatever the function hands to the producer (a table's changelog entries)
is acknowledged before any offset it goes with is committed.

The producer, on every profile: faust flushes its producer before it commits the
consumer's offsets, so that a table's changelog entries are written before the offsets of
the events that made them. faust's own flush can return with entries still in its buffer
(see :meth:`Producer.flush`); a monitor SIGKILLed right after such a commit would have
lost them for good. This producer's flush waits until they are acknowledged.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable

from faust.transport.drivers import aiokafka as drv
from faust.transport.producer import ProducerBuffer
from yarl import URL

SCHEME = "sfkafka"


def fetch_wait_ms(scheme: str) -> int:
    """The fetch wait a scheme carries.

    Examples:
        >>> fetch_wait_ms("sfkafka20")
        20
    """
    return int(scheme[len(SCHEME):])


class ConsumerThread(drv.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport):
        consumer = super()._create_worker_consumer(transport)
        url = transport.url[0] if isinstance(transport.url, list) else transport.url  # one URL per broker
        if transport_for(url) is not None:  # faust's own wait otherwise
            consumer._fetch_max_wait_ms = fetch_wait_ms(url.scheme)  # read when the consumer starts
        return consumer


class Consumer(drv.Consumer):
    def _new_consumer_thread(self) -> ConsumerThread:
        return ConsumerThread(self, loop=self.loop, beacon=self.beacon)

    async def force_commit(self, topics=None, start_new_transaction: bool = True) -> bool:
        hook = getattr(self.transport, "before_commit", None)
        if hook is not None:
            hook()
        return await super().force_commit(topics, start_new_transaction=start_new_transaction)


class Buffer(ProducerBuffer):
    """faust's producer buffer, which knows when the message it took is still being sent."""

    sending = False

    async def _send_pending(self, fut) -> None:
        self.sending = True
        try:
            await self._send(fut)
        finally:
            self.sending = False

    async def _send(self, fut) -> None:
        await super()._send_pending(fut)  # faust's: hand it to the aiokafka producer

    async def drain(self) -> None:
        """Wait until every message put so far was handed to the aiokafka producer."""
        while self.size or self.sending:
            if self.state != "running":
                raise RuntimeError(f"cannot drain the producer buffer: it is {self.state}")
            self.message_sent.clear()
            try:
                await asyncio.wait_for(self.message_sent.wait(), timeout=0.1)
            except asyncio.TimeoutError:
                pass  # still sending: a busy machine, a large entry


class Producer(drv.Producer):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        buffer = Buffer(loop=self.loop, beacon=self.beacon)
        if getattr(self.buffer, "threaded_producer", None) is not None:
            buffer.threaded_producer = self.buffer.threaded_producer
        buffer.app, self.buffer = self.buffer.app, buffer

    async def flush(self) -> None:
        """Everything handed to the producer so far, sent and acknowledged.

        faust's own flush lets a commit go out with messages still in its buffer: its
        ``ProducerBuffer.flush`` returns once no message was sent for 0.1 s (a busy
        machine, a large changelog entry), and only the aiokafka producer behind it is
        flushed for real. Here the buffer is drained first, whatever it takes."""
        await self.buffer.drain()
        await super().flush()


class DrainingTransport(drv.Transport):
    """faust's own transport, with this module's producer (faust builds the app's producer
    from ``App.transport``)."""

    Producer = Producer


class Transport(DrainingTransport):
    """This module's consumer (the Tansu profile's fetch wait, the hook before commits)
    and producer."""

    Consumer = Consumer
    before_commit: Callable[[], None] | None = None


def transport_for(url: URL | str) -> type[Transport] | None:
    """This transport for a broker URL of scheme ``sfkafka<ms>``; ``None`` for any other
    (faust's own registry resolves those).

    Examples:
        >>> transport_for("sfkafka20://127.0.0.1:9092") is Transport, transport_for("kafka://kafka-1:9092")
        (True, None)
    """
    scheme = URL(str(url)).scheme
    return Transport if scheme.startswith(SCHEME) and scheme[len(SCHEME):].isdigit() else None


def install(app: Any, before_commit: Callable[[], None] | None = None) -> None:
    """Give the faust ``app`` this module's consumer where its broker URLs ask for it
    (``sfkafka<ms>://``) or ``before_commit`` is given (faust's own fetch wait on faust's
    own schemes), faust's own consumer otherwise, and this module's producer always.

    Call it right after ``faust.App(...)``, before anything (a topic, an agent) reads
    ``app.transport``.
    """
    for attr, urls in (("transport", app.conf.broker_consumer), ("producer_transport", app.conf.broker_producer)):
        cls = transport_for(urls[0]) or (Transport if before_commit is not None else DrainingTransport)
        transport = cls(urls, app)
        if isinstance(transport, Transport):
            transport.before_commit = before_commit
        setattr(app, attr, transport)
