"""Evaluation: weighted-F1 in the offline, final and provisional modes, per-class F1, confusion matrix."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import confusion_matrix, f1_score

from model.dialogue import Dialogue
from model.offline import MODES, score_dialogues


def gold_labels(dialogues: Sequence[Dialogue], labels: Sequence[str]) -> np.ndarray:
    index = {name.lower(): i for i, name in enumerate(labels)}
    gold = []
    for d in dialogues:
        for u in d.utterances:
            if u.emotion is None or u.emotion.lower() not in index:
                raise ValueError(
                    f"dialogue {d.id}: emotion {u.emotion!r} is not one of the model's labels {list(labels)}; "
                    "is --dataset the one this model was trained on?"
                )
            gold.append(index[u.emotion.lower()])
    return np.array(gold, dtype=np.int64)


def metrics_from_probs(gold: np.ndarray, probs: dict[str, np.ndarray], labels: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"n_utterances": int(len(gold)), "per_class": {}}
    ids = list(range(len(labels)))
    for mode, p in probs.items():
        pred = p.argmax(-1)
        out[f"weighted_f1_{mode}"] = round(100 * f1_score(gold, pred, labels=ids, average="weighted", zero_division=0), 2)
        out[f"macro_f1_{mode}"] = round(100 * f1_score(gold, pred, labels=ids, average="macro", zero_division=0), 2)
        per = f1_score(gold, pred, labels=ids, average=None, zero_division=0)
        out["per_class"][mode] = {name: round(100 * float(f), 2) for name, f in zip(labels, per)}
    return out


def evaluate(model, tokenizer, dialogues: Sequence[Dialogue], modes: Sequence[str] = tuple(MODES),
             encode: Callable | None = None) -> tuple[dict[str, Any], dict[str, np.ndarray], np.ndarray]:
    labels = model.cfg.emotion_labels
    gold = gold_labels(dialogues, labels)
    probs = score_dialogues(model, tokenizer, dialogues, modes, encode=encode)
    return metrics_from_probs(gold, probs, labels), probs, gold


def plot_confusion(gold: np.ndarray, pred: np.ndarray, labels: Sequence[str], path: str | Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = confusion_matrix(gold, pred, labels=list(range(len(labels))))
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(6.4, 5.6))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    ax.set_title(title)
    for i in range(len(labels)):
        for j in range(len(labels)):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8, color="white" if norm[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, label="share of gold row")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
