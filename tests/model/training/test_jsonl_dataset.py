"""Your own labelled conversations: the JSONL format, training and evaluating on it, `data check`."""

import json

import jsonschema
import pytest

from model.artifact import load_artifact
from model.cli import main as model_cli
from model.training import data as D
from tests.jsonl_corpus import LABELS, TINY_RECIPE, write_corpus


def test_loader_orders_by_seq_and_the_schema_accepts_every_line(tmp_path):
    path = write_corpus(tmp_path / "train.jsonl", 5, seed=1)
    dls = D.load_jsonl(path)
    assert len(dls) == 5 and all(len(d) >= 3 for d in dls)
    schema = json.loads((D.Path(D.__file__).parents[1] / "schemas" / "labelled-utterance.schema.json").read_text())
    for line in path.read_text().splitlines():
        jsonschema.validate(json.loads(line), schema)
    assert D.labels_of(dls) == tuple(sorted({u.emotion for d in dls for u in d.utterances}))


@pytest.mark.parametrize("line, message", [
    ("not json", "not JSON"),
    ('{"conversation_id": "c", "seq": "1", "speaker": "a", "text": "hi", "label": "x"}', "'seq' must be a int"),
    ('{"conversation_id": "c", "seq": 0, "speaker": "a", "text": "hi", "label": ""}', "'label' must be a non-empty string"),
    ('{"conversation_id": "c", "seq": 0, "speaker": "a", "text": "hi", "label": "x"}\n'
     '{"conversation_id": "c", "seq": 0, "speaker": "a", "text": "again", "label": "x"}', "seq 0 twice"),
])
def test_bad_lines_are_refused_with_their_line_number(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(D.DatasetError, match=message):
        D.load_jsonl(path)


def test_speaker_classes_come_from_recurring_speakers_or_si_is_off(tmp_path):
    dls = D.load_jsonl(write_corpus(tmp_path / "t.jsonl", 6, seed=2))
    labels, classify = D.speaker_classes("jsonl", dls)
    assert set(labels) == {"agent-0", "agent-1", "agent-2", "other"}
    assert classify("agent-1") == "agent-1" and classify("customer-9") == "other"
    one_off = [D.Dialogue("c", (D.Utterance("hi", "customer-1", "calm"), D.Utterance("yo", "agent-1", "calm")))]
    labels, classify = D.speaker_classes("jsonl", one_off)
    assert labels == ("other",) and classify("agent-1") is None


def test_train_and_evaluate_on_jsonl_with_its_own_labels(tmp_path, capsys):
    train, dev = write_corpus(tmp_path / "train.jsonl", 12, seed=3), write_corpus(tmp_path / "dev.jsonl", 4, seed=4)
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(TINY_RECIPE)
    assert model_cli(["train", "--dataset", "jsonl", "--train", str(train), "--dev", str(dev), "--config", str(recipe),
                      "--out", str(tmp_path / "art")]) == 0
    model, config = load_artifact(tmp_path / "art")
    assert model.cfg.emotion_labels == LABELS
    assert (config["name"], config["model"]["base_encoder"]) == ("emotion-si-jsonl", "minilm")
    assert "agent-0" in model.cfg.speaker_labels
    capsys.readouterr()
    assert model_cli(["evaluate", "--model", str(tmp_path / "art"), "--dataset", "jsonl", "--data", str(dev),
                      "--plot", str(tmp_path / "c.png"), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["n_utterances"] == sum(len(d) for d in D.load_jsonl(dev))
    assert set(metrics["per_class"]["final"]) == set(LABELS)


def test_jsonl_training_refuses_the_friends_si_corpus_and_missing_files(tmp_path):
    train = write_corpus(tmp_path / "train.jsonl", 4, seed=5)
    recipe = tmp_path / "r.toml"
    recipe.write_text(TINY_RECIPE.replace("si_ratio = 0.0", "si_ratio = 1.0"))
    with pytest.raises(SystemExit, match="set si_ratio = 0"):
        model_cli(["train", "--dataset", "jsonl", "--train", str(train), "--dev", str(train), "--config", str(recipe),
                   "--out", str(tmp_path / "a")])
    with pytest.raises(SystemExit, match="go together"):
        model_cli(["train", "--dataset", "jsonl", "--train", str(train), "--out", str(tmp_path / "a")])


def test_data_check_lists_present_and_missing_files(data_dir, tmp_path, capsys):
    assert model_cli(["data", "check", "--data-dir", str(data_dir), "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert all(f["present"] and f["rows"] > 0 and len(f["sha256"]) == 64 for f in report["files"])
    (data_dir / "emorynlp" / "emotion-detection-dev.json").unlink()
    assert model_cli(["data", "check", "--data-dir", str(data_dir)]) == 1
    out = capsys.readouterr().out
    assert "missing  emorynlp/emotion-detection-dev.json" in out and "github.com/emorynlp/emotion-detection" in out
