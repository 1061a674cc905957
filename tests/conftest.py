"""Shared fixtures. Model tests use tiny configs (hidden 32, 2 layers) and files they write themselves."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from model.config import ModelConfig, TinyEncoderConfig
from model.training.data import MELD_LABELS, SPEAKERS


def tiny_config(**over) -> ModelConfig:
    base = dict(emotion_labels=MELD_LABELS, speaker_labels=SPEAKERS, tiny_encoder=TinyEncoderConfig(), hidden=32,
                attn_heads=2, lookahead=2, window=4, dropout=0.0)
    base.update(over)
    return ModelConfig(**base)


@pytest.fixture
def tiny_model():
    from model.modeling import EmotionSIModel

    torch.manual_seed(0)
    return EmotionSIModel(tiny_config()).eval()


@pytest.fixture(scope="session")
def tokenizer():
    from model.encoders import load_tokenizer

    return load_tokenizer(tiny_config())


MELD_ROWS = [
    # Dialogue_ID, Utterance_ID, Speaker, Emotion, Utterance (curly apostrophes on purpose)
    (0, 0, "Chandler", "neutral", "also I was the point person on my company\u2019s transition."),
    (0, 1, "The Interviewer", "neutral", "You must\u2019ve had your hands full."),
    (0, 2, "Chandler", "joy", "That I did. That I did."),
    (0, 4, "All", "surprise", "What?!"),  # Utterance_ID gap, group speaker
    (1, 0, "Joey", "anger", "I can't believe you did that!"),
    (1, 1, "Rachel", "sadness", "I'm so sorry, Joey."),
    (1, 2, "Joey and Ross", "fear", "Oh no, oh no, oh no."),
    (2, 0, "Monica", "disgust", "Eww, that is disgusting."),
    (2, 1, "Phoebe", "joy", "I love it!"),
]


def write_meld_csv(path: Path, rows=MELD_ROWS) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["Sr No.", "Utterance", "Speaker", "Emotion", "Sentiment", "Dialogue_ID", "Utterance_ID", "Season", "Episode", "StartTime", "EndTime"])
        for i, (d, u, spk, emo, text) in enumerate(rows):
            w.writerow([i + 1, text, spk, emo, "neutral", d, u, 1, 1, "00:00:01,000", "00:00:02,000"])
    return path


def write_emorynlp_json(path: Path) -> Path:
    doc = {"season_id": "s01", "episodes": [{"episode_id": "s01_e01", "scenes": [
        {"scene_id": "s01_e01_c01", "utterances": [
            {"utterance_id": "u1", "speakers": ["Rachel Green"], "transcript": "Coffee.", "emotion": "Neutral"},
            {"utterance_id": "u2", "speakers": ["Ross Geller", "Joey Tribbiani"], "transcript": "Hey!", "emotion": "Joyful"},
            {"utterance_id": "u3", "speakers": ["Monica Geller"], "transcript": "I\u2019m so mad at you.", "emotion": "Mad"}]},
        {"scene_id": "s01_e01_c02", "utterances": [
            {"utterance_id": "u4", "speakers": ["Phoebe Buffay"], "transcript": "It's peaceful here.", "emotion": "Peaceful"}]}]}]}
    path.write_text(json.dumps(doc))
    return path


def write_friends_jsonl(path: Path) -> Path:
    rows = []
    lines = [("Monica Geller", "There's nothing to tell!"), ("Joey Tribbiani", "C'mon, you're going out with the guy!"),
             ("Scene Directions", "[Central Perk]"), ("Chandler Bing", "All right Joey, be nice."), (None, "Hi!"),
             ("Phoebe Buffay", "Wait, does he eat chalk?"), ("Ross Geller", "Hi."), ("Rachel Green", "Oh God."),
             ("Gunther", "Coffee?")]
    for scene in range(3):
        for i, (spk, text) in enumerate(lines):
            rows.append({"utterance_id": f"s01_e01_c0{scene}_u{i}", "scene_id": f"s01_e01_c0{scene}", "episode_id": "s01_e01",
                         "season": 1, "episode": 1, "scene": scene, "utterance": i, "speaker": spk,
                         "is_scene_direction": spk == "Scene Directions", "text": text, "emorynlp_split": None})
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A miniature --data-dir with the same layout as ../shared/data."""
    for sub in ("meld", "emorynlp", "friends"):
        (tmp_path / sub).mkdir()
    write_meld_csv(tmp_path / "meld" / "train_sent_emo.csv")
    write_meld_csv(tmp_path / "meld" / "dev_sent_emo.csv", MELD_ROWS[:4] + MELD_ROWS[7:])
    write_emorynlp_json(tmp_path / "emorynlp" / "emotion-detection-trn.json")
    write_emorynlp_json(tmp_path / "emorynlp" / "emotion-detection-dev.json")
    write_friends_jsonl(tmp_path / "friends" / "friends_transcripts.jsonl")
    return tmp_path
