"""What the stream side needs from a trained artifact: encode texts, step conversations.

The device is chosen at start-up ("auto": CUDA when present, else CPU). Backends beyond eager
PyTorch (torch.compile, TensorRT) plug in here (see the speed issue).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from model.artifact import load_artifact
from model.backends import resolve_device
from model.encoders import load_tokenizer
from model.encoding import encode_texts
from model.streaming import DialogueState, Scored, step


class Scorer:
    def __init__(self, artifact: str | Path, device: str = "auto", backend: str = "eager",
                 max_batch: int = 64, token_budget: int | None = None):
        self.device = resolve_device(device)
        self.max_batch, self.token_budget = max_batch, token_budget
        model, config = load_artifact(artifact, self.device)
        self._bind(model, config, backend, artifact)

    @classmethod
    def from_model(cls, model, name: str = "untrained", version: str = "0") -> "Scorer":
        """Wrap an in-memory model (tests, notebooks)."""
        self = cls.__new__(cls)
        self.device = next(model.parameters()).device
        self.max_batch, self.token_budget = 64, None
        self._bind(model.eval(), {"name": name, "version": version}, "eager")
        return self

    def _bind(self, model, config, backend: str, artifact: str | Path | None = None) -> None:
        from model.backends import ONNX_BACKENDS, build_encoder

        self.model, self.config = model, config
        self.backend, self._encode_fn = build_encoder(model.encoder, backend, self.device, artifact)
        # ONNX Runtime on CPU peaks at chunks of 8-32 utterances (measured here: 231-233 utt/s at
        # 8-16, 229 at 32, 197 at 64, where eager PyTorch peaks at 64 with 249): a worker batch of
        # 64 is encoded in chunks of at most 32.
        self.encode_batch = min(self.max_batch, 32) if self.backend in ONNX_BACKENDS else self.max_batch
        self.tokenizer = load_tokenizer(model.cfg)
        self.labels = model.cfg.emotion_labels
        self.model_id = f"{config['name']}@{config['version']}"

    @property
    def window(self) -> int:
        return self.model.cfg.window

    @property
    def lookahead(self) -> int:
        return self.model.cfg.lookahead

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.model.encoder.dim), dtype=np.float32)
        return encode_texts(self.model, self.tokenizer, list(texts), self.encode_batch, self._encode_fn,
                            self.token_budget).cpu().numpy()

    def step(self, states: list[DialogueState], vectors: np.ndarray, speakers: list[str]) -> tuple[list[DialogueState], list[list[Scored]]]:
        if self.device.type != "cpu":
            return step(self.model, states, vectors, speakers)
        # The step's ops are small (a few windows of 16 x 384): waking a second OpenMP thread for
        # each costs more than it saves. One thread cut the worker's step stage from 3.8 to 2.6 s
        # over 3,000 utterances on 2 cores (the encoder keeps all threads).
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return step(self.model, states, vectors, speakers)
        finally:
            torch.set_num_threads(threads)
