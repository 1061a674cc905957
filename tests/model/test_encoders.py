"""Base encoders (minilm / mpnet): recorded in the config, assembled from packages, mismatches refused;
the hidden-state cache; one text normalisation on the training and the serving path."""

import hashlib
import io
import json
import zipfile

import numpy as np
import pytest
import torch

from model import encoders
from model.artifact import save_artifact
from model.config import ModelConfig
from model.encoding import encode_texts, normalize_text
from model.modeling import EmotionSIModel
from model.offline import score_dialogues
from model.scorer import Scorer
from model.training.data import MELD_LABELS, SPEAKERS, load_meld
from model.training.hidden_cache import build_cache
from tests.conftest import tiny_config, write_meld_csv

RAW = ["You must\u2019ve had your hands full.", "I don\x92t  know\u2026", "\u201cWhat?!\u201d  \u2014 no way", "plain text"]


def test_config_records_the_base_and_refuses_an_unknown_one():
    cfg = ModelConfig(emotion_labels=MELD_LABELS, speaker_labels=SPEAKERS, base_encoder="mpnet")
    assert ModelConfig.from_dict(cfg.to_dict()).base_encoder == "mpnet"
    old = cfg.to_dict()
    del old["base_encoder"]  # artifacts written before the field: all minilm
    assert ModelConfig.from_dict(old).base_encoder == "minilm"
    with pytest.raises(ValueError, match="minilm' or 'mpnet"):
        ModelConfig(emotion_labels=MELD_LABELS, speaker_labels=SPEAKERS, base_encoder="roberta")


def test_a_base_folder_of_another_model_is_refused(monkeypatch):
    # The minilm files offered as mpnet: loading says which base the artifact needs.
    monkeypatch.setenv("EMOTION_MONITOR_ENCODER_DIR_MPNET", str(encoders.base_dir("minilm")))
    cfg = ModelConfig(emotion_labels=MELD_LABELS, speaker_labels=SPEAKERS, base_encoder="mpnet")
    with pytest.raises(encoders.BaseEncoderMissing, match="all-mpnet-base-v2"):
        encoders.build_model(cfg)


def _split_zip(tmp_path, payload: bytes, parts: int = 3):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("fake-base/model.safetensors", payload)
        zf.writestr("fake-base/config.json", "{}")
        zf.writestr("fake-base/desktop.ini", "junk")
    data = buf.getvalue()
    step = len(data) // parts + 1
    files = []
    for i in range(parts):
        f = tmp_path / f"fake.zip.{i + 1:03d}"
        f.write_bytes(data[i * step : (i + 1) * step])
        files.append(f)
    return files


def test_split_packages_are_assembled_once_and_checked_by_sha256(tmp_path, monkeypatch):
    payload = b"weights" * 1000
    files = _split_zip(tmp_path, payload)
    monkeypatch.setenv("EMOTION_MONITOR_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(encoders, "_part_files", lambda base: files)
    good = encoders.BaseEncoder("fake", "org/fake-base", "bert", 8, 1, hashlib.sha256(payload).hexdigest(), ("p1",), "MIT")
    folder = encoders._assembled(good)
    assert (folder / "model.safetensors").read_bytes() == payload
    assert not (folder / "desktop.ini").exists()
    monkeypatch.setattr(encoders, "_part_files", lambda base: pytest.fail("assembled twice"))
    assert encoders._assembled(good) == folder  # verified once, reused
    bad = encoders.BaseEncoder("fake2", "org/fake-other", "bert", 8, 1, "0" * 64, ("p1",), "MIT")
    monkeypatch.setattr(encoders, "_part_files", lambda base: files)
    with pytest.raises(encoders.BaseEncoderMissing, match="SHA-256"):
        encoders._assembled(bad)


def test_missing_packages_say_what_to_install(monkeypatch):
    base = encoders.BaseEncoder("fake", "org/fake", "bert", 8, 1, "0" * 64, ("surely-not-installed-pkg",), "MIT")
    with pytest.raises(encoders.BaseEncoderMissing, match="surely-not-installed-pkg is not installed"):
        encoders._part_files(base)


def test_two_bases_never_share_a_model_id():
    from model.training.trainer import artifact_name

    assert artifact_name("meld", "minilm") == "emotion-si-meld"  # the shipped minilm models keep their id
    assert artifact_name("meld", "mpnet") == "emotion-si-meld-mpnet"


def test_artifact_says_which_base_it_needs(tmp_path):
    model = EmotionSIModel(tiny_config()).eval()
    path = save_artifact(model, tmp_path / "art", name="tiny", version="1")
    assert json.loads((path / "config.json").read_text())["model"]["base_encoder"] == "minilm"


def test_upper_over_the_cache_equals_the_whole_encoder(tmp_path, tokenizer):
    torch.manual_seed(0)
    model = EmotionSIModel(tiny_config()).eval()
    model.encoder.first_trainable = 1  # layer 0 frozen and cached, layer 1 on top
    texts = RAW + ["a much longer utterance with many more tokens than the others in this batch"] + RAW[:2]
    cache = build_cache(model, tokenizer, texts, batch_size=3, path=tmp_path / "c.pt")
    assert len(cache) == len(set(normalize_text(t) for t in texts)) and (tmp_path / "c.pt").exists()
    with torch.inference_mode():
        whole = encode_texts(model, tokenizer, texts, batch_size=8)
        cached = cache.encode(model, texts, batch_size=3)
        reloaded = build_cache(model, tokenizer, texts, path=tmp_path / "c.pt").encode(model, texts)
    np.testing.assert_allclose(cached.numpy(), whole.numpy(), atol=5e-3)  # float16 states
    np.testing.assert_allclose(cached.numpy(), reloaded.numpy(), atol=1e-6)  # the file gives the same states


def test_raw_text_is_normalised_once_on_the_serving_and_the_offline_path(tmp_path, tokenizer):
    torch.manual_seed(1)
    model = EmotionSIModel(tiny_config()).eval()
    scorer = Scorer.from_model(model)
    served = scorer.encode(RAW)  # what the worker computes for raw message text
    with torch.inference_mode():
        clean = encode_texts(model, tokenizer, [normalize_text(t) for t in RAW]).numpy()
    np.testing.assert_allclose(served, clean, atol=1e-6)
    # The loaders keep the file's spelling; scoring raw and cleaned dialogues gives the same numbers.
    dialogues = load_meld(write_meld_csv(tmp_path / "m.csv"))
    assert any("\u2019" in u.text for d in dialogues for u in d.utterances)
    a = score_dialogues(model, tokenizer, dialogues)
    cleaned = [type(d)(d.id, tuple(type(u)(normalize_text(u.text), u.speaker, u.emotion) for u in d.utterances)) for d in dialogues]
    b = score_dialogues(model, tokenizer, cleaned)
    for mode in a:
        np.testing.assert_allclose(a[mode], b[mode], atol=1e-6)
