"""The worker's step path with the encoder stubbed out: utterances per second for one micro-batch.

What a worker does per micro-batch besides Kafka I/O, Redis round trips and the encoder:
  1. decode the batch's conversation states from their stored bytes (`stream.core.codec.decode_state`),
  2. `stream.core.conversation.advance_conversations`: admission, per-conversation bookkeeping, the model step
     (`model.streaming.step`: party ids, window assembly, forward GRU, backward GRUs and
     cross-attention over the window) and the events and alert rules,
  3. encode the new states to bytes (`stream.core.codec.encode_state`).
Here every conversation is at the same position (past a full window), the utterance vectors are
precomputed random ones (the encoder's output shape), and the batch holds one utterance per
conversation, as a worker batch over many interleaved conversations does. The rate is what caps
a worker whose encoder is free (a GPU): compare it with the encoder's own rate at the same batch.

Used by `emotion-monitor bench` (CPU, `path_utt_per_s_b64` / `_b256`) and `python -m
stream.tools.gpucheck` (CUDA, next to the encoder rates).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from model.streaming import step as model_step_fn
from stream.core.codec import decode_state, encode_state
from stream.core.conversation import ConversationConfig, ConversationState, advance_conversations
from stream.core.validate import UtteranceMessage

PATH_STAGES = ("decode", "model_step", "events", "encode")


@dataclass(frozen=True)
class PathRate:
    batch: int
    utt_per_s: float
    ms_per_batch: float
    repeats: int
    # Mean ms per batch in each part: state decode, model step (streaming.step), the rest of
    # advance_conversations (admission, bookkeeping, events, alert rules), state encode.
    stages_ms: dict[str, float] = field(default_factory=dict)


def default_step(model) -> Callable:
    """`model.streaming.step` bound to `model` the way the worker calls it: on CPU with one intra-op
    thread (the worker's Scorer.step does the same; the step's ops are too small for two)."""
    device = next(model.parameters()).device

    def run(states, vectors, speakers):
        if device.type != "cpu":
            return model_step_fn(model, states, vectors, speakers)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return model_step_fn(model, states, vectors, speakers)
        finally:
            torch.set_num_threads(threads)

    return run


def _bench_utterance(cid: str, seq: int) -> UtteranceMessage:
    return UtteranceMessage(cid, seq, f"{cid}-s{seq % 2}", "customer" if seq % 2 == 0 else "agent", "x", None, f"d{seq}")


def prepared_states(cfg: ConversationConfig, model_step: Callable, dim: int, batch: int, position: int,
                    rng: np.random.Generator) -> dict[str, bytes]:
    """`batch` conversations stepped `position` times (random vectors), as stored bytes."""
    convs: dict[str, ConversationState | None] = {f"path-{i}": None for i in range(batch)}
    for seq in range(position):
        inputs = [_bench_utterance(cid, seq) for cid in convs]
        vectors = rng.standard_normal((batch, dim)).astype(np.float32)
        convs, _ = advance_conversations(cfg, model_step, convs, inputs, vectors, 0.0)
    return {cid: encode_state(conv) for cid, conv in convs.items()}


def path_rate(model, batch: int, *, labels: Sequence[str] | None = None, model_id: str = "bench@0",
              rules: tuple = (), model_step: Callable | None = None, position: int | None = None,
              seconds: float = 2.0, min_repeats: int = 3, seed: int = 0) -> PathRate:
    """Utterances per second of the step path for a batch of `batch` conversations (one new
    utterance each), the encoder stubbed out: decode states + advance_conversations + encode states.

    `model` sits on the device to measure (CPU or CUDA); `model_step` defaults to
    `model.streaming.step` bound to it (`default_step`); `rules` are the alert rules
    (`stream.core.rules.load_rules`), () for none; `position` is where every conversation stands
    (default: window + 4, past a full window, so the window is at its bounded size)."""
    cfg_m = model.cfg
    labels = tuple(labels or cfg_m.emotion_labels)
    step_fn = model_step or default_step(model)
    cfg = ConversationConfig(labels, model_id, cfg_m.window, False, tuple(rules))
    dim = model.encoder.dim
    rng = np.random.default_rng(seed)
    position = cfg_m.window + 4 if position is None else position
    blobs = prepared_states(cfg, step_fn, dim, batch, position, rng)
    inputs = [_bench_utterance(cid, position) for cid in blobs]
    vectors = rng.standard_normal((batch, dim)).astype(np.float32)  # precomputed: the encoder is stubbed
    in_step = [0.0]

    def timed_step(states, vecs, speakers):
        t = time.perf_counter()
        try:
            return step_fn(states, vecs, speakers)
        finally:
            in_step[0] += time.perf_counter() - t

    def once(sums: dict[str, float]) -> None:
        in_step[0] = 0.0
        t0 = time.perf_counter()
        convs = {cid: decode_state(b) for cid, b in blobs.items()}
        t1 = time.perf_counter()
        new, _ = advance_conversations(cfg, timed_step, convs, inputs, vectors, time.time())
        t2 = time.perf_counter()
        out = [encode_state(c) for c in new.values()]
        t3 = time.perf_counter()
        assert len(out) == batch
        sums["decode"] += t1 - t0
        sums["model_step"] += in_step[0]
        sums["events"] += (t2 - t1) - in_step[0]
        sums["encode"] += t3 - t2

    once(dict.fromkeys(PATH_STAGES, 0.0))  # warm-up (first-call allocations, CUDA kernels)
    sums = dict.fromkeys(PATH_STAGES, 0.0)
    n, t0 = 0, time.perf_counter()
    while n < min_repeats or time.perf_counter() - t0 < seconds:
        once(sums)
        n += 1
    elapsed = time.perf_counter() - t0
    return PathRate(batch, batch * n / elapsed, elapsed * 1000 / n, n, {k: v * 1000 / n for k, v in sums.items()})


def format_stages(r: PathRate) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in r.stages_ms.items())
