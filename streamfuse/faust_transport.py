"""faust's aiokafka transport with the broker profile's fetch wait.

faust hard-codes ``fetch_max_wait_ms=1500`` for its consumer. Tansu answers a waiting
fetch only when the wait is over, so every record would reach the monitor up to 1.5 s
late. :func:`streamfuse.kafka.faust_config` selects this transport for such a profile
under the URL scheme ``sfkafka<ms>`` (e.g. ``sfkafka20://127.0.0.1:9092``); the scheme
carries the wait, the rest is faust's own transport.
"""

from __future__ import annotations

from faust.transport.drivers import aiokafka as drv

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
