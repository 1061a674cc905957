"""Loaders for MELD (CSV), EmoryNLP (JSON) and the Friends transcripts (the SI corpus).

Everything is read in place from a data directory (never copied into the project). Loaders
return plain `Dialogue` objects; labels are names, mapped to indices by the caller. Utterance
text is kept as the file spells it: the encoder's input path normalises it (model/encoding.py), the
same way for training, evaluation and the worker.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable
from pathlib import Path

from model.dialogue import Dialogue, Utterance, json_objects
from model.encoding import normalize_text

MELD_LABELS = ("neutral", "joy", "surprise", "anger", "sadness", "disgust", "fear")
EMORYNLP_LABELS = ("Neutral", "Joyful", "Peaceful", "Powerful", "Scared", "Mad", "Sad")
LABELS = {"meld": MELD_LABELS, "emorynlp": EMORYNLP_LABELS}
# Speaker identification targets: the six main characters, everyone else is "other".
SPEAKERS = ("Rachel", "Ross", "Chandler", "Monica", "Joey", "Phoebe", "other")

SPLIT_FILES = {
    ("meld", "train"): "meld/train_sent_emo.csv",
    ("meld", "dev"): "meld/dev_sent_emo.csv",
    ("emorynlp", "train"): "emorynlp/emotion-detection-trn.json",
    ("emorynlp", "dev"): "emorynlp/emotion-detection-dev.json",
}
FRIENDS_FILE = "friends/friends_transcripts.jsonl"
# Where each expected file comes from (what `emotion-monitor data check` tells a user who has none).
SOURCES = {
    "meld": ("MELD (Poria et al., 2019)", "https://affective-meld.github.io/ (github.com/declare-lab/MELD)", "GPL-3.0"),
    "emorynlp": ("EmoryNLP emotion detection (Zahiri and Choi, 2018)", "https://github.com/emorynlp/emotion-detection", "Apache-2.0"),
    "friends": ("Friends transcripts with speakers (character-mining; the `friends` R package)",
                "https://github.com/emorynlp/character-mining and https://github.com/EmilHvitfeldt/friends", "Apache-2.0 (character-mining) / MIT (R package); transcripts (c) Warner Bros."),
}


def default_data_dir() -> Path:
    """`--data-dir` default: $EMOTION_MONITOR_DATA_DIR, else ../shared/data when it exists."""
    env = os.environ.get("EMOTION_MONITOR_DATA_DIR")
    if env:
        return Path(env)
    return Path("../shared/data")


def is_group_speaker(name: str) -> bool:
    n = name.strip().lower()
    return n in {"all", "#all#", "everyone", "both"} or " and " in n or "," in n or n.startswith("#")


def speaker_class(name: str | None) -> str | None:
    """Map a speaker to an SI class: first name of a main character, "other", or None when the
    utterance has several speakers ("All", "Ross and Joey") and so no single answer."""
    if not name or is_group_speaker(name):
        return None
    first = name.strip().split()[0].capitalize()
    return first if first in SPEAKERS else "other"


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(
            f"{what} not found at {path}. Pass --data-dir pointing at a folder with "
            f"meld/, emorynlp/ and friends/ (see README, 'Data')."
        )
    return path


def load_meld(path: str | Path) -> list[Dialogue]:
    """MELD CSV (`Utterance, Speaker, Emotion, Dialogue_ID, Utterance_ID, ...`), dialogues in file order."""
    path = _require(Path(path), "MELD CSV")
    groups: dict[str, list[tuple[int, Utterance]]] = {}
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = {"Utterance", "Speaker", "Dialogue_ID", "Utterance_ID"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path}: not a MELD CSV, missing columns {sorted(missing)}")
        for row in reader:
            emotion = (row.get("Emotion") or "").strip().lower() or None
            utt = Utterance(row["Utterance"], normalize_text(row["Speaker"]), emotion)
            groups.setdefault(row["Dialogue_ID"].strip(), []).append((int(row["Utterance_ID"]), utt))
    # Utterance_IDs have gaps in some dialogues: order by id, keep every row.
    return [Dialogue(f"meld-{d}", tuple(u for _, u in sorted(rows, key=lambda r: r[0]))) for d, rows in groups.items()]


def load_emorynlp(path: str | Path) -> list[Dialogue]:
    """EmoryNLP JSON: episodes -> scenes -> utterances {speakers[], transcript, emotion}."""
    path = _require(Path(path), "EmoryNLP JSON")
    with open(path, encoding="utf-8") as fh:
        raw = json.load(fh)
    dialogues = []
    for ep in raw["episodes"]:
        for scene in ep["scenes"]:
            utts = []
            for u in scene["utterances"]:
                speakers = u.get("speakers") or []
                speaker = speakers[0] if len(speakers) == 1 else " and ".join(speakers) or "unknown"
                utts.append(Utterance(u["transcript"], normalize_text(speaker), u.get("emotion")))
            if utts:
                dialogues.append(Dialogue(f"emorynlp-{scene['scene_id']}", tuple(utts)))
    return dialogues


class DatasetError(ValueError):
    pass


def load_jsonl(path: str | Path) -> list[Dialogue]:
    """Labelled conversations of your own, one utterance per line (schemas/labelled-utterance.schema.json):
    {"conversation_id", "seq", "speaker", "text", "label", optional "role"}; conversations in order of
    first appearance, utterances by seq. `label` may be null for an unlabelled utterance only when
    the file is replayed, not trained on (training and evaluation need every label)."""
    path = _require(Path(path), "JSONL dataset")
    convs: dict[str, dict[int, Utterance]] = {}
    for n, row in json_objects(path, DatasetError):
        for key, kind in (("conversation_id", str), ("seq", int), ("speaker", str), ("text", str)):
            if not isinstance(row.get(key), kind) or isinstance(row.get(key), bool):
                raise DatasetError(f"{path}:{n}: field {key!r} must be a {kind.__name__} (got {type(row.get(key)).__name__})")
        label = row.get("label")
        if label is not None and (not isinstance(label, str) or not label.strip()):
            raise DatasetError(f"{path}:{n}: field 'label' must be a non-empty string or null")
        if row["seq"] < 0 or not row["text"].strip() or not row["speaker"].strip():
            raise DatasetError(f"{path}:{n}: seq must be >= 0, text and speaker non-empty")
        utts = convs.setdefault(row["conversation_id"], {})
        if row["seq"] in utts:
            raise DatasetError(f"{path}:{n}: conversation {row['conversation_id']!r} has seq {row['seq']} twice")
        utts[row["seq"]] = Utterance(row["text"], normalize_text(row["speaker"]), label.strip() if label else None)
    if not convs:
        raise DatasetError(f"{path}: no utterances")
    return [Dialogue(cid, tuple(u for _, u in sorted(utts.items()))) for cid, utts in convs.items()]


def load_dataset(name: str, path: str | Path) -> list[Dialogue]:
    if name == "meld":
        return load_meld(path)
    if name == "emorynlp":
        return load_emorynlp(path)
    if name == "jsonl":
        return load_jsonl(path)
    raise ValueError(f"unknown dataset {name!r}: use meld, emorynlp or jsonl")


def labels_of(dialogues: Iterable[Dialogue]) -> tuple[str, ...]:
    """The label set of a dataset without a fixed one (jsonl): every label seen, sorted."""
    labels = sorted({u.emotion for d in dialogues for u in d.utterances if u.emotion is not None}, key=str.lower)
    if len(labels) < 2:
        raise DatasetError(f"the training data has {len(labels)} distinct label(s); a classifier needs at least 2")
    lower = [lab.lower() for lab in labels]
    if len(set(lower)) != len(lower):
        raise DatasetError(f"labels differ only in case: {labels}; spell each label one way")
    return tuple(labels)


def speaker_classes(dataset: str, dialogues: Iterable[Dialogue], max_classes: int = 6):
    """SI classes and the function that maps a speaker to one (None = no single answer).

    MELD and EmoryNLP: the six Friends main characters and "other". Your own data (jsonl): its
    speakers that appear in at least two conversations, the `max_classes` most frequent, and
    "other"; ("other",) with no targets when fewer than two such speakers exist, which turns SI off (per-call speaker ids
    such as "customer-1042" carry no identity to learn).
    """
    if dataset in ("meld", "emorynlp"):
        return SPEAKERS, speaker_class
    counts: dict[str, int] = {}
    convs: dict[str, set[str]] = {}
    for d in dialogues:
        for u in d.utterances:
            counts[u.speaker] = counts.get(u.speaker, 0) + 1
            convs.setdefault(u.speaker, set()).add(d.id)
    recurring = sorted((s for s in counts if len(convs[s]) >= 2 and not is_group_speaker(s)), key=lambda s: (-counts[s], s))
    chosen = tuple(recurring[:max_classes])
    if len(chosen) < 2:
        return ("other",), lambda name: None
    known = set(chosen)

    def classify(name: str | None) -> str | None:
        if not name or is_group_speaker(name):
            return None
        return name if name in known else "other"

    return chosen + ("other",), classify


def split_path(data_dir: str | Path, dataset: str, split: str) -> Path:
    return Path(data_dir) / SPLIT_FILES[(dataset, split)]


def check_data_dir(data_dir: str | Path) -> dict:
    """Which expected files are present, with their row counts (utterances) and SHA-256."""
    import hashlib

    data_dir = Path(data_dir)
    files = [(dataset, rel) for (dataset, _), rel in SPLIT_FILES.items()] + [("friends", FRIENDS_FILE)]
    out = []
    for dataset, rel in files:
        path = data_dir / rel
        name, source, licence = SOURCES[dataset]
        entry = {"dataset": dataset, "path": rel, "present": path.exists(), "source": source, "licence": licence, "name": name}
        if path.exists():
            entry["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
            if dataset == "friends":
                entry["rows"] = sum(1 for line in open(path, encoding="utf-8") if line.strip())
            else:
                entry["rows"] = sum(len(d) for d in load_dataset(dataset, path))
        out.append(entry)
    return {"data_dir": str(data_dir), "files": out}


def load_friends(path: str | Path, exclude_texts: Iterable[str] = ()) -> list[Dialogue]:
    """Friends transcripts as scenes of (text, speaker), scene directions dropped.

    `exclude_texts`: utterances of the dev set being selected on. A scene sharing two or more
    of them (normalised, four words or longer) is left out, so speaker labels of dev dialogues
    never reach training.
    """
    path = _require(Path(path), "Friends transcripts (SI corpus)")
    excluded = {normalize_text(t).lower() for t in exclude_texts if len(t.split()) >= 4}
    scenes: dict[str, list[Utterance]] = {}
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            if row.get("is_scene_direction") or not row.get("text"):
                continue
            speaker = row.get("speaker") or "unknown group"
            scenes.setdefault(row["scene_id"], []).append(Utterance(row["text"], speaker))
    out = []
    for sid, utts in scenes.items():
        if excluded and sum(u.text.lower() in excluded for u in utts) >= 2:
            continue
        out.append(Dialogue(f"friends-{sid}", tuple(utts)))
    return out


def chunk(dialogues: Iterable[Dialogue], size: int) -> list[Dialogue]:
    """Cut long scenes into consecutive chunks of at most `size` utterances."""
    out = []
    for d in dialogues:
        for i in range(0, len(d), size):
            out.append(Dialogue(f"{d.id}#{i}", d.utterances[i : i + size]))
    return out
