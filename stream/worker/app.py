"""The faust side of the worker: the app, its agent, its timers and web pages (a thin adapter
around stream.worker.batch.BatchProcessor).

The app's worker consumer takes its fetch wait from our settings: faust 0.15.3 builds the worker's AIOKafkaConsumer with the literal `fetch_max_wait_ms=1500`
(faust/transport/drivers/aiokafka.py). A real Kafka broker answers a fetch as soon as data
arrives, but Tansu (the embedded broker) waits out the whole interval: produce->event latency was
~625 ms. Subclassing the consumer thread is the narrowest fix: the consumer faust builds is
kept whole, only its fetch wait is replaced before aiokafka creates its fetcher (at start()).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import faust
from faust.transport.drivers import aiokafka as faust_aiokafka

from stream.settings import Settings
from stream.worker.batch import BatchProcessor
from stream.worker.state_store import StateStore

log = logging.getLogger("emotion_monitor.worker")


class _FetchTunedConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport: Any):
        consumer = super()._create_worker_consumer(transport)
        wait = getattr(self.app, "fetch_max_wait_ms", None)
        if wait is not None:
            if not hasattr(consumer, "_fetch_max_wait_ms"):  # aiokafka changed: fail loudly, not slowly
                raise RuntimeError("aiokafka no longer has AIOKafkaConsumer._fetch_max_wait_ms; update stream/worker/app.py")
            consumer._fetch_max_wait_ms = int(wait)
        return consumer

    def set_fetch_wait(self, wait_ms: int) -> None:
        """The fetch wait of the next fetch requests (the running consumer's fetcher reads it for
        each request it builds; an int assignment, so any thread may set it)."""
        fetcher = getattr(self._consumer, "_fetcher", None)
        if fetcher is not None and getattr(fetcher, "_fetch_max_wait_ms", wait_ms) != wait_ms:
            fetcher._fetch_max_wait_ms = wait_ms


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


# The fetch wait while a backlog is buffered (below): at most this, in ms.
BACKLOG_FETCH_WAIT_MS = 250


async def micro_batches(app: MonitorApp, stream, settings):
    """The agent's micro-batches (the worker's and the passthrough's): faust's
    `take_events(max_batch, within=max_wait_ms)`, with the fetch wait following the backlog.

    The consumer asks the broker for more every `fetch_max_wait_ms` (10 ms: a fetch that finds
    nothing new waits that long at the broker, and Tansu answers no sooner). While the worker is
    busy with a backlog it already holds, those requests find nothing and cost CPU all the same:
    a lagging worker made ~0.9 fetch requests per utterance at about 1 core-ms each, as much as
    the rest of its own work. So while at least two batches wait in the app's buffer, the fetch
    wait is the time the last batch took (at most BACKLOG_FETCH_WAIT_MS): a request that finds
    records still returns at once, one that finds none waits about as long as the worker needs
    for a batch anyway, and a message that arrives meanwhile is fetched before the worker could
    take it. With less buffered the wait is `fetch_max_wait_ms` again (latency at low load is
    unchanged)."""
    short = settings.fetch_max_wait_ms
    thread = getattr(app.consumer, "_thread", None)
    tune = getattr(thread, "set_fetch_wait", None)
    queue = getattr(stream.channel, "queue", None)
    async for batch in stream.take_events(settings.max_batch, within=settings.max_wait_ms / 1000.0):
        t0 = time.monotonic()
        yield batch
        if tune is not None and queue is not None:
            if queue.qsize() >= 2 * settings.max_batch:
                tune(min(BACKLOG_FETCH_WAIT_MS, max(short, int((time.monotonic() - t0) * 1000))))
            else:
                tune(short)


PRODUCER_BATCH_BYTES = 256 * 1024


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
        # A batch's records go out in one produce request. With aiokafka's 16 KB batches a
        # worker batch's events (~75 KB) filled the batches of the emotions partitions, and each
        # full one made the publishing loop wait until the sender had taken it: ~20 produce
        # requests per micro-batch. A record larger than this still goes out alone, up to the
        # producer's request limit (1 MB, below a broker's default message limit).
        producer_max_batch_size=PRODUCER_BATCH_BYTES,
    )


def producer_send(app: MonitorApp):
    """`send(topic, key, value)` for the worker's output records (the monitor's and the
    passthrough's): queues the record with the app's producer and returns its ack future
    (awaiting `send` itself only queues, in call order; the future resolves with the broker's ack).

    This is what faust's `Topic.send` ends in (the app's producer, faust's `ProducerSendError`
    around aiokafka's errors, the same record: no partition, timestamp or headers of ours)
    without what it does around every record: channel, pending- and future-message objects,
    sensors, callbacks, and `app.maybe_start_producer()`, whose stampede guard yields to the
    event loop three times per call. Those yields let the producer's sender run between the
    records of a batch: ~20 produce requests per micro-batch instead of one or two, and three
    event-loop turns per record."""
    producer = None

    async def send(topic: str, key: bytes | None, value: bytes):
        nonlocal producer
        if producer is None:  # started by the worker before any agent runs; once is enough
            producer = await app.maybe_start_producer()
        return await producer.send(topic, key, value, partition=None, timestamp=None, headers=None)

    return send


def run_app(app: MonitorApp, settings) -> None:
    """Hand over to faust's worker (blocks until it stops): the monitor and the passthrough alike."""
    faust_worker(app, settings).execute_from_commandline()


def faust_worker(app: MonitorApp, settings):
    """faust's Worker for `app`, logging at `settings.log_level`.

    faust's Worker draws a terminal spinner, and to advance it on every log record it sets the
    root logger to DEBUG whenever the log level is WARNING or above (faust 0.15.3,
    Worker._setup_spinner_handler). Every debug line of aiokafka and faust (several per fetch and
    produce request) was then built into a record and dispatched: 11 records per utterance in a
    worker at EMOTION_MONITOR_LOG_LEVEL=warning. Without the spinner the root logger keeps the
    configured level."""
    import faust

    worker = faust.Worker(app, loglevel=settings.log_level, quiet=True)
    worker.spinner = None
    return worker


def build_app(settings: Settings, scorer) -> MonitorApp:
    """The worker's faust app: its agent, idle timer and web pages around one BatchProcessor."""
    app = make_app(settings)
    store = _state_store(settings)
    processor = BatchProcessor(settings, scorer, store, producer_send(app))
    app.processor = processor  # for tests and metrics
    processor.owns = lambda p: p in _assigned(app, settings)
    _add_agent(app, settings, processor)
    _add_timers(app, settings, processor)
    _add_pages(app, settings, processor, scorer)
    return app


def _state_store(settings: Settings) -> StateStore:
    import redis.asyncio as aioredis

    password = settings.redis_password.get_secret_value() if settings.redis_password else None
    client = aioredis.from_url(settings.redis_url, password=password, socket_connect_timeout=5, socket_timeout=10)
    # Keys are namespaced by app id: two deployments (say a MELD and an EmoryNLP model) can share
    # one Redis without one's idle timer finalising the other's conversations. Redis Cluster: not supported.
    return StateStore(client, settings.state_ttl_s, prefix=f"em:{settings.app_id}", state_format=settings.state_format)


def _assigned(app: MonitorApp, settings: Settings) -> set[int]:
    """The partitions of the utterances topic this worker holds now."""
    return {tp.partition for tp in app.consumer.assignment() if tp.topic == settings.utterances_topic}


def _add_agent(app: MonitorApp, settings: Settings, processor: BatchProcessor) -> None:
    source = app.topic(settings.utterances_topic, partitions=settings.partitions)

    @app.agent(source, concurrency=1)
    async def monitor(stream):
        async for batch in micro_batches(app, stream, settings):
            msgs = [(e.message.key, e.message.value, e.message.partition, e.message.offset, e.message.timestamp)
                    for e in batch]
            try:
                await processor.process(msgs)
            except Exception:
                # Redis or broker trouble: log without payloads and let faust crash the agent,
                # so the batch is redelivered (offsets are not committed past it).
                log.exception("batch of %d messages failed", len(msgs))
                raise

    @app.on_partitions_assigned.connect
    async def on_assigned(sender, assigned, **kwargs) -> None:
        mine = {tp.partition for tp in assigned if tp.topic == settings.utterances_topic}
        try:
            await processor.assigned(mine)
        except Exception as exc:  # noqa: BLE001 - never fail the rebalance; the timer re-checks
            log.error("could not record the ownership of partitions %s (%s)", sorted(mine), type(exc).__name__)


def _add_timers(app: MonitorApp, settings: Settings, processor: BatchProcessor) -> None:
    # Also the gap wait's timer (at least every gap_wait / 2), whatever the lookahead: with
    # lookahead 0 nothing awaits a final, but conversations are still abandoned with their summary.
    @app.timer(interval=max(0.25, min(settings.idle_finalize_s / 4, settings.gap_wait / 2 or 0.25)))
    async def finalize_idle() -> None:
        assigned = _assigned(app, settings)
        processor.owned(assigned)
        for p in sorted(assigned):
            try:
                await processor.finalize_idle(p)
            except Exception as exc:  # noqa: BLE001 - the timer must never crash the app
                log.error("idle timer on partition %s failed (%s); retried at its next run", p, type(exc).__name__)
                log.debug("traceback of the idle timer failure", exc_info=True)

    @app.timer(interval=30.0)
    async def report() -> None:
        totals = processor.metrics.totals()
        if totals:
            log.info("counts: %s", totals)


def _add_pages(app: MonitorApp, settings: Settings, processor: BatchProcessor, scorer) -> None:
    @app.page("/metrics")
    async def metrics(web, request):
        # Prometheus' text format; aiohttp refuses a charset inside content_type (UTF-8 is the default).
        return web.bytes(processor.metrics.render(), content_type="text/plain; version=0.0.4")

    @app.page("/healthz")
    async def healthz(web, request):
        # Liveness: the event loop answers (a wedged loop would not).
        return web.json({"status": "ok"})

    @app.page("/readyz")
    async def readyz(web, request):
        # Readiness: the model is loaded (it is, before faust starts), Redis answers, and this
        # worker holds partitions of the utterances topic.
        assigned = sorted(_assigned(app, settings))
        refused = None
        try:
            redis_ok = bool(await processor.store.r.ping())
            # Redis may answer and still refuse writes (OOM with noeviction, a read-only replica).
            refused = processor.redis_refusing or await processor.store.probe_write()
        except Exception:  # noqa: BLE001 - any Redis failure means not ready
            redis_ok = False
        ready = redis_ok and refused is None and bool(assigned)
        return web.json({"ready": ready, "redis": redis_ok, "redis_writes": "ok" if refused is None else f"refused ({refused})",
                         "partitions": assigned, "model": scorer.model_id},
                        status=200 if ready else 503)
