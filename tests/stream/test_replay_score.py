"""`replay --score` / `demo --score`: the pure scoring (stream/tools/scoring.py), the labelled replay
formats, and the replayed score against `evaluate` through a real worker."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import f1_score

from model.training.data import MELD_LABELS, default_data_dir
from model.training.evaluate import metrics_from_probs
from stream.tools.replay import _load_labelled, _with_ends, load_gold, load_messages
from stream.tools.scoring import REPORT_KEYS, SentUtterance, score_replay
from tests.conftest import write_emorynlp_json, write_meld_csv

LABELS = list(MELD_LABELS)


def _event(cid, seq, status, label, ts, eid=None, probs=None):
    scores = {lab: (0.9 if lab == label else 0.1 / (len(LABELS) - 1)) for lab in LABELS}
    if probs is not None:
        scores = dict(zip(LABELS, probs))
    return {"event_id": eid or f"{cid}-{seq}-{status}", "conversation_id": cid, "seq": seq, "status": status,
            "emotion": label, "scores": scores, "ts_produced": ts}


# ---- the pure scoring ---------------------------------------------------------------------

def test_report_counts_lost_duplicates_changes_and_latency():
    sent = [SentUtterance("c1", 0, 100.0, "anger"), SentUtterance("c1", 1, 100.1, "joy"),
            SentUtterance("c1", 2, 100.2, "neutral"), SentUtterance("c2", 0, 100.3, "fear")]
    received = [
        (100.01, _event("c1", 0, "provisional", "neutral", 100.0)),
        (100.15, _event("c1", 1, "provisional", "joy", 100.1)),
        (100.25, _event("c1", 2, "provisional", "neutral", 100.2)),
        (100.35, _event("c1", 0, "final", "anger", 100.0)),  # changed: neutral -> anger
        (100.40, _event("c1", 1, "final", "joy", 100.1)),
        (100.45, _event("c1", 1, "final", "joy", 100.1)),  # redelivered: same id again
        (100.50, _event("c1", 2, "revised", "joy", 100.2)),
        (100.55, _event("c1", 2, "final", "neutral", 100.2)),
        # c2/0 never answered: lost. Events of an earlier run of the same file (other ts): ignored.
        (90.0, _event("c2", 0, "final", "fear", 50.0)),
        (90.0, _event("c9", 0, "final", "fear", 100.0)),
    ]
    r = score_replay(sent, received)
    assert set(REPORT_KEYS) <= set(r)
    assert (r["sent"], r["finals"], r["lost"], r["duplicate_final_ids"]) == (4, 3, 1, 1)
    assert r["ignored_events"] == 2 and r["several_final_ids"] == 0
    assert r["provisional_changed_share"] == round(1 / 3, 4)
    assert r["weighted_f1_final"] == 100.0 and r["macro_f1_final"] == round(100 * 3 / 7, 2)  # 3 classes right of 7
    # provisional: anger predicted neutral; weighted over the gold labels anger, joy, neutral
    gold, pred = [3, 1, 0], [0, 1, 0]
    assert r["weighted_f1_provisional"] == round(100 * f1_score(gold, pred, labels=list(range(7)), average="weighted",
                                                                 zero_division=0), 2)
    assert r["latency_provisional_p50_ms"] == pytest.approx(50.0, abs=0.2)
    assert r["latency_final_p50_ms"] == pytest.approx(350.0, abs=0.2)  # c1/0 350, c1/1 300, c1/2 350
    assert r["latency_final_p99_ms"] == pytest.approx(350.0, abs=0.2)
    assert json.loads(json.dumps(r)) == r  # one JSON object, as printed by --json


def test_f1_equals_sklearn_and_evaluate_on_random_events():
    rng = np.random.default_rng(5)
    n = 300
    gold = rng.integers(0, len(LABELS), n)
    probs_final = rng.dirichlet(np.ones(len(LABELS)), n)
    probs_prov = rng.dirichlet(np.ones(len(LABELS)), n)
    sent = [SentUtterance(f"c{i // 10}", i % 10, float(i), LABELS[g].upper() if i % 3 == 0 else LABELS[g])  # case-insensitive
            for i, g in enumerate(gold)]
    received = []
    for i, s in enumerate(sent):
        received.append((s.ts + 0.02, _event(s.conversation_id, s.seq, "provisional", "x", s.ts, probs=probs_prov[i].tolist())))
        received.append((s.ts + 0.05, _event(s.conversation_id, s.seq, "final", "x", s.ts, probs=probs_final[i].tolist())))
    r = score_replay(sent, received)
    ids = list(range(len(LABELS)))
    assert r["weighted_f1_final"] == round(100 * f1_score(gold, probs_final.argmax(-1), labels=ids, average="weighted"), 2)
    assert r["macro_f1_final"] == round(100 * f1_score(gold, probs_final.argmax(-1), labels=ids, average="macro"), 2)
    ev = metrics_from_probs(gold, {"final": probs_final, "provisional": probs_prov}, LABELS)
    for key in ("weighted_f1_final", "weighted_f1_provisional", "macro_f1_final"):
        assert r[key] == ev[key], key
    assert (r["lost"], r["duplicate_final_ids"], r["scored_final"]) == (0, 0, n)


def test_unlabelled_file_reports_delivery_and_latency_without_f1():
    sent = [SentUtterance("c", 0, 1.0), SentUtterance("c", 1, 2.0, "nonsense")]
    r = score_replay(sent, [(1.1, _event("c", 0, "final", "joy", 1.0)), (2.1, _event("c", 1, "final", "joy", 2.0))])
    assert (r["finals"], r["lost"], r["weighted_f1_final"], r["weighted_f1_provisional"]) == (2, 0, None, None)
    assert r["gold_not_in_model_labels"] == ["nonsense"]
    assert r["latency_final_p50_ms"] == pytest.approx(100.0)
    assert r["provisional_changed_share"] is None
    empty = score_replay([], [])
    assert (empty["sent"], empty["lost"], empty["latency_final_p99_ms"]) == (0, 0, None)


# ---- the labelled replay formats ----------------------------------------------------------

def test_emorynlp_json_replays_with_its_gold_labels(tmp_path):
    path = write_emorynlp_json(tmp_path / "emotion-detection-dev.json")
    msgs = load_messages(path)
    assert [(m["conversation_id"], m.get("seq", m.get("type"))) for m in msgs] == [
        ("emorynlp-s01_e01_c01", 0), ("emorynlp-s01_e01_c01", 1), ("emorynlp-s01_e01_c01", 2),
        ("emorynlp-s01_e01_c01", "end"), ("emorynlp-s01_e01_c02", 0), ("emorynlp-s01_e01_c02", "end")]
    assert msgs[1]["speaker"] == "Ross Geller and Joey Tribbiani"  # as model.training.data.load_emorynlp
    assert load_gold(path)[("emorynlp-s01_e01_c01", 2)] == "Mad"


def test_labelled_jsonl_keeps_the_label_out_of_the_message_and_gets_end_messages(tmp_path):
    path = tmp_path / "calls.jsonl"
    rows = [{"conversation_id": "a", "seq": 0, "speaker": "s1", "role": "customer", "text": "hi", "label": "calm"},
            {"conversation_id": "b", "seq": 0, "speaker": "s2", "text": "hello", "label": None},
            {"conversation_id": "a", "seq": 1, "speaker": "s3", "role": "agent", "text": "hey", "label": "upset"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert all("label" not in m for m in load_messages(path))
    assert load_gold(path) == {("a", 0): "calm", ("a", 1): "upset"}
    closed = [m for _, m, _ in _with_ends(_load_labelled(path))]
    assert [(m["conversation_id"], m.get("type", "utt")) for m in closed] == [
        ("a", "utt"), ("b", "utt"), ("b", "end"), ("a", "utt"), ("a", "end")]
    # a file whose conversations end already gets no second end
    meld = write_meld_csv(tmp_path / "m.csv")
    assert _with_ends(_load_labelled(meld)) == _load_labelled(meld)


# ---- through a real worker ----------------------------------------------------------------

SLICE = [  # a few MELD dialogues (Dialogue_ID, Utterance_ID, Speaker, Emotion, Utterance)
    (d, u, spk, emo, f"{text} ({d}.{u})")
    for d in range(6)
    for u, (spk, emo, text) in enumerate([
        ("Ross", "neutral", "So I told her the truth"), ("Rachel", "surprise", "You did what?!"),
        ("Ross", "sadness", "I had to, I'm sorry"), ("Rachel", "anger", "How could you do this to me"),
        ("Monica", "joy", "Guys, the pizza is here!"), ("Joey", "joy", "Pizza!"),
        ("Chandler", "fear", "Is that a spider on the box?"), ("Phoebe", "disgust", "Ew, it's eating the cheese")][: 4 + d % 5])
]


@pytest.mark.integration
def test_replay_score_of_a_meld_slice_equals_evaluate(stack, tiny_artifact, tmp_path, monkeypatch, capsys):
    from model.artifact import load_artifact
    from model.encoders import load_tokenizer
    from model.training.data import load_meld
    from model.training.evaluate import evaluate
    from stream.cli import main
    from stream.kafka import create_topics
    from tests.stream.worker_harness import WorkerProcess, run, unique_names, worker_env

    data = write_meld_csv(tmp_path / "slice.csv", SLICE)
    names = unique_names()
    run(create_topics(stack.bootstrap, {names["utterances"]: 3, names["emotions"]: 3, names["dlq"]: 1}))
    worker = WorkerProcess(worker_env(stack, tiny_artifact, names), tmp_path / "worker.log")
    monkeypatch.setenv("EMOTION_MONITOR_EMOTIONS_TOPIC", names["emotions"])
    try:
        worker.wait_ready()
        rc = main(["replay", str(data), "--score", "--json", "--no-progress", "--bootstrap", stack.bootstrap,
                   "--topic", names["utterances"], "--timeout", "90"])
        worker.check()
    finally:
        worker.stop()
    out = capsys.readouterr().out.strip().splitlines()
    report = json.loads(out[-1])
    assert rc == 0, (out, worker.tail())
    n = len(SLICE)
    assert (report["sent"], report["finals"], report["lost"], report["duplicate_final_ids"]) == (n, n, 0, 0)
    assert report["scored_final"] == report["scored_provisional"] == n
    assert report["latency_provisional_p50_ms"] > 0 and report["latency_final_p99_ms"] >= report["latency_final_p50_ms"]
    model, _ = load_artifact(tiny_artifact)
    metrics, _, _ = evaluate(model, load_tokenizer(model.cfg), load_meld(data), modes=("final", "provisional"))
    assert abs(report["weighted_f1_final"] - metrics["weighted_f1_final"]) <= 0.3, (report, metrics)
    assert abs(report["weighted_f1_provisional"] - metrics["weighted_f1_provisional"]) <= 0.3, (report, metrics)
    assert any("weighted-F1 final" in line for line in out)  # the human-readable lines come first


MELD_DEV = default_data_dir() / "meld" / "dev_sent_emo.csv"


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.skipif(not MELD_DEV.is_file(), reason=f"MELD dev split not found at {MELD_DEV}")
def test_demo_score_of_the_meld_dev_split_equals_evaluate(capsys):
    """The whole dev split through `demo --score --json` (local stack, a worker, the default model),
    against `evaluate` with the encoder the worker serves on this machine (backend auto: on a CPU,
    int8 for the default model, which ships its calibration). int8 is held to the same equality as
    float: its vectors must not depend on which utterances the worker batched together."""
    import torch

    from model.config import DEFAULT_MODEL
    from model.scorer import Scorer
    from model.training.data import load_meld
    from model.training.evaluate import evaluate
    from stream.cli import main

    rc = main(["demo", "--file", str(MELD_DEV), "--score", "--json", "--quiet", "--dashboard-port", "0", "--timeout", "1500"])
    out = capsys.readouterr().out.strip().splitlines()
    report = json.loads(out[-1])
    print("replay report:", json.dumps(report))
    assert rc == 0 and report["lost"] == 0 and report["duplicate_final_ids"] == 0, report
    scorer = Scorer(DEFAULT_MODEL, "auto", backend="auto")
    metrics, _, _ = evaluate(scorer.model, scorer.tokenizer, load_meld(MELD_DEV), modes=("final", "provisional"),
                             encode=lambda texts: torch.from_numpy(scorer.encode(texts)))
    print("evaluate:", scorer.backend, json.dumps({k: v for k, v in metrics.items() if k != "per_class"}))
    assert report["sent"] == metrics["n_utterances"]
    assert abs(report["weighted_f1_final"] - metrics["weighted_f1_final"]) <= 0.3, (report, metrics)
