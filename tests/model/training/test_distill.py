"""Distillation: teachers' probabilities per training view, and a student trained against them."""

import json

import numpy as np
import pytest
import torch

from model.cli import main as model_cli
from model.training.data import load_meld
from model.training.distill import distillation_loss, teacher_probs, views
from tests.model.training.test_soup import _train


def test_teacher_probs_are_the_mean_of_the_teachers_views(data_dir, tmp_path, tokenizer):
    from model.artifact import load_artifact
    from model.encoding import encode_texts
    from model.offline import pad_dialogues

    a, b = _train(data_dir, tmp_path, "a", 7), _train(data_dir, tmp_path, "b", 8)
    dialogues = load_meld(data_dir / "meld" / "train_sent_emo.csv")
    cfg = load_artifact(a)[0].cfg
    probs = teacher_probs([a, b], dialogues, cfg.lookahead, cfg.window, temperature=2.0)
    assert [p.shape for p in probs] == [(len(d), cfg.lookahead + 2, len(cfg.emotion_labels)) for d in dialogues]
    np.testing.assert_allclose(np.concatenate(probs).sum(-1), 1.0, atol=1e-5)
    # The whole-dialogue view (last) of dialogue 0, by hand: mean of the two teachers' softened offline probabilities.
    expect = 0
    for path in (a, b):
        m = load_artifact(path)[0]
        with torch.inference_mode():
            u, parties, lengths = pad_dialogues(encode_texts(m, tokenizer, [x.text for x in dialogues[0].utterances]), dialogues[:1], m.cfg.num_parties)
            logits, _ = m.score_dialogues(u, parties, lengths, None, None)
        expect = expect + torch.softmax(logits / 2.0, -1).numpy() / 2
    np.testing.assert_allclose(probs[0][:, -1], expect, atol=1e-5)
    assert views(2, 16) == [(0, 16), (1, 16), (2, 16), (None, None)]


def test_distillation_loss_is_zero_at_the_teacher_and_positive_elsewhere():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 0.0]])
    teacher = torch.softmax(logits / 2.0, -1)
    assert distillation_loss(logits, teacher, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    assert distillation_loss(torch.zeros_like(logits), teacher, 2.0).item() > 0.01


def test_train_with_teachers_records_the_distillation_loss(data_dir, tmp_path):
    a = _train(data_dir, tmp_path, "a", 7)
    recipe = tmp_path / "tiny.toml"  # written by _train
    out = tmp_path / "student"
    assert model_cli(["train", "--dataset", "meld", "--data-dir", str(data_dir), "--out", str(out), "--config", str(recipe),
                      "--teacher", str(a), "--set", "distill_temperature=2"]) == 0
    history = json.loads((out / "training_history.json").read_text())
    assert history[0]["train_loss_distill"] > 0
    meta = json.loads((out / "config.json").read_text())["meta"]["train_config"]
    assert meta["teachers"] == [str(a)] and meta["distill_temperature"] == 2
    with pytest.raises(SystemExit, match="not an artifact"):
        model_cli(["train", "--dataset", "meld", "--data-dir", str(data_dir), "--out", str(out), "--config", str(recipe),
                   "--teacher", str(tmp_path / "nowhere")])
