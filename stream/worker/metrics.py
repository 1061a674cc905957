"""Prometheus metrics of the worker (served on the faust web port at /metrics).

| metric | type | labels | meaning |
|---|---|---|---|
| emotion_monitor_utterances_in_total | counter | | messages consumed from the utterances topic |
| emotion_monitor_events_out_total | counter | status | emotion events published (provisional/revised/final) |
| emotion_monitor_dlq_total | counter | reason | messages dead-lettered, by error code |
| emotion_monitor_duplicates_total | counter | | redelivered messages recognised and skipped |
| emotion_monitor_alerts_total | counter | severity, kind | alert events published |
| emotion_monitor_summaries_total | counter | ended_by | conversation summaries published |
| emotion_monitor_idle_finalized_total | counter | | conversations flushed after a pause (idle timeout; they stay open) |
| emotion_monitor_retries_total | counter | error | batches retried after a Redis or broker error |
| emotion_monitor_batch_size | histogram | | messages per micro-batch |
| emotion_monitor_stage_seconds | histogram | stage | decode, redis_read, encode, step, produce, redis_write |
| emotion_monitor_redis_writable | gauge | | 1 while Redis accepts state writes, 0 while it refuses them (OOM, READONLY, ...) |
| emotion_monitor_model_info | gauge (1) | name, version, device | the model being served |
| python_gc_collections_total, python_gc_objects_collected_total | counter | generation | the cyclic GC (full collections are generation 2) |
| process_resident_memory_bytes, process_cpu_seconds_total, ... | gauge, counter | | the worker process (Linux) |
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.gc_collector import GCCollector
from prometheus_client.process_collector import ProcessCollector

STAGES = ("decode", "redis_read", "encode", "step", "produce", "redis_write")


class Metrics:
    def __init__(self) -> None:
        # A registry of our own: no process-global state, several workers per test process are fine.
        self.registry = CollectorRegistry()
        r = self.registry
        self.utterances_in = Counter("emotion_monitor_utterances_in", "messages consumed", registry=r)
        self.events_out = Counter("emotion_monitor_events_out", "emotion events published", ["status"], registry=r)
        self.dlq = Counter("emotion_monitor_dlq", "messages dead-lettered", ["reason"], registry=r)
        self.duplicates = Counter("emotion_monitor_duplicates", "redelivered messages skipped", registry=r)
        self.alerts = Counter("emotion_monitor_alerts", "alert events published", ["severity", "kind"], registry=r)
        self.summaries = Counter("emotion_monitor_summaries", "summaries published", ["ended_by"], registry=r)
        self.retries = Counter("emotion_monitor_retries", "batches retried after a Redis or broker error", ["error"], registry=r)
        self.idle_finalized = Counter("emotion_monitor_idle_finalized", "conversations flushed after a pause", registry=r)
        self.seq_gaps = Counter("emotion_monitor_seq_gaps", "missing seqs: filled (arrived within the gap wait) or "
                                "skipped (given up on; the next utterance's events carry gap: true)", ["outcome"], registry=r)
        self.model_changes = Counter("emotion_monitor_model_changes", "conversations whose state another model wrote "
                                     "(its pending utterances finalised under its id, context started over)", registry=r)
        self.fenced = Counter("emotion_monitor_fenced_writes", "state writes refused because another worker wrote the "
                              "conversation since it was read (compare-and-set on its version)", registry=r)
        self.quarantined = Counter("emotion_monitor_quarantined", "conversation states set aside because they could not be "
                                   "processed", ["reason"], registry=r)
        self.batch_size = Histogram("emotion_monitor_batch_size", "messages per micro-batch",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.stage = Histogram("emotion_monitor_stage_seconds", "time per batch stage", ["stage"],
                               buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5), registry=r)
        self.redis_writable = Gauge("emotion_monitor_redis_writable",
                                    "1 while Redis accepts state writes, 0 while it refuses them (OOM, READONLY, ...)", registry=r)
        self.redis_writable.set(1)
        self.model_info = Gauge("emotion_monitor_model_info", "the model being served", ["name", "version", "device"], registry=r)
        # The standard process and GC families (memory, CPU, full collections) that dashboards expect.
        GCCollector(registry=r)
        ProcessCollector(registry=r)

    def totals(self) -> dict[str, float]:
        """Non-zero counter values, e.g. {"events_out{status=final}": 12.0}, for the periodic log line."""
        out = {}
        for family in self.registry.collect():
            if family.type != "counter":
                continue
            for sample in family.samples:
                if sample.name.startswith("emotion_monitor_") and sample.name.endswith("_total") and sample.value:
                    labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                    name = sample.name.removeprefix("emotion_monitor_").removesuffix("_total")
                    out[f"{name}{{{labels}}}" if labels else name] = sample.value
        return dict(sorted(out.items()))

    def render(self) -> bytes:
        return generate_latest(self.registry)
