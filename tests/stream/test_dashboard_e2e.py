"""End to end as a supervisor sees it: local stack + a worker with the shipped MELD model + the
dashboard + headless Chromium. The bundled escalation call is replayed; the page must show its
utterances (final verdicts) and the alert the worker raised. A screenshot is saved."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import pytest

from stream.tools.replay import SAMPLE, load_messages
from tests.stream.test_dashboard_browser import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS, DashboardThread, _free_port, sync_api
from tests.stream.worker_harness import WorkerProcess, collect, produce, run, unique_names, worker_env

pytestmark = [pytest.mark.browser, pytest.mark.integration, pytest.mark.slow]


def off_thread(make_coro):
    """Playwright's sync API keeps an event loop running in this thread: run ours in another."""
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(lambda: run(make_coro())).result(300)
SHIPPED = Path(__file__).resolve().parents[2] / "model" / "weights" / "meld-small"


def test_replayed_escalation_shows_events_and_an_alert(stack, tmp_path):
    from stream.kafka import create_topics
    from stream.settings import Settings

    names = unique_names()
    run(create_topics(stack.bootstrap, {names[k]: 2 for k in ("utterances", "emotions", "alerts", "summaries")} | {names["dlq"]: 1}))
    tag = uuid.uuid4().hex[:6]
    msgs = [{**m, "conversation_id": f"call-1042-{tag}"} for m in load_messages(SAMPLE) if m["conversation_id"] == "call-1042"]
    cid = msgs[0]["conversation_id"]
    n_utts = sum(1 for m in msgs if m.get("type", "utterance") == "utterance")
    worker = WorkerProcess(worker_env(stack, SHIPPED, names), tmp_path / "worker.log")
    settings = Settings(brokers=f"kafka://{stack.bootstrap}", emotions_topic=names["emotions"],
                        alerts_topic=names["alerts"], summaries_topic=names["summaries"])
    dash = DashboardThread(settings, "127.0.0.1", _free_port()).start()
    try:
        worker.wait_ready()
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1366, "height": 768})
                page.goto(dash.url)
                expect = sync_api.expect
                off_thread(lambda: produce(stack.bootstrap, names["utterances"], msgs, pause_s=0.05))
                alerts = off_thread(lambda: collect(stack.bootstrap, names["alerts"], lambda r: any(a["kind"] == "raised" for a in r), 120))
                raised = [a for a in alerts if a["kind"] == "raised"]
                assert raised, "the shipped model raised no alert on the escalation call:\n" + worker.tail()
                expect(page.get_by_test_id(f"conv-{cid}")).to_be_visible(timeout=60_000)
                page.get_by_test_id(f"conv-{cid}").click()
                for seq in range(n_utts):
                    expect(page.get_by_test_id(f"cell-{cid}-{seq}")).to_have_attribute("data-status", "final", timeout=60_000)
                alert_item = page.get_by_test_id(f"alert-{raised[0]['alert_id']}")
                expect(alert_item).to_be_visible(timeout=30_000)
                expect(alert_item).to_contain_text(raised[0]["reason"][:40])
                expect(page.get_by_test_id(f"summary-{cid}")).to_be_visible(timeout=30_000)
                shot = tmp_path / "dashboard-e2e.png"
                page.screenshot(path=str(shot), full_page=True)
                ARTIFACTS.mkdir(exist_ok=True)
                shutil.copy(shot, ARTIFACTS / "dashboard-e2e.png")
            finally:
                browser.close()
    finally:
        dash.stop()
        worker.stop()
