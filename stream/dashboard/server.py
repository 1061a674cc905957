"""The dashboard's web server: aiohttp app + a background Kafka consumer feeding the board.

Routes:

* ``GET /``            the page (static/index.html);
* ``GET /static/...``  its script and style sheet (all local: no CDN, no external fonts);
* ``GET /api/state``   the whole board as JSON;
* ``GET /events``      server-sent events: ``snapshot`` (the whole board) first, then ``update``
  events, each carrying the list of deltas of one consumer batch (see stream.dashboard.state);
* ``GET /healthz``     liveness + consumer status (JSON).

The consumer reads the emotions, alerts and summaries topics with no consumer group and from the
earliest offset (the local broker, Tansu, answers "latest" wrongly; reading from the start also
shows the conversations already under way), so nothing is committed and every dashboard sees
everything. The board is bounded (stream.dashboard.state), and so is every browser's queue: a
browser that falls behind is disconnected and its EventSource reconnects to a fresh snapshot.

The board has no authentication: it binds 127.0.0.1 by default. Expose it only behind a proxy
that authenticates, since it shows who is upset in which conversation.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from stream import kafka
from stream.dashboard import add_dashboard, run_dashboard_cmd  # noqa: F401 - re-exported (CLI side)
from stream.dashboard.state import BoardState, coalesce

log = logging.getLogger("emotion_monitor.dashboard")

STATIC = Path(__file__).resolve().parent / "static"
CLIENT_QUEUE = 500          # update messages buffered per browser before it is dropped
HEARTBEAT_S = 15.0          # SSE comment line, keeps proxies from closing idle streams
IDLE_EVICT_S = 3600.0       # active conversations with no event for an hour leave the board
IDLE_SWEEP_S = 30.0

SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; "
                               "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


@web.middleware
async def _security_headers(request: web.Request, handler):
    resp = await handler(request)
    for k, v in SECURITY_HEADERS.items():
        resp.headers.setdefault(k, v)
    return resp


def _host_name(header: str) -> str:
    """The name part of a Host header ("localhost:8088" -> "localhost", "[::1]:8088" -> "[::1]")."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[: header.find("]") + 1]
    return header.rpartition(":")[0] if header.count(":") == 1 else header


def _host_allow_list(allowed: set[str]):
    """DNS rebinding: a page on an attacker's domain that resolves to 127.0.0.1 reaches the
    dashboard with its own name in the Host header; answer only the names we are known by."""

    @web.middleware
    async def check_host(request: web.Request, handler):
        # /healthz carries no call data and is what orchestrators probe by pod address (Kubernetes
        # httpGet probes send Host: <pod IP>:<port>), so it answers whatever the Host.
        if request.path != "/healthz" and "*" not in allowed and _host_name(request.headers.get("Host", "")) not in allowed:
            return web.Response(status=421, text="unknown Host header; add the name the dashboard is reached by to "
                                                 "EMOTION_MONITOR_DASHBOARD_ALLOWED_HOSTS\n")
        return await handler(request)

    return check_host


