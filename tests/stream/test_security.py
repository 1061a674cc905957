"""Redis AUTH against a real password-protected redis-server; secrets stay out of logs."""

from __future__ import annotations

import subprocess
import sys

import pytest

from stream import kafka
from stream.kafka import create_topics, faust_credentials, security_options

from stream.tools.localstack import start_redis, stop_process
from stream.settings import Settings
from tests.stream.test_worker_integration import conversation, end, finals_of
from tests.stream.worker_harness import WorkerProcess, collect, produce, run, unique_names, worker_env

SECRET = "s3cr3t-Pa55-for-test"


def test_settings_never_print_secrets(monkeypatch):
    monkeypatch.setenv("EMOTION_MONITOR_REDIS_PASSWORD", SECRET)
    monkeypatch.setenv("EMOTION_MONITOR_KAFKA_SASL_PASSWORD", SECRET)
    s = Settings()
    assert s.redis_password.get_secret_value() == SECRET
    assert SECRET not in repr(s) and SECRET not in str(s.model_dump())
    out = subprocess.run([sys.executable, "-m", "stream.cli", "settings"], capture_output=True, text=True, check=True).stdout
    assert "EMOTION_MONITOR_REDIS_PASSWORD" in out and SECRET not in out


def test_sasl_settings_build_faust_credentials():
    creds = faust_credentials(Settings(kafka_security_protocol="SASL_SSL", kafka_sasl_mechanism="SCRAM-SHA-512",
                     kafka_sasl_username="monitor", kafka_sasl_password=SECRET))
    assert creds.username == "monitor" and creds.mechanism.value == "SCRAM-SHA-512" and creds.ssl_context is not None
    with pytest.raises(ValueError, match="SASL_USERNAME"):
        faust_credentials(Settings(kafka_security_protocol="SASL_PLAINTEXT"))
    assert faust_credentials(Settings()) is None


def test_security_settings_reach_the_plain_kafka_clients_too():
    """Topic creation at start-up, replay, watch, the dashboard and the tools build their clients in
    stream.kafka: they get the same protocol and credentials as the worker's faust app (aiokafka
    validates them when the factory builds each client)."""
    assert security_options(Settings()) == {} and security_options(None) == {}
    secure = Settings(kafka_security_protocol="SASL_SSL", kafka_sasl_mechanism="SCRAM-SHA-256",
                      kafka_sasl_username="monitor", kafka_sasl_password=SECRET)
    opts = security_options(secure)
    assert opts["security_protocol"] == "SASL_SSL" and opts["sasl_plain_password"] == SECRET and opts["ssl_context"]

    async def build():  # constructors only: nothing connects
        return (kafka.producer("kafka://localhost:1", secure), kafka.consumer("t", bootstrap="localhost:1", settings=secure),
                kafka.admin("localhost:1", secure))

    producer, consumer, admin = run(build())
    assert producer.client._security_protocol == "SASL_SSL" and producer.client._sasl_plain_password == SECRET
    assert consumer._client._sasl_mechanism == "SCRAM-SHA-256" and consumer._client._ssl_context is not None
    assert admin._client._security_protocol == "SASL_SSL"
    assert producer.client._bootstrap_servers == "localhost:1"  # kafka:// stripped in one place
    assert set(security_options(Settings(kafka_security_protocol="SSL"))) == {"security_protocol", "ssl_context"}
    with pytest.raises(ValueError, match="SASL_USERNAME"):
        security_options(Settings(kafka_security_protocol="SASL_PLAINTEXT"))


def test_bootstrap_servers_strip_the_faust_scheme():
    assert kafka.bootstrap_servers("kafka://a:1, kafka://b:2") == "a:1,b:2"
    assert kafka.bootstrap_servers(["kafka://a:1", "b:2", " "]) == "a:1,b:2"
    assert kafka.bootstrap_servers("a:1") == "a:1"


