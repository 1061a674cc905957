"""The real worker with its encoder stubbed out, for `emotion-monitor bench`.

    python -m stream.tools.stubworker      (configured from the environment, like `emotion-monitor worker`)

Everything but the encoder is the worker's own: the faust app and its micro-batching, validation,
the Redis state store, the model's streaming step, the events and alert rules, the producer. Only
`Scorer.encode` is replaced: it returns, for each text, one of a fixed table of unit vectors of the
model's width, picked by a CRC of the text (microseconds per utterance, no tokenizer). So the CPU
this process spends per utterance is the worker's overhead beyond its encoder measured directly,
where `worker_overhead_core_ms_per_utt` subtracts a separately timed encoder from the real worker's
CPU (a difference of two large figures, which the machine's noise moves by tens of percent). Its
rate is what one worker process could sustain with a free encoder (the limit on a GPU host).

Its events carry made-up emotions: this is a benchmark, never a worker to deploy.
"""

from __future__ import annotations

import functools
import logging
import zlib
from collections.abc import Sequence

import numpy as np

log = logging.getLogger("emotion_monitor.stubworker")

STUB_ROWS = 256


def stub_vectors(dim: int, rows: int = STUB_ROWS, seed: int = 0) -> np.ndarray:
    """(rows, dim) float32 unit vectors, the same for a given seed."""
    table = np.random.default_rng(seed).standard_normal((rows, dim)).astype(np.float32)
    return table / np.linalg.norm(table, axis=1, keepdims=True)


def stub_encoder(dim: int, rows: int = STUB_ROWS):
    """An `encode(texts) -> (len(texts), dim)` that looks each text's vector up by its CRC-32."""
    table = stub_vectors(dim, rows)

    def encode(texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, dim), dtype=np.float32)
        idx = np.fromiter((zlib.crc32(t.encode()) % rows for t in texts), dtype=np.int64, count=len(texts))
        return table[idx]

    return encode


def main() -> None:
    from model.scorer import Scorer
    from stream.settings import Settings
    from stream.worker.run import run_worker

    class StubScorer(Scorer):
        """The real Scorer (model, step, labels) whose `encode` is the stub."""

        @functools.cached_property
        def _stub(self):
            return stub_encoder(self.model.encoder.dim)

        def encode(self, texts: Sequence[str]) -> np.ndarray:
            return self._stub(texts)

    log.warning("encoder stubbed out: events carry made-up emotions (benchmark only)")
    run_worker(Settings(), scorer_type=StubScorer)


if __name__ == "__main__":
    main()
