from model.dialogue import party_ids
from model.encoding import normalize_text
from model.training import data as D
from tests.conftest import write_emorynlp_json, write_friends_jsonl, write_meld_csv


def test_meld_loader_groups_orders_and_keeps_the_files_spelling(tmp_path):
    dls = D.load_meld(write_meld_csv(tmp_path / "m.csv"))
    assert [len(d) for d in dls] == [4, 3, 2]
    first = dls[0].utterances
    # The text as the file spells it: the encoder's input path normalises (model/encoding.py).
    assert first[0].text == "also I was the point person on my company\u2019s transition."
    assert normalize_text(first[0].text) == "also I was the point person on my company's transition."
    assert first[3].speaker == "All" and first[3].emotion == "surprise"  # kept despite the id gap


def test_emorynlp_loader_joins_multiple_speakers(tmp_path):
    dls = D.load_emorynlp(write_emorynlp_json(tmp_path / "e.json"))
    assert [len(d) for d in dls] == [3, 1]
    assert dls[0].utterances[1].speaker == "Ross Geller and Joey Tribbiani"
    assert normalize_text(dls[0].utterances[2].text) == "I'm so mad at you."
    assert {u.emotion for d in dls for u in d.utterances} <= set(D.EMORYNLP_LABELS)


def test_speaker_classes_handle_groups_and_others():
    assert D.speaker_class("Ross Geller") == "Ross"
    assert D.speaker_class("Joey") == "Joey"
    assert D.speaker_class("The Interviewer") == "other"
    assert D.speaker_class("All") is None
    assert D.speaker_class("Ross and Joey") is None
    assert D.speaker_class("#ALL#") is None
    assert D.speaker_class(None) is None


def test_friends_loader_drops_directions_and_excludes_dev_scenes(tmp_path):
    path = write_friends_jsonl(tmp_path / "f.jsonl")
    scenes = D.load_friends(path)
    assert len(scenes) == 3 and all(len(s) == 8 for s in scenes)  # scene direction dropped, null speaker kept as a group
    assert not any(u.text.startswith("[") for s in scenes for u in s.utterances)
    dev = ["C'mon, you're going out with the guy!", "All right Joey, be nice."]
    assert D.load_friends(path, exclude_texts=dev) == []  # every scene shares two dev lines
    chunks = D.chunk(scenes, 3)
    assert [len(c) for c in chunks[:3]] == [3, 3, 2]


def test_party_ids_follow_first_appearance():
    assert party_ids(["b", "a", "b", "c", "d"], num_parties=3) == [0, 1, 0, 2, 2]
