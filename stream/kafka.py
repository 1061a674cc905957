"""Every Kafka client of the project is built here: producers, consumers, admin clients, topics.

One owner for the Kafka policy, so the worker, the tools, the dashboard and the tests cannot drift:

* bootstrap strings: settings name brokers as faust URLs (`kafka://host:port`); plain aiokafka
  clients want `host:port`. `bootstrap_servers` is the one place the scheme is stripped; every
  factory below accepts either form.
* security: the protocol, SASL credentials and CA bundle of `Settings` (`security_options`),
  the same for the worker's faust app (`faust_credentials`) and every plain client.
* defaults that suit both a real cluster and the local broker (Tansu): producers without
  idempotence (Tansu lacks InitProducerId v0); consumers without a group, from the earliest
  offset (Tansu answers ListOffsets "latest" wrongly, and the start also shows the calls already
  under way), with a short fetch wait (Tansu waits out the whole interval before answering).
  Any default can be overridden per call.
* topic creation (`create_topics`): faust does not create source topics, and Tansu auto-creates
  with 4 partitions whatever the settings say.

aiokafka is imported inside the functions: `emotion-monitor --help` stays instant.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from stream.settings import Settings

PRODUCER_DEFAULTS: dict[str, Any] = {"enable_idempotence": False}
CONSUMER_DEFAULTS: dict[str, Any] = {"group_id": None, "auto_offset_reset": "earliest", "enable_auto_commit": False,
                                     "fetch_max_wait_ms": 100}
ADMIN_DEFAULTS: dict[str, Any] = {"request_timeout_ms": 10_000}


def bootstrap_servers(brokers: str | Iterable[str]) -> str:
    """'kafka://a:9092,b:9092' (or a list of such URLs, or plain host:port) -> 'a:9092,b:9092'."""
    items = brokers.split(",") if isinstance(brokers, str) else list(brokers)
    return ",".join(b.strip().split("://", 1)[-1] for b in items if b.strip())


def security_options(settings: Settings | None) -> dict[str, Any]:
    """aiokafka keyword arguments for the settings' protocol and credentials ({} for PLAINTEXT or
    no settings). Raises ValueError when a SASL protocol lacks its username or password."""
    import ssl

    proto = settings.kafka_security_protocol if settings is not None else "PLAINTEXT"
    if proto == "PLAINTEXT":
        return {}
    opts: dict[str, Any] = {"security_protocol": proto}
    if proto in ("SSL", "SASL_SSL"):
        cafile = str(settings.kafka_ssl_cafile) if settings.kafka_ssl_cafile else None
        opts["ssl_context"] = ssl.create_default_context(cafile=cafile)
    if proto.startswith("SASL"):
        if not settings.kafka_sasl_username or settings.kafka_sasl_password is None:
            raise ValueError(f"{proto} needs EMOTION_MONITOR_KAFKA_SASL_USERNAME and EMOTION_MONITOR_KAFKA_SASL_PASSWORD")
        opts.update(sasl_mechanism=settings.kafka_sasl_mechanism, sasl_plain_username=settings.kafka_sasl_username,
                    sasl_plain_password=settings.kafka_sasl_password.get_secret_value())
    return opts


def faust_credentials(settings: Settings):
    """The same security for the worker's faust app (None = plaintext)."""
    import faust

    opts = security_options(settings)
    if not opts:
        return None
    if opts["security_protocol"] == "SSL":
        return faust.SSLCredentials(opts["ssl_context"])
    return faust.SASLCredentials(username=opts["sasl_plain_username"], password=opts["sasl_plain_password"],
                                 mechanism=opts["sasl_mechanism"], ssl_context=opts.get("ssl_context"))


def _arguments(bootstrap: str, settings: Settings | None, defaults: dict[str, Any], options: dict[str, Any]) -> dict:
    return {"bootstrap_servers": bootstrap_servers(bootstrap), **defaults, **security_options(settings), **options}


def producer(bootstrap: str, settings: Settings | None = None, **options):
    """An (unstarted) AIOKafkaProducer; `settings` brings the security options, `options` override
    the defaults (PRODUCER_DEFAULTS)."""
    from aiokafka import AIOKafkaProducer

    return AIOKafkaProducer(**_arguments(bootstrap, settings, PRODUCER_DEFAULTS, options))


def consumer(*topics: str, bootstrap: str, settings: Settings | None = None, **options):
    """An (unstarted) AIOKafkaConsumer of `topics` (CONSUMER_DEFAULTS unless overridden)."""
    from aiokafka import AIOKafkaConsumer

    return AIOKafkaConsumer(*topics, **_arguments(bootstrap, settings, CONSUMER_DEFAULTS, options))


def admin(bootstrap: str, settings: Settings | None = None, **options):
    """An (unstarted) AIOKafkaAdminClient (ADMIN_DEFAULTS unless overridden)."""
    from aiokafka.admin import AIOKafkaAdminClient

    return AIOKafkaAdminClient(**_arguments(bootstrap, settings, ADMIN_DEFAULTS, options))


def monitor_topics(settings: Settings) -> dict[str, int]:
    """The topics the worker reads and writes, each with the configured partitions."""
    names = (settings.utterances_topic, settings.emotions_topic, settings.alerts_topic, settings.summaries_topic,
             settings.dlq_topic)
    return dict.fromkeys(names, settings.partitions)


async def create_topics(bootstrap: str, topics: dict[str, int], settings: Settings | None = None) -> None:
    """Create topics (name -> partitions, replication 1); topics that already exist are left as is."""
    if not topics:
        return
    from aiokafka.admin import NewTopic
    from aiokafka.errors import TopicAlreadyExistsError, for_code

    client = admin(bootstrap, settings)
    await client.start()
    try:
        resp = await client.create_topics(
            [NewTopic(name, num_partitions=n, replication_factor=1) for name, n in topics.items()])
        # Errors come back per topic in the response rather than as an exception.
        for name, code, *_ in resp.topic_errors:
            if code and for_code(code) is not TopicAlreadyExistsError:
                raise for_code(code)(f"creating topic {name!r}")
    finally:
        await client.close()
