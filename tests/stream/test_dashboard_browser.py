"""The dashboard end to end: real local broker (Tansu), the real server (run_dashboard, in a thread),
headless Chromium driven by Playwright.

Needs /usr/bin/chromium (deploy/install-browser.sh) and the `playwright` Python package (dev extra;
`playwright install` is not needed). Skipped with the reason when either is missing.
Screenshots go to tests/artifacts/ (gitignored) and to the test's tmp_path.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import shutil
import socket
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.integration]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1"]
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
WAIT_MS = 15_000

if not Path(CHROMIUM).is_file():
    pytest.skip(f"{CHROMIUM} not found: run deploy/install-browser.sh (root + apt-get)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api",
                               reason="the `playwright` package is not installed (pip install playwright; "
                               "it is in the dev extra); `playwright install` is not needed")


# ---- helpers -----------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _emotion(cid, seq, status, emo, speaker, role, score=0.8) -> dict:
    labels = ["neutral", "joy", "surprise", "anger", "sadness", "disgust", "fear"]
    rest = (1.0 - score) / (len(labels) - 1)
    now = time.time()
    return {"event_id": uuid.uuid5(uuid.NAMESPACE_URL, f"{cid}/{seq}/{status}").hex, "conversation_id": cid, "seq": seq,
            "speaker": speaker, "role": role, "emotion": emo,
            "scores": {lab: (score if lab == emo else rest) for lab in labels}, "status": status,
            "model": {"name": "meld", "version": "test"}, "context_reset": False, "ts_produced": now - 0.05,
            "ts_received": now - 0.04, "ts_emitted": now}


def _check_contract(topic: str, value: dict) -> None:
    """The events this test sends follow the published schemas (where the contract has one)."""
    from stream.core.contract import SCHEMAS, validate_event

    name = {"emotions": "emotion-event", "alerts": "alert", "summaries": "summary"}[topic.split("-")[1]]
    if name in SCHEMAS and pytest.importorskip("jsonschema"):
        validate_event(value, name)


def _produce(bootstrap: str, records: list[tuple[str, str, dict]]) -> None:
    from stream import kafka

    for topic, _key, value in records:
        _check_contract(topic, value)

    async def go():
        producer = kafka.producer(bootstrap, linger_ms=0)
        await producer.start()
        try:
            for topic, key, value in records:
                await producer.send_and_wait(topic, json.dumps(value).encode(), key=key.encode())
        finally:
            await producer.stop()

    # Playwright's sync API keeps an event loop running in this thread: produce from another one.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, go()).result(30)


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310 - loopback only
        assert resp.status == 200
        return json.loads(resp.read())


class DashboardThread:
    """run_dashboard(...) on its own event loop in a daemon thread; stop() cancels it (its finally
    stops the consumer and the HTTP server)."""

    def __init__(self, settings, host: str, port: int) -> None:
        from stream.dashboard.server import run_dashboard

        self.url = f"http://{host}:{port}/"
        self.loop = asyncio.new_event_loop()
        self.task = None
        self.error: BaseException | None = None
        self._coro = run_dashboard(settings, host=host, port=port)
        self.thread = threading.Thread(target=self._run, name="dashboard", daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.task = self.loop.create_task(self._coro)
        try:
            self.loop.run_until_complete(self.task)
        except asyncio.CancelledError:
            pass
        except BaseException as exc:  # surfaced by start()/the test
            self.error = exc
        finally:
            self.loop.close()

    def start(self, timeout: float = 15.0) -> "DashboardThread":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.error is not None:
                raise RuntimeError("dashboard failed to start") from self.error
            try:
                if _get_json(self.url + "healthz")["status"] == "ok":
                    return self
            except OSError:
                time.sleep(0.05)
        raise TimeoutError(f"dashboard did not answer on {self.url} within {timeout} s")

    def stop(self) -> None:
        if self.task is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.task.cancel)
        self.thread.join(10)
        assert not self.thread.is_alive(), "dashboard thread did not stop"


# ---- the test ----------------------------------------------------------------------------------

def test_dashboard_shows_conversations_finals_alerts_and_summary_live(stack, tmp_path, capsys):
    from stream.kafka import create_topics
    from stream.settings import Settings

    uid = uuid.uuid4().hex[:8]
    topics = {"emotions": f"dash-emotions-{uid}", "alerts": f"dash-alerts-{uid}", "summaries": f"dash-summaries-{uid}"}
    asyncio.run(create_topics(stack.bootstrap, {t: 1 for t in topics.values()}))
    settings = Settings(brokers=f"kafka://{stack.bootstrap}", emotions_topic=topics["emotions"],
                        alerts_topic=topics["alerts"], summaries_topic=topics["summaries"])

    hot, calm, other = f"call-{uid}", f"calm-{uid}", f"chat-{uid}"
    script = [  # (speaker, role, provisional emotion, final emotion, final score)
        ("cust-17", "customer", "neutral", "neutral", 0.71), ("agent-3", "agent", "neutral", "joy", 0.64),
        ("cust-17", "customer", "surprise", "anger", 0.82), ("agent-3", "agent", "neutral", "neutral", 0.77),
        ("cust-17", "customer", "anger", "anger", 0.91), ("agent-3", "agent", "sadness", "neutral", 0.58),
        ("cust-17", "customer", "anger", "disgust", 0.66), ("agent-3", "agent", "neutral", "neutral", 0.8),
        ("cust-17", "customer", "sadness", "anger", 0.88), ("agent-3", "agent", "fear", "sadness", 0.55),
    ]
    alert_id = uuid.uuid5(uuid.NAMESPACE_URL, f"alert/{uid}").hex  # 32 hex, as the contract says
    summary_id = uuid.uuid5(uuid.NAMESPACE_URL, f"summary/{uid}").hex
    reason = "customer negative in 4 of the last 5 turns (anger 0.91 at seq 4)"

    port = _free_port()
    dash = DashboardThread(settings, "127.0.0.1", port).start()
    try:
        assert f"dashboard: http://127.0.0.1:{port}/" in capsys.readouterr().out
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1366, "height": 768})
                requests, errors = [], []
                page.on("request", lambda r: requests.append(r.url))
                page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
                page.on("pageerror", lambda e: errors.append(str(e)))
                page.goto(dash.url)
                expect = sync_api.expect
                expect(page.get_by_test_id("connection")).to_have_text("live", timeout=WAIT_MS)

                # 1) provisional verdicts appear live, hatched, before any final
                _produce(stack.bootstrap, [(topics["emotions"], hot, _emotion(hot, s, "provisional", prov, spk, role))
                                           for s, (spk, role, prov, _f, _sc) in enumerate(script)])
                expect(page.get_by_test_id(f"conv-{hot}")).to_be_visible(timeout=WAIT_MS)
                cell0 = page.get_by_test_id(f"cell-{hot}-0")
                expect(cell0).to_have_attribute("data-status", "provisional", timeout=WAIT_MS)
                assert "provisional" in (cell0.get_attribute("title") or "")

                # 2) finals replace them (the last two stay provisional: no lookahead yet); a calm
                #    conversation and a role-less one (MELD style) arrive as well
                finals = [(topics["emotions"], hot, _emotion(hot, s, "final", fin, spk, role, sc))
                          for s, (spk, role, _p, fin, sc) in enumerate(script[:-2])]
                finals += [(topics["emotions"], calm, _emotion(calm, s, "final", "neutral", spk, role))
                           for s, (spk, role) in enumerate([("cust-2", "customer"), ("agent-1", "agent")] * 3)]
                finals += [(topics["emotions"], other, _emotion(other, s, st, emo, spk, None))
                           for s, (spk, emo, st) in enumerate([("Ross", "joy", "final"), ("Rachel", "surprise", "final"),
                                                               ("Ross", "sadness", "provisional")])]
                _produce(stack.bootstrap, finals)
                for s, (_spk, _role, _p, fin, _sc) in enumerate(script[:-2]):
                    cell = page.get_by_test_id(f"cell-{hot}-{s}")
                    expect(cell).to_have_attribute("data-status", "final", timeout=WAIT_MS)
                    expect(cell).to_have_attribute("data-emotion", fin)
                expect(page.get_by_test_id(f"cell-{hot}-9")).to_have_attribute("data-status", "provisional")
                expect(page.get_by_test_id(f"conv-{calm}")).to_be_visible(timeout=WAIT_MS)

                # 3) an alert: shown in the feed with its reason; the conversation goes to the top
                _produce(stack.bootstrap, [(topics["alerts"], hot, {
                    "alert_id": alert_id, "conversation_id": hot, "rule": "customer_negative_streak", "kind": "raised",
                    "severity": "critical", "role": "customer", "speaker": "cust-17", "seq_from": 2, "seq_to": 8,
                    "reason": reason, "closes": None, "model": {"name": "meld", "version": "test"},
                    "ts_emitted": time.time()})])
                item = page.get_by_test_id(f"alert-{alert_id}")
                expect(item).to_be_visible(timeout=WAIT_MS)
                expect(item).to_contain_text(reason)
                expect(item).to_contain_text("seq 2–8")
                expect(page.get_by_test_id("conv-list").locator("li").first).to_have_attribute(
                    "data-testid", f"conv-{hot}", timeout=WAIT_MS)
                expect(page.get_by_test_id(f"conv-{hot}")).to_have_attribute("data-risk-level", "critical")
                expect(page.get_by_test_id(f"conv-{hot}")).to_contain_text("critical")
                # clicking another conversation, then the alert, selects the alert's conversation
                page.get_by_test_id(f"conv-{calm}").click()
                expect(page.get_by_test_id("detail-title")).to_have_text(calm)
                item.click()
                expect(page.get_by_test_id("detail-title")).to_have_text(hot)
                expect(page.get_by_test_id("open-alerts")).to_contain_text(reason)
                page.get_by_test_id(f"cell-{hot}-4").hover()
                expect(page.get_by_test_id("cell-info")).to_contain_text("anger 0.91")
                page.screenshot(path=str(tmp_path / "dashboard-live.png"))
                assert page.get_by_test_id(f"summary-{hot}").count() == 0

                # 4) the last finals and the summary: the conversation moves to "recently ended"
                tail = [(topics["emotions"], hot, _emotion(hot, s, "final", fin, spk, role, sc))
                        for s, (spk, role, _p, fin, sc) in enumerate(script) if s >= len(script) - 2]
                _produce(stack.bootstrap, tail + [(topics["summaries"], hot, {
                    "summary_id": summary_id, "conversation_id": hot, "ended_by": "end", "utterances": len(script),
                    "distribution": {"customer": {"neutral": 1, "anger": 3, "disgust": 1},
                                     "agent": {"joy": 1, "neutral": 3, "sadness": 1}},
                    "trajectory": [{"seq": s, "role": role, "speaker": spk, "emotion": fin, "score": sc}
                                   for s, (spk, role, _p, fin, sc) in enumerate(script)],
                    "peaks": [{"seq": 4, "role": "customer", "speaker": "cust-17", "emotion": "anger", "score": 0.91},
                              {"seq": 8, "role": "customer", "speaker": "cust-17", "emotion": "anger", "score": 0.88},
                              {"seq": 2, "role": "customer", "speaker": "cust-17", "emotion": "anger", "score": 0.82}],
                    "trajectory_truncated": False,
                    "alerts": [{"alert_id": alert_id, "rule": "customer_negative_streak", "kind": "raised",
                                "severity": "critical", "seq_from": 2, "seq_to": 8}],
                    "alerts_truncated": False, "open_alerts": [alert_id], "risk": 0.88,
                    "model": {"name": "meld", "version": "test"}, "ts_emitted": time.time()})])
                card = page.get_by_test_id(f"summary-{hot}")
                expect(card).to_be_visible(timeout=WAIT_MS)
                expect(card).to_contain_text("ended by end")
                expect(card).to_contain_text("customer_negative_streak")
                expect(card).to_contain_text("0.91")
                expect(card).to_contain_text("risk at end 0.88")
                expect(card).to_contain_text("still open")
                expect(page.get_by_test_id("ended-list").get_by_test_id(f"conv-{hot}")).to_be_visible()
                expect(page.get_by_test_id("conv-list").get_by_test_id(f"conv-{hot}")).to_have_count(0)
                expect(page.get_by_test_id(f"cell-{hot}-9")).to_have_attribute("data-status", "final", timeout=WAIT_MS)
                assert page.locator(f'[data-testid^="cell-{hot}-"][data-status="final"]').count() == len(script)

                ARTIFACTS.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(tmp_path / "dashboard.png"))
                shutil.copyfile(tmp_path / "dashboard.png", ARTIFACTS / "dashboard.png")
                shutil.copyfile(tmp_path / "dashboard-live.png", ARTIFACTS / "dashboard-live.png")

                # everything came from the dashboard itself (no CDN, no fonts), and the page raised no error
                assert requests and all(u.startswith(dash.url) for u in requests), requests
                assert not errors, errors
            finally:
                browser.close()

        # the JSON side agrees with the page
        state = _get_json(dash.url + "api/state")
        assert [c["conversation_id"] for c in state["ended"]] == [hot]
        assert state["ended"][0]["summary"]["summary_id"] == summary_id
        assert state["alerts"][0]["alert_id"] == alert_id
        health = _get_json(dash.url + "healthz")
        assert health["consumer"]["state"] == "consuming" and health["stats"]["skipped"] == 0
    finally:
        dash.stop()
