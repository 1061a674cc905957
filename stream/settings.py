"""One frozen settings object, read from the environment (prefix EMOTION_MONITOR_).

Every knob of the worker, the dashboard and the people-facing commands lives here, with its
default and the reason for it, in four sections: Kafka, Redis, worker, dashboard. The environment
variable of a field is its name in upper case after the prefix (`emotion-monitor settings` lists
them; docs/configuration.md holds the table). What the Kafka fields mean for a client (bootstrap
list, security options, faust credentials) is decided in stream/kafka.py.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from model.config import DEFAULT_MODEL


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EMOTION_MONITOR_", frozen=True, extra="ignore")

    # ---- Kafka ------------------------------------------------------------------------
    brokers: str = Field("kafka://127.0.0.1:9092", description="Kafka bootstrap servers, comma separated (kafka://host:port)")
    app_id: str = Field("emotion-monitor", description="faust app id = Kafka consumer group")
    utterances_topic: str = Field("utterances", description="input topic, key = conversation id")
    emotions_topic: str = Field("emotions", description="output topic for emotion events")
    dlq_topic: str = Field("utterances-dlq", description="dead-letter topic: original bytes + reason")
    alerts_topic: str = Field("emotion-alerts", description="alert events (rule hits, recoveries)")
    summaries_topic: str = Field("conversation-summaries", description="one summary event per ended conversation")
    partitions: int = Field(4, ge=1, description="partitions of the topics the worker creates")
    # faust hard-codes 1500 ms; Tansu (the embedded broker) waits the full interval before
    # answering a fetch, which made produce->event latency ~625 ms. 10 ms gives tens of ms.
    fetch_max_wait_ms: int = Field(10, ge=0, le=5000, description="consumer fetch wait (faust's hard-coded 1500 ms is overridden)")
    # Kafka security: PLAINTEXT (default), SSL, SASL_PLAINTEXT or SASL_SSL.
    kafka_security_protocol: str = Field("PLAINTEXT", pattern="^(PLAINTEXT|SSL|SASL_PLAINTEXT|SASL_SSL)$",
                                         description="Kafka security protocol")
    kafka_sasl_mechanism: str = Field("PLAIN", pattern="^(PLAIN|SCRAM-SHA-256|SCRAM-SHA-512)$",
                                      description="SASL mechanism when the protocol is SASL_*")
    kafka_sasl_username: str | None = Field(None, description="SASL username")
    kafka_sasl_password: SecretStr | None = Field(None, description="SASL password (never logged)")
    kafka_ssl_cafile: Path | None = Field(None, description="CA bundle for SSL/SASL_SSL (default: the system's)")
    session_timeout_s: float = Field(10.0, gt=0, description="consumer group session timeout")
    heartbeat_interval_s: float = Field(1.0, gt=0, description="consumer group heartbeat interval")
    rebalance_timeout_s: float = Field(10.0, gt=0, description="consumer group rebalance timeout")
    # ---- Redis ------------------------------------------------------------------------
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Redis for conversation state")
    redis_password: SecretStr | None = Field(None, description="Redis AUTH password (never logged); TLS: use a rediss:// URL")
    state_ttl_s: int = Field(86400, ge=1, description="idle conversations' state expires after this (longer than the abandonment timeout); ended ones keep a small tombstone as long")
    # The model part of a stored state has two formats (model/streaming.py): 2, compact (the
    # default), and 1, what workers before the compact one read and write. New workers read both;
    # old ones read only 1. A rolling upgrade sets 1 on the new workers while old ones still run
    # (CHANGELOG.md), then drops it.
    state_format: int = Field(2, ge=1, le=2, description="format of the model part of stored states: 2 (compact, default) or 1 (readable by workers older than 2; for a rolling upgrade, then remove)")
    # ---- worker: model and streaming semantics ----------------------------------------
    model_path: Path = Field(DEFAULT_MODEL, description="trained artifact folder")
    device: str = Field("auto", description="torch device: auto, cpu, cuda")
    backend: str = Field("auto", pattern="^(auto|eager|compile|tensorrt|onnx|onnx-int8)$",
                         description="encoder backend: auto (CUDA: tensorrt > compile; CPU: onnx-int8 for a model that ships its calibration, as the MELD models do, else onnx > eager), eager, compile, tensorrt, onnx (float32), onnx-int8 (~2x the encoder's speed; needs the model's calibration, `emotion-monitor calibrate`)")
    # Idleness is measured in event time (Kafka message timestamps of the partition), see
    # stream/core/conversation.py PartitionClock: a worker catching up on a backlog does not flush.
    idle_finalize_s: float = Field(30.0, gt=0, description="a conversation quiet this long (event time) gets its pending utterances finalised; it stays open")
    abandon_after_s: float = Field(1800.0, gt=0, description="a conversation with no utterance for this long (event time) ends: pending finals, then its summary (ended_by abandoned)")
    # Seq gaps (docs/architecture.md, "Seq gaps"): utterances after a missing seq wait this long (event time) for
    # it, then are scored with gap: true on their events; shorter than the idle timeout.
    gap_wait_s: float | None = Field(None, ge=0, description="utterances after a missing seq wait this long (event time) for it, then are scored with gap: true (default: 5 s, at most half the idle timeout)")
    rules_path: Path | None = Field(None, description="alert rules TOML (default: the shipped stream/rules/default.toml)")
    torch_threads: int = Field(0, ge=0, description="intra-op threads for the model (0 = torch's default: one per core)")
    # A worker shares its cores with its Kafka and Redis clients (and, locally, the broker):
    # OpenMP threads spinning between batches cost latency. Measured with `bench` here:
    # p99 at half the sustained rate 180 ms (spinning) vs 135 ms (passive), throughput 182 vs 168 utt/s.
    omp_wait_policy: str = Field("PASSIVE", pattern="^(PASSIVE|ACTIVE)$",
                                 description="OpenMP wait policy of the worker process (unless OMP_WAIT_POLICY is set)")
    # ---- worker: batching (one encoder call per batch) --------------------------------
    max_batch: int = Field(64, ge=1, description="utterances per micro-batch at most")
    max_wait_ms: float = Field(5.0, ge=0, description="how long a batch waits to fill up")
    max_batch_tokens: int = Field(4096, ge=64, description="padded tokens per encoder call at most (length-sorted groups)")
    # ---- worker: input limits and privacy ---------------------------------------------
    max_text_chars: int = Field(4000, ge=1, description="longer texts go to the DLQ")
    max_message_bytes: int = Field(64_000, ge=1, description="larger messages go to the DLQ")
    # A dead letter carries the original bytes up to this size (then a prefix, the size and a
    # SHA-256): base64 of a 1 MB message would exceed the producer's 1 MB request limit.
    dlq_max_bytes: int = Field(65_536, ge=0, le=512_000,
                               description="original bytes a dead letter carries at most (beyond: a prefix, with the size and SHA-256)")
    echo_text: bool = Field(False, description="copy the utterance text into emotion events (personal data)")
    # ---- worker: web port and logs -----------------------------------------------------
    web_port: int = Field(6066, ge=0, description="faust web port of the worker (/metrics, /healthz, /readyz)")
    web_host: str = Field("127.0.0.1", description="bind address of the worker's web port (0.0.0.0 in containers)")
    log_level: str = Field("info", description="worker log level")
    # ---- dashboard ----------------------------------------------------------------------
    dashboard_host: str = Field("127.0.0.1", description="dashboard bind address")
    dashboard_port: int = Field(8088, ge=0, description="dashboard HTTP port")
    # DNS rebinding: a page on an attacker's domain that resolves to 127.0.0.1 could read the
    # dashboard; requests whose Host header is not one of these names are refused (421).
    dashboard_allowed_hosts: str = Field("127.0.0.1,localhost,[::1]",
                                         description="Host header names the dashboard answers, comma separated (against DNS rebinding; its bind address is always allowed; * allows any)")

    @model_validator(mode="after")
    def _check_together(self) -> "Settings":
        """Settings that only make sense together, checked at start-up: a bad combination stops
        the worker with a sentence that says what to change."""
        problems = []
        if self.abandon_after_s <= self.idle_finalize_s:
            problems.append(f"EMOTION_MONITOR_ABANDON_AFTER_S ({self.abandon_after_s:g}) must be longer than "
                            f"EMOTION_MONITOR_IDLE_FINALIZE_S ({self.idle_finalize_s:g}): a pause flushes a "
                            "conversation, only a much longer silence ends it")
        if self.state_ttl_s <= self.abandon_after_s:
            problems.append(f"EMOTION_MONITOR_STATE_TTL_S ({self.state_ttl_s}) must be longer than EMOTION_MONITOR_ABANDON_AFTER_S "
                            f"({self.abandon_after_s:g}): a state that expires first is never abandoned (no summary, no finals "
                            "for its pending utterances)")
        if self.gap_wait_s is not None and self.gap_wait_s >= self.idle_finalize_s:
            problems.append(f"EMOTION_MONITOR_GAP_WAIT_S ({self.gap_wait_s:g}) must be shorter than EMOTION_MONITOR_IDLE_FINALIZE_S "
                            f"({self.idle_finalize_s:g}): utterances waiting for a missing seq are applied before a pause is flushed")
        if problems:
            raise ValueError("settings that do not go together: " + "; ".join(problems))
        return self

    @property
    def gap_wait(self) -> float:
        """The gap wait in effect: the setting, else 5 s but at most half the idle timeout."""
        return self.gap_wait_s if self.gap_wait_s is not None else min(5.0, self.idle_finalize_s / 2)

    @property
    def broker_list(self) -> list[str]:
        return [b.strip() for b in self.brokers.split(",") if b.strip()]

    def __repr__(self) -> str:  # pydantic already masks SecretStr; this keeps it short in logs
        return f"Settings(brokers={self.brokers!r}, app_id={self.app_id!r}, model_path={str(self.model_path)!r})"


def load_settings(**overrides) -> Settings:
    return Settings(**overrides)