@pytest.mark.integration
def test_worker_uses_redis_auth_and_keeps_the_password_out_of_its_log(stack, tiny_artifact, tmp_path):
    names = unique_names()
    run(create_topics(stack.bootstrap, {names["utterances"]: 3, names["emotions"]: 3, names["dlq"]: 1}))
    redis_proc, port = start_redis(tmp_path / "redis", password=SECRET)
    env = worker_env(stack, tiny_artifact, names, redis_url=f"redis://127.0.0.1:{port}/0", redis_password=SECRET,
                     log_level="debug")
    w = WorkerProcess(env, tmp_path / "w.log")
    try:
        w.wait_ready()
        run(produce(stack.bootstrap, names["utterances"], conversation("auth-1", 3) + [end("auth-1")]))
        events = run(collect(stack.bootstrap, names["emotions"], lambda ev: len(finals_of(ev, {"auth-1"})) >= 3, 90))
    finally:
        w.stop()
        stop_process(redis_proc)
    assert len(finals_of(events, {"auth-1"})) == 3, w.tail()
    log = w.log.read_text()
    assert SECRET not in log
    # transcript text stays out of the log, even at debug level
    assert not any(m["text"] in log for m in conversation("auth-1", 3))


def test_dashboard_refuses_unknown_host_headers_against_dns_rebinding():
    """Item 12: a page on another domain resolving to 127.0.0.1 reaches the dashboard with its own
    name in the Host header; only the configured names (default: localhost's) are answered."""
    import asyncio

    import aiohttp

    from stream.dashboard.server import DashboardServer

    async def go(settings):
        server = await DashboardServer(settings, "127.0.0.1", 0, consume=False).start()
        out = {}
        try:
            async with aiohttp.ClientSession() as http:
                for host in ("127.0.0.1", "localhost", "LOCALHOST", "[::1]", "evil.example", "attacker.test:8088", ""):
                    hdr = {"Host": f"{host}:{server.port}" if host and ":" not in host else host}
                    async with http.get(f"http://127.0.0.1:{server.port}/api/state", headers=hdr) as r:
                        out[host] = r.status
                async with http.get(f"http://127.0.0.1:{server.port}/healthz", headers={"Host": "10.1.2.3:8088"}) as r:
                    out["probe"] = r.status  # a Kubernetes probe by pod address
        finally:
            await server.stop()
        return out

    got = asyncio.run(go(Settings()))
    assert got == {"127.0.0.1": 200, "localhost": 200, "LOCALHOST": 200, "[::1]": 200, "evil.example": 421,
                   "attacker.test:8088": 421, "": 421, "probe": 200}
    got = asyncio.run(go(Settings(dashboard_allowed_hosts="board.example.com")))
    assert got["evil.example"] == 421 and got["127.0.0.1"] == 200 and got["localhost"] == 421
    got = asyncio.run(go(Settings(dashboard_allowed_hosts="*")))
    assert got["evil.example"] == 200


def test_unknown_message_types_are_not_quoted_in_logs_or_reasons(stack, caplog):
    """Item 12: a producer's 'type' value (up to the message size limit) never reaches a log line."""
    import asyncio
    import json
    import logging

    from stream.core.validate import Rejected, parse_message
    from tests.stream.test_state_fencing import _processor

    marker = "PRODUCER-TEXT-" + "x" * 5000
    value = json.dumps({"conversation_id": "c", "type": marker, "seq": 0, "speaker": "s", "text": "hi"}).encode()
    got = parse_message(value, b"c", 64_000, 4000)
    assert isinstance(got, Rejected) and got.error == "wrong_type" and "PRODUCER-TEXT" not in got.reason
    s, proc, sent = _processor(stack, "unknown-type-log")

    async def go():
        with caplog.at_level(logging.DEBUG):
            await proc.process([(b"c", value, 0, 0), (b"c", b'{"conversation_id": "c", "text": "PRODUCER-TEXT-2"}', 0, 1)])
        await proc.store.r.aclose()

    asyncio.run(go())
    assert [d["error"] for t, d in sent if t == s.dlq_topic] == ["wrong_type", "missing_field"]
    assert "PRODUCER-TEXT" not in caplog.text and "dead-lettered" in caplog.text
