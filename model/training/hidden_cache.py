"""Frozen lower layers computed once: a cache of hidden states for every training text.

Fine-tuning only the top `trainable_encoder_layers` of a 12-layer MPNet leaves the embeddings and
the bottom layers frozen, so their output for a text never changes during training. On a CPU they
are most of the cost of a step (measured here on 2 cores, all-mpnet-base-v2, MELD text: the bottom
10 layers ~37 utterances/s in inference mode, the top 2 forward + backward ~43/s). The cache holds,
for each distinct text, the hidden states of its real tokens (no padding) in float16 after layer
`first_trainable`; a training step reads them, pads each length-sorted group and runs only the top
layers (`UtteranceEncoder.upper`). The lower layers then run in inference mode (no dropout), which
is the one difference from running the whole encoder in every step.

Exactness: padded positions never reach a real token (they are masked as keys, and MPNet's
relative position bias depends on positions only), so `upper(cached)` equals the whole encoder up
to float16 rounding of the cached states (tested).

The file is keyed by the base encoder, the layer and a hash of the texts, in the cache folder
(`model.encoders.cache_dir()`), so seeds and recipes that share them compute it once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from model.encoders import cache_dir
from model.encoding import encoder_input, length_buckets, normalize_text
from model.modeling import EmotionSIModel


class HiddenCache:
    def __init__(self, index: dict[str, int], states: torch.Tensor, offsets: torch.Tensor, lengths: torch.Tensor):
        self.index = index  # text -> row
        self.states = states  # (sum of lengths, D) float16
        self.offsets, self.lengths = offsets, lengths  # (rows,)

    def __len__(self) -> int:
        return len(self.index)

    def padded(self, rows: Sequence[int], device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states (N, S, D) float32, right-padded with zeros, and the attention mask (N, S)."""
        lens = self.lengths[list(rows)]
        S, D = int(lens.max()), self.states.shape[1]
        h = torch.zeros(len(rows), S, D, dtype=torch.float32)
        mask = torch.zeros(len(rows), S, dtype=torch.long)
        for i, r in enumerate(rows):
            n, o = int(self.lengths[r]), int(self.offsets[r])
            h[i, :n] = self.states[o : o + n].float()
            mask[i, :n] = 1
        return h.to(device), mask.to(device)

    def encode(self, model: EmotionSIModel, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """Utterance vectors (N, D) through the model's top layers, in input order (with gradients)."""
        dev = next(model.parameters()).device
        try:
            rows = [self.index[normalize_text(t)] for t in texts]
        except KeyError as exc:
            raise KeyError(f"a text is not in the hidden-state cache ({len(self)} texts): build it from every split used") from exc
        out = None
        for idx in length_buckets([int(self.lengths[r]) for r in rows], batch_size):
            h, mask = self.padded([rows[j] for j in idx], dev)
            vecs = model.encoder.upper(h, mask)  # (n, D)
            if out is None:
                out = vecs.new_empty(len(texts), vecs.shape[-1])
            out[torch.as_tensor(idx, device=dev)] = vecs
        return out

    def encode_fn(self, model: EmotionSIModel) -> Callable[[Sequence[str]], torch.Tensor]:
        return lambda texts: self.encode(model, texts)


def cache_path(model: EmotionSIModel, texts: Sequence[str], max_tokens: int) -> Path:
    h = hashlib.sha256()
    for t in texts:
        h.update(normalize_text(t).encode("utf-8") + b"\0")
    name = f"{model.cfg.base_encoder}-layer{model.encoder.first_trainable}-tok{max_tokens}-{h.hexdigest()[:16]}.pt"
    return cache_dir() / "hidden" / name


@torch.inference_mode()
def build_cache(model: EmotionSIModel, tokenizer, texts: Sequence[str], batch_size: int = 64,
                path: Path | None = None, progress: Callable[[int, int], None] | None = None) -> HiddenCache:
    """Hidden states of the frozen part for each distinct text; loaded from `path` when it is there."""
    unique = list(dict.fromkeys(normalize_text(t) for t in texts))
    if path is not None and path.exists():
        saved = torch.load(path, weights_only=True)
        return HiddenCache({t: i for i, t in enumerate(unique)}, saved["states"], saved["offsets"], saved["lengths"])
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    ids = encoder_input(tokenizer, unique, model.cfg.max_tokens)
    lengths = torch.tensor([len(t) for t in ids], dtype=torch.long)
    offsets = torch.cumsum(lengths, 0) - lengths
    states = torch.empty(int(lengths.sum()), model.encoder.dim, dtype=torch.float16)
    done = 0
    for idx in length_buckets(lengths.tolist(), batch_size):
        enc = tokenizer.pad({"input_ids": [ids[j] for j in idx]}, padding=True, return_tensors="pt")
        h = model.encoder.lower(enc["input_ids"].to(dev), enc["attention_mask"].to(dev)).to("cpu", torch.float16)
        for k, j in enumerate(idx):
            n, o = int(lengths[j]), int(offsets[j])
            states[o : o + n] = h[k, :n]
        done += len(idx)
        if progress is not None:
            progress(done, len(unique))
    model.train(was_training)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"states": states, "offsets": offsets, "lengths": lengths}, tmp)
        tmp.replace(path)
    return HiddenCache({t: i for i, t in enumerate(unique)}, states, offsets, lengths)
