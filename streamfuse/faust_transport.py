"""faust's aiokafka transport with the broker profile's fetch wait.

faust hard-codes ``fetch_max_wait_ms=1500`` for its consumer. Tansu answers a waiting
fetch only when the wait is over, so every record would reach the monitor up to 1.5 s
late. :func:`streamfuse.kafka.faust_config` names this transport for such a profile by
the URL scheme ``sfkafka<ms>`` (e.g. ``sfkafka20://127.0.0.1:9092``); the scheme carries
the wait, the rest is faust's own transport.

faust finds a transport by URL scheme in a process-wide registry
(``faust.transport.drivers.TRANSPORTS``). Rather than add our schemes to it, :func:`install`
hands the transport to the app through faust's public ``App.transport`` and
``App.producer_transport`` setters: building an app changes nothing outside it.
"""

from __future__ import annotations

from typing import Any

from faust.transport.drivers import aiokafka as drv
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
        consumer._fetch_max_wait_ms = fetch_wait_ms(url.scheme)  # read when the consumer starts
        return consumer


class Consumer(drv.Consumer):
    def _new_consumer_thread(self) -> ConsumerThread:
        return ConsumerThread(self, loop=self.loop, beacon=self.beacon)


class Transport(drv.Transport):
    Consumer = Consumer


def transport_for(url: URL | str) -> type[Transport] | None:
    """This transport for a broker URL of scheme ``sfkafka<ms>``; ``None`` for any other
    (faust's own registry resolves those).

    Examples:
        >>> transport_for("sfkafka20://127.0.0.1:9092") is Transport, transport_for("kafka://kafka-1:9092")
        (True, None)
    """
    scheme = URL(str(url)).scheme
    return Transport if scheme.startswith(SCHEME) and scheme[len(SCHEME):].isdigit() else None


def install(app: Any) -> None:
    """Give the faust ``app`` this transport, consumer and producer, where its broker URLs
    ask for it (``sfkafka<ms>://``); an app on faust's own schemes is left as it is.

    Call it right after ``faust.App(...)``, before anything (a topic, an agent) reads
    ``app.transport``.
    """
    for attr, urls in (("transport", app.conf.broker_consumer), ("producer_transport", app.conf.broker_producer)):
        cls = transport_for(urls[0])
        if cls is not None:
            setattr(app, attr, cls(urls, app))
