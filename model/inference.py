"""Batch helpers shared by training, evaluation and the stream side: tokenise, encode, score."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from model.data import Dialogue, party_ids
from model.modeling import EmotionSIModel
from model.text import encoder_input, normalize_text

MODES = {
    # name: (lookahead, window) given the model's configured L and W; None = unbounded
    "offline": lambda cfg: (None, None),  # whole dialogue, both directions (the paper)
    "final": lambda cfg: (cfg.lookahead, cfg.window),  # streaming, after L later utterances
    "provisional": lambda cfg: (0, cfg.window),  # streaming, past context only
}


def tokenize(tokenizer, texts: Sequence[str], max_tokens: int, device: torch.device | str = "cpu"):
    # Padding to the longest text of the batch, not to max_tokens: most utterances are short.
    enc = tokenizer([normalize_text(t) for t in texts], padding=True, truncation=True, max_length=max_tokens, return_tensors="pt")
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


def length_buckets(lengths: Sequence[int], max_batch: int, token_budget: int | None = None) -> list[np.ndarray]:
    """Indexes grouped for encoding: sorted by length, at most `max_batch` per group and at most
    `token_budget` padded tokens (group size x its longest member) per group, so one long
    utterance never pads a whole batch to its length."""
    order = np.argsort(lengths, kind="stable")
    groups, current, longest = [], [], 0
    for i in order:
        n = max(1, int(lengths[i]))
        grown = max(longest, n)
        if current and (len(current) >= max_batch or (token_budget and grown * (len(current) + 1) > token_budget)):
            groups.append(np.array(current))
            current, grown = [], n
        current.append(i)
        longest = grown
    if current:
        groups.append(np.array(current))
    return groups


def encode_bucketed(model: EmotionSIModel, tokenizer, texts: Sequence[str], batch_size: int = 32, encode_fn=None,
                    token_budget: int | None = None) -> torch.Tensor:
    """Utterance vectors (N, D) in input order, encoded in length-sorted groups.

    Padding every text of a step to its longest one wasted ~77% of the encoder's work on MELD
    (most utterances are short, a few long); sorted groups keep padding small.
    """
    dev = next(model.parameters()).device
    encode_fn = encode_fn if encode_fn is not None else model.encode  # a compiled module has no truth value
    # Tokenise once, unpadded; each group is padded to its own longest member.
    token_ids = encoder_input(tokenizer, texts, model.cfg.max_tokens)
    out = None
    for idx in length_buckets([len(t) for t in token_ids], batch_size, token_budget):
        enc = tokenizer.pad({"input_ids": [token_ids[j] for j in idx]}, padding=True, return_tensors="pt")
        vecs = encode_fn(enc["input_ids"].to(dev), enc["attention_mask"].to(dev)).float()
        if out is None:
            out = vecs.new_empty(len(texts), vecs.shape[-1])
        out[torch.as_tensor(idx, device=dev)] = vecs
    return out


@torch.inference_mode()
def encode_texts(model: EmotionSIModel, tokenizer, texts: Sequence[str], batch_size: int = 64, encode_fn=None,
                 token_budget: int | None = None) -> torch.Tensor:
    return encode_bucketed(model, tokenizer, texts, batch_size, encode_fn, token_budget)


def pad_dialogues(vectors: torch.Tensor, dialogues: Sequence[Dialogue], num_parties: int):
    """Split flat utterance vectors into a right-padded (B, T, D) batch with party ids and lengths."""
    lengths = [len(d) for d in dialogues]
    B, T, D = len(dialogues), max(lengths), vectors.shape[-1]
    u = vectors.new_zeros(B, T, D)
    parties = torch.zeros(B, T, dtype=torch.long, device=vectors.device)
    start = 0
    for b, d in enumerate(dialogues):
        n = lengths[b]
        u[b, :n] = vectors[start : start + n]
        parties[b, :n] = torch.tensor(party_ids([x.speaker for x in d.utterances], num_parties))
        start += n
    return u, parties, torch.tensor(lengths, device=vectors.device)


@torch.inference_mode()
def score_views(
    model: EmotionSIModel, tokenizer, dialogues: Sequence[Dialogue], views: dict[str, tuple[int | None, int | None]],
    batch_dialogues: int = 32, temperature: float = 1.0, encode=None,
) -> dict[str, np.ndarray]:
    """Emotion probabilities (N_utterances, E) per view (name: (lookahead, window), None = unbounded),
    utterances in dialogue order; softmax at `temperature` (distillation softens with it).
    `encode(texts) -> (N, D)` replaces the model's encoder (training scores dev through its cache)."""
    model.eval()
    out: dict[str, list[np.ndarray]] = {m: [] for m in views}
    for i in range(0, len(dialogues), batch_dialogues):
        chunk = dialogues[i : i + batch_dialogues]
        texts = [u.text for d in chunk for u in d.utterances]
        vecs = encode(texts) if encode is not None else encode_texts(model, tokenizer, texts)
        u, parties, lengths = pad_dialogues(vecs, chunk, model.cfg.num_parties)
        for m, (la, win) in views.items():
            logits, _ = model.score_dialogues(u, parties, lengths, la, win)
            out[m].append(torch.softmax(logits.float() / temperature, -1).cpu().numpy())
    return {m: np.concatenate(v) if v else np.zeros((0, len(model.cfg.emotion_labels))) for m, v in out.items()}


def score_dialogues(
    model: EmotionSIModel, tokenizer, dialogues: Sequence[Dialogue], modes: Sequence[str] = tuple(MODES), batch_dialogues: int = 32,
    encode=None,
) -> dict[str, np.ndarray]:
    """Emotion probabilities (N_utterances, E) per mode, utterances in dialogue order."""
    return score_views(model, tokenizer, dialogues, {m: MODES[m](model.cfg) for m in modes}, batch_dialogues, encode=encode)
