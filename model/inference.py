"""Batch helpers shared by training, evaluation and the stream side: tokenise, encode, score."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from model.data import Dialogue, party_ids
from model.modeling import EmotionSIModel

MODES = {
    # name: (lookahead, window) given the model's configured L and W; None = unbounded
    "offline": lambda cfg: (None, None),  # whole dialogue, both directions (the paper)
    "final": lambda cfg: (cfg.lookahead, cfg.window),  # streaming, after L later utterances
    "provisional": lambda cfg: (0, cfg.window),  # streaming, past context only
}


def tokenize(tokenizer, texts: Sequence[str], max_tokens: int, device: torch.device | str = "cpu"):
    # Padding to the longest text of the batch, not to max_tokens: most utterances are short.
    enc = tokenizer(list(texts), padding=True, truncation=True, max_length=max_tokens, return_tensors="pt")
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


def previous_texts(dialogues: Sequence[Dialogue], turns: int) -> list[tuple[str, ...]] | None:
    """For every utterance of every dialogue, in order: the texts of the `turns` utterances before
    it, most recent first (None when the model reads no context)."""
    if turns <= 0:
        return None
    out = []
    for d in dialogues:
        texts = [u.text for u in d.utterances]
        out.extend(tuple(reversed(texts[max(0, i - turns) : i])) for i in range(len(texts)))
    return out


def input_ids(tokenizer, cfg, texts: Sequence[str], contexts: Sequence[Sequence[str]] | None = None
              ) -> tuple[list[list[int]], list[int]]:
    """Token ids per utterance and the length of its first segment.

    Without context: `[CLS] text [SEP]`, as the tokenizer makes it. With context (config
    `context_turns`): `[CLS] text [SEP] previous [SEP] older [SEP]`, the context cut to
    `context_tokens` (the most recent text first; an older one that does not fit is cut at its
    start, keeping the words nearest the current utterance). Each distinct text is tokenised once.
    """
    if contexts is None or cfg.context_turns <= 0:
        ids = tokenizer(list(texts), truncation=True, max_length=cfg.max_tokens)["input_ids"]
        return ids, [len(t) for t in ids]
    distinct = list(dict.fromkeys([*texts, *(c for ctx in contexts for c in ctx[: cfg.context_turns])]))
    pieces = dict(zip(distinct, tokenizer(distinct, add_special_tokens=False, truncation=True,
                                          max_length=cfg.max_tokens - 2)["input_ids"]))
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    ids, first = [], []
    for text, ctx in zip(texts, contexts):
        seq = [cls, *pieces[text], sep]
        first.append(len(seq))
        room = cfg.context_tokens
        for prev in ctx[: cfg.context_turns]:
            if room <= 1:
                break
            part = pieces[prev][-(room - 1):] if pieces[prev] else []
            seq += [*part, sep]
            room -= len(part) + 1
        ids.append(seq)
    return ids, first


def encode_bucketed(model: EmotionSIModel, tokenizer, texts: Sequence[str], batch_size: int = 32, encode_fn=None,
                    token_budget: int | None = None, contexts: Sequence[Sequence[str]] | None = None) -> torch.Tensor:
    """Utterance vectors (N, D) in input order, encoded in length-sorted groups.

    `contexts[i]`: the texts before `texts[i]` in its conversation, most recent first (used when
    the model was configured with `context_turns`). Padding every text of a step to its longest
    one wasted ~77% of the encoder's work on MELD (most utterances are short, a few long); sorted
    groups keep padding small.
    """
    dev = next(model.parameters()).device
    encode_fn = encode_fn if encode_fn is not None else model.encode  # a compiled module has no truth value
    # Tokenise once, unpadded; each group is padded to its own longest member.
    token_ids, first = input_ids(tokenizer, model.cfg, texts, contexts)
    pad = tokenizer.pad_token_id
    out = None
    for idx in length_buckets([len(t) for t in token_ids], batch_size, token_budget):
        width = max(len(token_ids[j]) for j in idx)
        ids = np.full((len(idx), width), pad, dtype=np.int64)
        mask = np.zeros((len(idx), width), dtype=np.int64)
        types = np.zeros((len(idx), width), dtype=np.int64)
        for r, j in enumerate(idx):
            n = len(token_ids[j])
            ids[r, :n], mask[r, :n], types[r, first[j]:n] = token_ids[j], 1, 1
        vecs = encode_fn(*(torch.from_numpy(a).to(dev) for a in (ids, mask, types))).float()
        if out is None:
            out = vecs.new_empty(len(texts), vecs.shape[-1])
        out[torch.as_tensor(idx, device=dev)] = vecs
    return out


@torch.inference_mode()
def encode_texts(model: EmotionSIModel, tokenizer, texts: Sequence[str], batch_size: int = 64, encode_fn=None,
                 token_budget: int | None = None, contexts: Sequence[Sequence[str]] | None = None) -> torch.Tensor:
    return encode_bucketed(model, tokenizer, texts, batch_size, encode_fn, token_budget, contexts)


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
def score_dialogues(
    model: EmotionSIModel, tokenizer, dialogues: Sequence[Dialogue], modes: Sequence[str] = tuple(MODES), batch_dialogues: int = 32
) -> dict[str, np.ndarray]:
    """Emotion probabilities (N_utterances, E) per mode, utterances in dialogue order."""
    model.eval()
    out: dict[str, list[np.ndarray]] = {m: [] for m in modes}
    for i in range(0, len(dialogues), batch_dialogues):
        chunk = dialogues[i : i + batch_dialogues]
        vecs = encode_texts(model, tokenizer, [u.text for d in chunk for u in d.utterances],
                            contexts=previous_texts(chunk, model.cfg.context_turns))
        u, parties, lengths = pad_dialogues(vecs, chunk, model.cfg.num_parties)
        for m in modes:
            la, win = MODES[m](model.cfg)
            logits, _ = model.score_dialogues(u, parties, lengths, la, win)
            out[m].append(torch.softmax(logits.float(), -1).cpu().numpy())
    return {m: np.concatenate(v) if v else np.zeros((0, len(model.cfg.emotion_labels))) for m, v in out.items()}
