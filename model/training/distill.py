"""Knowledge distillation from an ensemble of trained runs into one model of the same size.

An ensemble of k runs scores ~0.8 weighted-F1 above its members on MELD dev (model card), but
costs k encoder passes per utterance, which the streaming side cannot afford. Training one
model against the ensemble's probabilities (Hinton et al. 2015) is meant to move part of that
gain into a single artifact; on MELD four distilled seeds scored +0.25 final and +0.4 provisional
above the mean of single runs (model card, fourth search), within the seed noise. The teachers score every training utterance under each of the views the
trainer samples (lookahead 0..L in the window, and the whole dialogue), so each target is
matched with the teacher's view of the same context.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from model.dialogue import Dialogue
from model.offline import score_views


def views(lookahead: int, window: int) -> list[tuple[int | None, int | None]]:
    """(lookahead, window) per truncation choice of the trainer: 0..L in the window, then the whole dialogue."""
    return [(la, window) for la in range(lookahead + 1)] + [(None, None)]


def teacher_probs(
    teacher_dirs: Sequence[str | Path], dialogues: Sequence[Dialogue], lookahead: int, window: int,
    temperature: float, device: torch.device | str = "cpu", progress=None,
) -> list[np.ndarray]:
    """Per dialogue an array (n_utterances, L + 2, E): the teachers' mean softened probabilities.
    Each teacher reads the text with its own base encoder's tokenizer (an MPNet teacher can teach a
    MiniLM student). `progress(k)` is called after the k-th teacher."""
    from model.artifact import load_artifact
    from model.encoders import load_tokenizer

    named = {str(k): v for k, v in enumerate(views(lookahead, window))}
    total = 0.0
    for k, path in enumerate(teacher_dirs):
        teacher, _ = load_artifact(path, device)
        if (teacher.cfg.lookahead, teacher.cfg.window) != (lookahead, window):
            raise ValueError(f"teacher {path}: lookahead/window {teacher.cfg.lookahead}/{teacher.cfg.window}, the student "
                             f"trains with {lookahead}/{window}; train the teachers with the student's recipe")
        probs = score_views(teacher, load_tokenizer(teacher.cfg), dialogues, named, temperature=temperature)
        total = total + np.stack([probs[name] for name in named], axis=1)  # (N, views, E) in dialogue order
        del teacher
        if progress is not None:
            progress(k + 1)
    mean = total / len(teacher_dirs)
    return np.split(mean, np.cumsum([len(d) for d in dialogues])[:-1])


def distillation_loss(student_logits: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) at the temperature, scaled by T^2 so its gradients match the hard loss's size."""
    log_p = F.log_softmax(student_logits / temperature, -1)
    return F.kl_div(log_p, teacher, reduction="batchmean") * temperature**2
