"""The monitor's logic, pure: no Kafka, no Redis, no faust (tests/test_layout.py keeps it so).

- validate: raw message bytes -> an utterance, an end, or why it is rejected;
- conversation: a batch of inputs -> new conversation states and what to publish;
- rules, monitor, trajectory, risk, summary: the alert rules over final events, the summary;
- events: ids and encoding every output record shares; codec: the stored state's bytes;
- frozen: `evolve`, a cheap `dataclasses.replace` for the core's frozen records;
- contract: the JSON Schemas of the topics.
"""
