"""A faust App whose worker consumer takes its fetch wait from our settings.

faust 0.15.3 builds the worker's AIOKafkaConsumer with the literal `fetch_max_wait_ms=1500`
(faust/transport/drivers/aiokafka.py). A real Kafka broker answers a fetch as soon as data
arrives, but Tansu (the embedded broker) waits out the whole interval: produce->event latency was
~625 ms. Subclassing the consumer thread is the narrowest fix: the consumer faust builds is
kept whole, only its fetch wait is replaced before aiokafka creates its fetcher (at start()).
"""

from __future__ import annotations

from typing import Any

import faust
from faust.transport.drivers import aiokafka as faust_aiokafka


class _FetchTunedConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport: Any):
        consumer = super()._create_worker_consumer(transport)
        wait = getattr(self.app, "fetch_max_wait_ms", None)
        if wait is not None:
            if not hasattr(consumer, "_fetch_max_wait_ms"):  # aiokafka changed: fail loudly, not slowly
                raise RuntimeError("aiokafka no longer has AIOKafkaConsumer._fetch_max_wait_ms; update stream/faust_app.py")
            consumer._fetch_max_wait_ms = int(wait)
        return consumer


class _Consumer(faust_aiokafka.Consumer):
    def _new_consumer_thread(self) -> faust_aiokafka.AIOKafkaConsumerThread:
        return _FetchTunedConsumerThread(self, loop=self.loop, beacon=self.beacon)


class _Transport(faust_aiokafka.Transport):
    Consumer = _Consumer


class MonitorApp(faust.App):
    """faust.App with `fetch_max_wait_ms` honoured by the worker consumer (kafka:// URLs)."""

    def __init__(self, *args: Any, fetch_max_wait_ms: int | None = None, **kwargs: Any):
        self.fetch_max_wait_ms = fetch_max_wait_ms
        super().__init__(*args, **kwargs)

    def _new_transport(self):
        url = str(self.conf.broker_consumer[0])
        if url.startswith(("kafka://", "aiokafka://")):
            return _Transport(self.conf.broker_consumer, self)
        return super()._new_transport()


def make_app(settings) -> MonitorApp:
    """The app every worker of this project runs (the monitor, the bench's passthrough), built from
    one Settings object: broker, fetch wait, group timeouts, acks, web port, credentials."""
    import tempfile
    from pathlib import Path

    from stream.kafka import faust_credentials

    # faust writes a data folder per app id; with no tables it holds nothing worth keeping, so it
    # stays out of the working directory.
    datadir = Path(tempfile.gettempdir()) / "emotion-monitor" / settings.app_id
    datadir.parent.mkdir(parents=True, exist_ok=True)  # faust creates only the last level
    return MonitorApp(
        settings.app_id,
        broker=settings.broker_list,
        fetch_max_wait_ms=settings.fetch_max_wait_ms,
        key_serializer="raw",
        value_serializer="raw",
        topic_partitions=settings.partitions,
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=settings.session_timeout_s,
        broker_heartbeat_interval=settings.heartbeat_interval_s,
        broker_rebalance_timeout=settings.rebalance_timeout_s,
        producer_acks=-1,
        web_port=settings.web_port,
        web_bind=settings.web_host,
        broker_credentials=faust_credentials(settings),
        autodiscover=False,
        store="memory://",
        datadir=str(datadir),
    )
