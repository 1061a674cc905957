"""The floor for `emotion-monitor bench`: a faust worker that only does the Kafka part.

    python -m stream.tools.passthrough      (configured from the environment, like `emotion-monitor worker`)

Same faust app settings as the worker (built from the same `Settings`: broker, fetch wait, group
timeouts, acks, partitions), the same micro-batching (`stream.worker.app.micro_batches`: faust's
`take_events(max_batch, within=max_wait_ms)`, the fetch wait following the backlog), the same faust
Worker (`run_app`), the same producer path (`producer_send`), the real validation of each message (`stream.core.validate.parse_message`), and one event per
utterance of the same shape and size as a real emotion event (fixed scores), published to the
emotions topic with the acks of a batch awaited together, as the worker does. No model, no Redis,
no alert rules. What this process spends per message is what Kafka I/O alone costs a faust worker;
the bench compares the real worker's CPU beyond its encoder with it (`overhead_vs_passthrough`).

The app comes from `stream.worker.app.make_app`, the factory the worker's `build_app` uses too, so
both run with the same broker, fetch, group and producer settings.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import time
from pathlib import Path
from typing import Any

from stream.core.events import encode_record, event_id
from stream.settings import Settings
from stream.core.validate import Rejected, UtteranceMessage, parse_message

log = logging.getLogger("emotion_monitor.passthrough")


def model_identity(model_path: Path) -> tuple[tuple[str, ...], dict[str, str]]:
    """Emotion labels and {name, version} of the artifact, read from its JSON files (no model loaded):
    the events carry the same label names and model fields as the real worker's."""
    try:
        labels = tuple(json.loads((Path(model_path) / "labels.json").read_text())["emotion"])
        config = json.loads((Path(model_path) / "config.json").read_text())
        return labels, {"name": str(config["name"]), "version": str(config["version"])}
    except (OSError, ValueError, KeyError):
        return ("neutral", "joy", "surprise", "anger", "sadness", "disgust", "fear"), {"name": "emotion-si-meld", "version": "0.1.0"}


def passthrough_event(item: UtteranceMessage, labels: tuple[str, ...], model: dict[str, str], now: float) -> dict[str, Any]:
    """An event with the fields and the size of a real provisional emotion event (stream.core.conversation)."""
    # Five decimals like the real scores; a fixed spread so every event has the same size.
    probs = [round(0.7 / len(labels) + 0.3 * (k == 0) + 0.01234 * (k + 1) / len(labels), 5) for k in range(len(labels))]
    return {
        "event_id": event_id(f"{model['name']}@{model['version']}", item.conversation_id, item.seq, "provisional"),
        "conversation_id": item.conversation_id,
        "seq": item.seq,
        "speaker": item.speaker,
        "role": item.role,
        "emotion": labels[0],
        "scores": dict(zip(labels, probs)),
        "status": "provisional",
        "model": model,
        "context_reset": False,
        "ts_produced": item.ts,
        "ts_received": now,
        "ts_emitted": time.time(),
    }


def build_passthrough_app(settings: Settings):
    from stream.worker.app import make_app, micro_batches, producer_send

    app = make_app(settings)
    source = app.topic(settings.utterances_topic, partitions=settings.partitions)
    send = producer_send(app)
    labels, model = model_identity(settings.model_path)

    @app.agent(source, concurrency=1)
    async def passthrough(stream):
        async for batch in micro_batches(app, stream, settings):
            now = time.time()
            acks = []
            for e in batch:
                parsed = parse_message(e.message.value, e.message.key, settings.max_message_bytes, settings.max_text_chars)
                if isinstance(parsed, UtteranceMessage):
                    acks.append(await send(settings.emotions_topic, parsed.conversation_id.encode(),
                                           encode_record(passthrough_event(parsed, labels, model, now))))
                elif isinstance(parsed, Rejected):
                    log.warning("passthrough: a message was rejected (%s)", parsed.error)
            await asyncio.gather(*acks)

    return app


def main() -> None:
    from stream.kafka import create_topics
    from stream.worker.app import run_app

    settings = Settings()
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    topics = {settings.utterances_topic: settings.partitions, settings.emotions_topic: settings.partitions}
    asyncio.run(create_topics(settings.brokers, topics, settings))
    app = build_passthrough_app(settings)
    gc.collect()
    gc.freeze()  # as the worker does after start-up
    run_app(app, settings)


if __name__ == "__main__":
    main()
