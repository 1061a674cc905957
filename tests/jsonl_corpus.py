"""A generated contact-centre corpus in the project's JSONL dataset format, with labels other than MELD's."""

from __future__ import annotations

import json
import random
from pathlib import Path

LABELS = ("calm", "frustrated", "satisfied")
TEMPLATES = {
    "calm": ["I would like to check my balance.", "Can you tell me when the parcel arrives?", "Let me look that up for you."],
    "frustrated": ["This is the third time I am calling about this!", "Nobody has fixed my problem yet.", "I am really annoyed now."],
    "satisfied": ["Great, thank you so much!", "That solved it, perfect.", "Thanks, have a lovely day."],
}


def corpus(n_conversations: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for c in range(n_conversations):
        cid, agent = f"call-{seed}-{c}", f"agent-{c % 3}"  # agents recur across calls: SI classes
        for seq in range(rng.randint(3, 6)):
            customer = seq % 2 == 0
            label = rng.choice(LABELS) if customer else "calm"
            rows.append({"conversation_id": cid, "seq": seq, "speaker": f"customer-{seed}-{c}" if customer else agent,
                         "role": "customer" if customer else "agent", "text": rng.choice(TEMPLATES[label]), "label": label})
    rng.shuffle(rows)  # any order in the file: the loader orders by seq
    return rows


def write_corpus(path: Path, n_conversations: int, seed: int) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in corpus(n_conversations, seed)))
    return path


TINY_RECIPE = (
    'dataset = "jsonl"\nepochs = 2\nbatch_dialogues = 4\nsi_ratio = 0.0\nclass_weighting = true\n'
    "[model]\nhidden = 32\nattn_heads = 2\nwindow = 4\ntiny_encoder = { hidden = 32, layers = 2, heads = 2, intermediate = 64 }\n"
)
