"""Redis AUTH against a real password-protected redis-server; secrets stay out of logs."""

from __future__ import annotations

import subprocess
import sys

import pytest

from stream.localstack import create_topics, start_redis, stop_process
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
    creds = Settings(kafka_security_protocol="SASL_SSL", kafka_sasl_mechanism="SCRAM-SHA-512",
                     kafka_sasl_username="monitor", kafka_sasl_password=SECRET).faust_credentials()
    assert creds.username == "monitor" and creds.mechanism.value == "SCRAM-SHA-512" and creds.ssl_context is not None
    with pytest.raises(ValueError, match="SASL_USERNAME"):
        Settings(kafka_security_protocol="SASL_PLAINTEXT").faust_credentials()
    assert Settings().faust_credentials() is None


def test_security_settings_reach_the_plain_kafka_clients_too():
    """Topic creation at start-up, replay, watch and the dashboard use aiokafka directly: they get
    the same protocol and credentials as the worker's faust app (aiokafka validates them here)."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
    from aiokafka.admin import AIOKafkaAdminClient

    assert Settings().kafka_client_options() == {}
    opts = Settings(kafka_security_protocol="SASL_SSL", kafka_sasl_mechanism="SCRAM-SHA-256",
                    kafka_sasl_username="monitor", kafka_sasl_password=SECRET).kafka_client_options()
    assert opts["security_protocol"] == "SASL_SSL" and opts["sasl_plain_password"] == SECRET and opts["ssl_context"]

    async def build():  # constructors only: nothing connects
        AIOKafkaProducer(bootstrap_servers="localhost:1", **opts)
        AIOKafkaConsumer("t", bootstrap_servers="localhost:1", **opts)
        AIOKafkaAdminClient(bootstrap_servers="localhost:1", **opts)

    run(build())
    assert set(Settings(kafka_security_protocol="SSL").kafka_client_options()) == {"security_protocol", "ssl_context"}
    with pytest.raises(ValueError, match="SASL_USERNAME"):
        Settings(kafka_security_protocol="SASL_PLAINTEXT").kafka_client_options()


@pytest.mark.integration
def test_worker_uses_redis_auth_and_keeps_the_password_out_of_its_log(stack, tiny_artifact, tmp_path):
    names = unique_names()
    run(create_topics(stack.bootstrap, {names["utterances"]: 3, names["emotions"]: 3, names["dlq"]: 1}))
    redis_proc, port = start_redis(tmp_path / "redis", password=SECRET)
    env = worker_env(stack, tiny_artifact, names, redis_url=f"redis://127.0.0.1:{port}/0", redis_password=SECRET,
                     log_level="debug")
    w = WorkerProcess(env, tmp_path / "w.log")
    try:
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
