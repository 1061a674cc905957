"""What the encoder reads and how it is batched: one text normalisation, tokenisation, and the one
batching policy (length-sorted groups under a count and a token budget) that every caller
(training, evaluation, the worker's Scorer, benchmarks) passes its own limits to.

Normalisation happens where text is tokenised, so a served utterance is spelled exactly as the
training and evaluation text was (MELD mixes curly and straight quotes and carries Windows-1252
bytes such as \\x92 for an apostrophe; a worker that encoded raw text scored the same dialogues
differently from `evaluate`).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

import numpy as np
import torch

from model.modeling import EmotionSIModel

_QUOTES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u201c": '"', "\u201d": '"', "\u2014": " - ", "\u2013": "-", "\u0092": "'", "\u0085": "..."})


def normalize_text(text: str) -> str:
    """One spelling for quotes and dashes (MELD mixes curly and straight), NFKC, squeezed spaces."""
    text = unicodedata.normalize("NFKC", text.translate(_QUOTES))
    return re.sub(r"\s+", " ", text).strip()


def encoder_input(tokenizer, texts: Sequence[str], max_tokens: int) -> list[list[int]]:
    """Token ids per text, unpadded: normalised, then tokenised and truncated to `max_tokens`."""
    return tokenizer([normalize_text(t) for t in texts], truncation=True, max_length=max_tokens)["input_ids"]


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
