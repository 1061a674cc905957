"""`emotion-monitor worker`: load the model, make sure the topics exist, run the faust worker."""

from __future__ import annotations

import asyncio
import gc
import logging
import os

from stream.settings import Settings

log = logging.getLogger("emotion_monitor.worker")


def run_worker(settings: Settings, scorer_type: type | None = None) -> None:
    """Load the model, make sure the topics exist, then hand over to faust's worker.
    `scorer_type`: a Scorer subclass instead of Scorer (the bench's stubbed encoder)."""
    from model.scorer import Scorer
    from stream.kafka import create_topics, monitor_topics
    from stream.worker.app import build_app, run_app

    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # First line of the log: a worker still loading the model is told apart from one that hangs.
    log.info("starting (pid %d): loading the model on %s", os.getpid(), settings.device)
    if settings.torch_threads:
        import torch

        torch.set_num_threads(settings.torch_threads)
    scorer = (scorer_type or Scorer)(settings.model_path, settings.device, settings.backend, settings.max_batch, settings.max_batch_tokens)
    log.info("model %s on %s, encoder backend %s (lookahead %d, window %d)", scorer.model_id, scorer.device,
             scorer.backend, scorer.lookahead, scorer.window)
    asyncio.run(create_topics(settings.brokers, monitor_topics(settings), settings))
    app = build_app(settings, scorer)
    # torch, transformers and faust leave ~440k long-lived objects to the cyclic garbage
    # collector; a full collection walked them all and stalled the worker for 280-330 ms (measured
    # under load), right in the latency tail. Frozen after start-up, they are skipped: a full
    # collection under load then took 4 ms.
    gc.collect()
    gc.freeze()
    run_app(app, settings)
