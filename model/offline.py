"""Offline scoring: whole dialogues at once, in the three modes (the paper's offline view and the
streaming final / provisional views, computed with the same horizon rule as model.streaming)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from model.dialogue import Dialogue, party_ids
from model.encoding import encode_texts
from model.modeling import EmotionSIModel

MODES = {
    # name: (lookahead, window) given the model's configured L and W; None = unbounded
    "offline": lambda cfg: (None, None),  # whole dialogue, both directions (the paper)
    "final": lambda cfg: (cfg.lookahead, cfg.window),  # streaming, after L later utterances
    "provisional": lambda cfg: (0, cfg.window),  # streaming, past context only
}


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
