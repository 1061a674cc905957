"""Frozen configuration objects.

`ModelConfig` is everything needed to rebuild the network: it is saved inside every artifact, so
inference never needs the training code or the training config. `TrainConfig` is the recipe.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The shipped artifacts (model cards beside the weights). Here, in a module without torch, so a
# CLI or the worker's settings can name them without loading the model stack.
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
# The worker's, `make demo`'s and the CLI's default: the most accurate MELD model whose p99 produce ->
# provisional latency at half the sustained rate stays <= 150 ms on a 2-core CPU (docs/models.md).
# `meld` (MiniLM) is the fast one, for CPU hosts that need throughput.
DEFAULT_MODEL = WEIGHTS_DIR / "meld-mpnet"


@dataclass(frozen=True)
class TinyEncoderConfig:
    """A randomly initialised BERT of the same family, for fast tests (hidden 32, 2 layers)."""

    hidden: int = 32
    layers: int = 2
    heads: int = 2
    intermediate: int = 64


@dataclass(frozen=True)
class ModelConfig:
    emotion_labels: tuple[str, ...]
    speaker_labels: tuple[str, ...]
    # Pretrained utterance encoder, by name (model.encoders.BASES): "minilm" (all-MiniLM-L6-v2,
    # 6 x 384) or "mpnet" (all-mpnet-base-v2, 12 x 768). Recorded in every artifact; loading builds
    # that base and refuses files of another one. Artifacts written before the field existed were
    # all minilm, hence the default.
    base_encoder: str = "minilm"
    # A randomly initialised BERT of the same family instead of the base, for fast tests.
    tiny_encoder: TinyEncoderConfig | None = None
    # Fine-tune only the top layers: the bottom ones and the 11.7M-parameter word embeddings
    # stay at the packaged values, so an artifact stores ~7M parameters instead of 22.7M
    # (two shipped models fit the 50 MB budget) and CPU training skips their backward pass.
    trainable_encoder_layers: int = 4
    max_tokens: int = 64  # covers all but 2 of 9,989 MELD training utterances
    # Context encoder: one forward and one backward GRU per branch, `hidden` units each.
    hidden: int = 128
    # Shared-private structure of Li et al. (2020): emotion-private, SI-private and shared
    # BiGRUs. False = one plain BiGRU (the baseline the paper improves on).
    shared_private: bool = True
    # Cross-attention from the emotion side (query) over the SI side (keys/values).
    cross_attention: bool = True
    attn_heads: int = 4
    # False = utterance-only baseline: no GRU, each utterance scored alone.
    use_context: bool = True
    # Speaker turn information for the emotion side: each speaker gets a party index in the
    # order of first appearance within the conversation (works for "customer"/"agent" as
    # well as for Friends characters, unlike a fixed speaker vocabulary).
    num_parties: int = 8
    dropout: float = 0.2
    # Streaming: an utterance is final once `lookahead` later utterances arrived; the
    # backward GRU and the cross-attention look at the last `window` utterances.
    lookahead: int = 2
    window: int = 16

    def __post_init__(self) -> None:
        if self.base_encoder not in ("minilm", "mpnet"):
            raise ValueError(f"base_encoder must be 'minilm' or 'mpnet', got {self.base_encoder!r}")
        if self.window < self.lookahead + 1:
            raise ValueError(f"window ({self.window}) must hold the lookahead ({self.lookahead}) plus the target")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        d = dict(d)
        if d.get("tiny_encoder") is not None:
            d["tiny_encoder"] = TinyEncoderConfig(**d["tiny_encoder"])
        d["emotion_labels"] = tuple(d["emotion_labels"])
        d["speaker_labels"] = tuple(d["speaker_labels"])
        return cls(**d)

    @property
    def branches(self) -> int:
        """Number of GRU branches: emotion-private, SI-private, shared (or one plain GRU)."""
        return 3 if self.shared_private else 1


@dataclass(frozen=True)
class TrainConfig:
    dataset: str = "meld"
    seed: int = 13
    # Seed of everything after the network is built (batch order, truncation draws, SI chunks,
    # dropout); None = `seed`. Runs sharing `seed` but not `data_seed` start from the same
    # weights and can be averaged into one model (`emotion-monitor soup`).
    data_seed: int | None = None
    epochs: int = 6
    # Dialogues per emotion batch; an SI batch of Friends scene chunks of similar size follows.
    batch_dialogues: int = 8
    encoder_lr: float = 4e-5
    head_lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_fraction: float = 0.06
    grad_clip: float = 1.0
    # Auxiliary speaker identification: loss weight, and how many SI utterances (Friends
    # transcripts) are seen per emotion utterance. 0 disables the SI task.
    si_weight: float = 0.5
    si_ratio: float = 1.0
    si_chunk: int = 12
    # Training for partial futures: each target utterance sees a random number of future
    # utterances, drawn from 0..lookahead or the whole dialogue, so one model serves the
    # provisional, final and offline modes.
    truncation_probs: tuple[float, ...] = (0.35, 0.15, 0.3, 0.2)  # l=0, 1, 2(=L), full
    label_smoothing: float = 0.0
    class_weighting: bool = False
    # Exponential moving average of the trainable weights, evaluated and shipped instead of the
    # raw weights (0 = off). Off by default: on MELD dev it moved no score beyond the seed noise
    # (model card, second recipe search).
    ema_decay: float = 0.0
    # Knowledge distillation: artifact folders of trained runs (same lookahead and window) whose
    # mean probabilities the model also learns, weighted by distill_weight, at distill_temperature
    # (model/training/distill.py). Empty = plain training.
    teachers: tuple[str, ...] = ()
    distill_weight: float = 1.0
    distill_temperature: float = 1.0
    # Compute the frozen lower encoder layers once per text and train only the top layers over
    # that cache (model/training/hidden_cache.py): what makes a 12-layer MPNet trainable on a CPU. The lower
    # layers then run without dropout; off = the whole encoder in every step (the MiniLM recipes).
    cache_hidden: bool = False
    # Store the trained encoder matrices as int8 with a scale per row (model/artifact.py): an MPNet
    # artifact with 4 trained layers then fits one artifact's 50 MB (62.6 MB in float16).
    int8_weights: bool = False
    max_train_dialogues: int | None = None  # for smoke runs
    max_si_scenes: int | None = None
    # ModelConfig fields set by the recipe ([model] table); labels come from the data.
    model_overrides: dict = field(default_factory=dict)

    @classmethod
    def from_toml(cls, path: str | Path, **overrides: Any) -> "TrainConfig":
        with open(path, "rb") as fh:
            raw = tomllib.load(fh)
        model_over = raw.pop("model", {})
        model_over.update(overrides.pop("model_overrides", None) or {})
        raw.update({k: v for k, v in overrides.items() if v is not None})
        for key in ("truncation_probs", "teachers"):
            if key in raw:
                raw[key] = tuple(raw[key])
        return cls(**raw, model_overrides=model_over)
