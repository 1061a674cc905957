"""The faust adapter's own behaviour (stream.worker.app), without a broker."""

import asyncio
import logging
from types import SimpleNamespace

from stream.settings import Settings
from stream.worker.app import (
    BACKLOG_FETCH_WAIT_MS,
    faust_worker,
    make_app,
    micro_batches,
)


class _Queue:
    def __init__(self, sizes):
        self.sizes = iter(sizes)

    def qsize(self):
        return next(self.sizes)


class _Stream:
    def __init__(self, batches, sizes):
        self.batches, self.channel = batches, SimpleNamespace(queue=_Queue(sizes))
        self.taken = None

    async def take_events(self, max_, within):
        self.taken = (max_, within)
        for b in self.batches:
            yield b


def test_the_fetch_wait_follows_the_buffered_backlog():
    """Two batches or more buffered: the fetch wait is about the last batch's time (capped);
    less: the configured wait again. Batching is faust's take_events with the worker's limits."""
    settings = Settings(max_batch=4, max_wait_ms=5, fetch_max_wait_ms=10)
    waits = []
    app = SimpleNamespace(consumer=SimpleNamespace(_thread=SimpleNamespace(set_fetch_wait=waits.append)))
    stream = _Stream([[1] * 4, [2] * 4, [3] * 4, [4] * 2], sizes=[8, 100, 3, 0])

    async def consume():
        got = []
        async for batch in micro_batches(app, stream, settings):
            got.append(batch)
            await asyncio.sleep(0.05 if len(got) == 1 else 0.5 if len(got) == 2 else 0)
        return got

    got = asyncio.run(consume())
    assert [len(b) for b in got] == [4, 4, 4, 2] and stream.taken == (4, 0.005)
    assert 50 <= waits[0] < BACKLOG_FETCH_WAIT_MS and waits[1] == BACKLOG_FETCH_WAIT_MS and waits[2:] == [10, 10]


def test_micro_batches_without_an_aiokafka_consumer_thread_only_batch():
    stream = _Stream([[1], [2]], sizes=[500, 500])
    app = SimpleNamespace(consumer=SimpleNamespace())

    async def consume():
        return [b async for b in micro_batches(app, stream, Settings())]

    assert asyncio.run(consume()) == [[1], [2]]


def test_faust_keeps_the_configured_log_level(tmp_path, monkeypatch):
    """faust's spinner set the root logger to DEBUG at log level WARNING and above, so every
    debug line of aiokafka and faust became a record; the worker's faust Worker has no spinner."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    settings = Settings(app_id="log-level-test", log_level="warning")
    worker = faust_worker(make_app(settings), settings)
    root, handler = logging.getLogger(), logging.NullHandler()
    before = root.level
    root.addHandler(handler)
    try:
        root.setLevel(logging.WARNING)
        worker.on_setup_root_logger(root, logging.WARNING)
        assert root.level == logging.WARNING and worker.spinner is None
    finally:
        root.removeHandler(handler)
        root.setLevel(before)