class DashboardServer:
    """The app, its consumer and its browsers. ``await start()`` / ``await stop()``, or use
    :func:`run_dashboard`. With ``port=0`` a free port is taken (see :attr:`port`)."""

    def __init__(self, settings, host: str | None = None, port: int | None = None, *,
                 state: BoardState | None = None, consume: bool = True,
                 idle_evict_s: float = IDLE_EVICT_S) -> None:
        self.settings = settings
        self.host = host or settings.dashboard_host
        self.port = settings.dashboard_port if port is None else port
        self.state = state or BoardState(rules_path=settings.rules_path)
        self.consume = consume
        self.idle_evict_s = idle_evict_s
        self.topics = {settings.emotions_topic: "emotions", settings.alerts_topic: "alerts",
                       settings.summaries_topic: "summaries"}
        self.clients: set[asyncio.Queue] = set()
        self.consumer_status: dict[str, Any] = {"state": "not started", "error": None, "records": 0,
                                                "last_record_at": None}
        self.started_at = time.time()
        self._runner: web.AppRunner | None = None
        self._tasks: list[asyncio.Task] = []
        self._stopping = False
        self.app = self._build_app()

    # ---- app ---------------------------------------------------------------------------------
    def _build_app(self) -> web.Application:
        allowed = {h.strip().lower() for h in getattr(self.settings, "dashboard_allowed_hosts", "").split(",") if h.strip()}
        allowed.add(self.host.lower() if ":" not in self.host else f"[{self.host.lower()}]")
        app = web.Application(middlewares=[_host_allow_list(allowed), _security_headers])
        app.router.add_get("/", self._index)
        app.router.add_get("/api/state", self._api_state)
        app.router.add_get("/events", self._events)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_static("/static/", STATIC, show_index=False, follow_symlinks=False)
        return app

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/"

    async def _index(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    async def _api_state(self, request: web.Request) -> web.Response:
        return web.Response(text=_dumps(self.state.snapshot()), content_type="application/json",
                            headers={"Cache-Control": "no-store"})

    async def _healthz(self, request: web.Request) -> web.Response:
        body = {"status": "ok", "uptime_s": round(time.time() - self.started_at, 1),
                "consumer": self.consumer_status, "topics": list(self.topics),
                "conversations": len(self.state.active), "ended": len(self.state.ended),
                "clients": len(self.clients), "stats": self.state.stats}
        return web.Response(text=_dumps(body), content_type="application/json", headers={"Cache-Control": "no-store"})

    async def _events(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                                           "X-Accel-Buffering": "no"})
        await resp.prepare(request)
        queue: asyncio.Queue = asyncio.Queue(maxsize=CLIENT_QUEUE)
        # Snapshot and registration happen with no await in between: no delta can slip between them.
        snapshot = self._sse("snapshot", {"board": self.state.snapshot(), "consumer": self.consumer_status})
        self.clients.add(queue)
        try:
            await resp.write(b"retry: 2000\n\n" + snapshot)
            while not self._stopping:
                try:
                    msg = await asyncio.wait_for(queue.get(), HEARTBEAT_S)
                except asyncio.TimeoutError:
                    msg = b": keep-alive\n\n"
                if msg is None:  # dropped (too slow) or server stopping
                    break
                await resp.write(msg)
        except ConnectionResetError:  # the browser went away (aiohttp's own error subclasses it)
            pass
        finally:
            self.clients.discard(queue)
        return resp

    @staticmethod
    def _sse(event: str, data: Any) -> bytes:
        return f"event: {event}\ndata: {_dumps(data)}\n\n".encode()

    def broadcast(self, deltas: list[dict]) -> None:
        if not deltas or not self.clients:
            return
        msg = self._sse("update", {"deltas": coalesce(deltas), "consumer": self.consumer_status})
        for queue in list(self.clients):
            try:
                queue.put_nowait(msg)
            except asyncio.QueueFull:  # too slow: disconnect; its EventSource reconnects to a snapshot
                self.clients.discard(queue)
                with contextlib.suppress(asyncio.QueueEmpty):
                    while True:
                        queue.get_nowait()
                queue.put_nowait(None)

    # ---- feeding ---------------------------------------------------------------------------------
    def ingest(self, topic: str, value: bytes | str | None) -> list[dict]:
        """Decode one record of `topic` and apply it to the board; returns the deltas."""
        kind = self.topics.get(topic)
        if kind is None:
            return []
        try:
            event = json.loads(value) if value is not None else None
        except (TypeError, ValueError):
            event = None
        return self.state.apply(kind, event)

    async def _consume(self) -> None:
        backoff = 1.0
        while not self._stopping:
            # No group, from the earliest offset (stream.kafka's defaults): every dashboard sees
            # everything, including the calls already under way.
            consumer = kafka.consumer(
                *self.topics, bootstrap=self.settings.brokers, settings=self.settings,
                fetch_max_wait_ms=max(1, min(self.settings.fetch_max_wait_ms, 100)),
                metadata_max_age_ms=5000,  # notice topics created after the dashboard started
                client_id="emotion-monitor-dashboard",
            )
            try:
                self.consumer_status.update(state="connecting", error=None)
                await consumer.start()
                self.consumer_status.update(state="consuming")
                backoff = 1.0
                while not self._stopping:
                    batches = await consumer.getmany(timeout_ms=500, max_records=2000)
                    deltas: list[dict] = []
                    for tp, records in batches.items():
                        for record in records:
                            deltas.extend(self.ingest(tp.topic, record.value))
                            self.consumer_status["records"] += 1
                    if batches:
                        self.consumer_status["last_record_at"] = time.time()
                    self.broadcast(deltas)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # broker down, etc.: keep serving the board, retry
                log.warning("dashboard consumer failed: %s; retrying in %.0f s", exc, backoff)
                text = str(exc) if str(exc).startswith(type(exc).__name__) else f"{type(exc).__name__}: {exc}"
                self.consumer_status.update(state="retrying", error=text[:300])
                self.broadcast([{"op": "status"}])
            finally:
                with contextlib.suppress(Exception):
                    await consumer.stop()
            if not self._stopping:
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(IDLE_SWEEP_S)
            self.broadcast(self.state.evict_idle(self.idle_evict_s))

    # ---- lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> "DashboardServer":
        self._runner = web.AppRunner(self.app, handle_signals=False, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        sockets = getattr(site._server, "sockets", None) or []  # the real port when port=0
        if sockets:
            self.port = sockets[0].getsockname()[1]
        if self.consume:
            self._tasks.append(asyncio.create_task(self._consume(), name="dashboard-consumer"))
        self._tasks.append(asyncio.create_task(self._sweep(), name="dashboard-sweep"))
        return self

    async def stop(self) -> None:
        self._stopping = True
        for queue in list(self.clients):
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(None)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


async def run_dashboard(settings, host: str | None = None, port: int | None = None) -> None:
    """Serve the dashboard until cancelled (Ctrl-C) or SIGTERM; prints its URL once listening."""
    server = DashboardServer(settings, host, port)
    await server.start()
    print(f"dashboard: {server.url}", flush=True)
    print(f"dashboard: reading {', '.join(server.topics)} from {kafka.bootstrap_servers(settings.brokers)}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):  # not main thread / Windows
        loop.add_signal_handler(signal.SIGTERM, stop.set)
    try:
        await stop.wait()
    finally:
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.remove_signal_handler(signal.SIGTERM)
        await server.stop()
