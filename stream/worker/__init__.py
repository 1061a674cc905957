"""The streaming worker: faust agent over `utterances` -> `emotions`, `emotion-alerts`,
`conversation-summaries` (+ `utterances-dlq`), conversation state in Redis.

- app: the faust app (agent, idle timer, /metrics, /healthz, /readyz) around the batch processor;
- batch: one micro-batch (validate, load states, encode, advance, publish, save) and the idle timer;
- publisher: a batch's records in order, refused records; failures: what is retried or isolated;
- state_store: Redis (one MGET to read a batch, one fenced Lua script to write it); metrics;
- run: `emotion-monitor worker`.

The worker imports stream.core and stream.kafka, never a tool (tests/test_layout.py).
"""
