"""What the encoder reads: one normalisation of utterance text, applied where text is tokenised.

Training, `evaluate` and the worker all tokenise through `encoder_input`, so a served utterance
is spelled exactly as the training and evaluation text was (MELD mixes curly and straight quotes
and carries Windows-1252 bytes such as \\x92 for an apostrophe; a worker that encoded raw text
scored the same dialogues differently from `evaluate`).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

_QUOTES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u201c": '"', "\u201d": '"', "\u2014": " - ", "\u2013": "-", "\u0092": "'", "\u0085": "..."})


def normalize_text(text: str) -> str:
    """One spelling for quotes and dashes (MELD mixes curly and straight), NFKC, squeezed spaces."""
    text = unicodedata.normalize("NFKC", text.translate(_QUOTES))
    return re.sub(r"\s+", " ", text).strip()


def encoder_input(tokenizer, texts: Sequence[str], max_tokens: int) -> list[list[int]]:
    """Token ids per text, unpadded: normalised, then tokenised and truncated to `max_tokens`."""
    return tokenizer([normalize_text(t) for t in texts], truncation=True, max_length=max_tokens)["input_ids"]
