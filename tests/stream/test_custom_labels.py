"""A model trained on your own labelled conversations (labels other than MELD's) served by the real worker."""

from __future__ import annotations

import json

import pytest

from model.cli import main as model_cli
from model.training.data import load_jsonl
from stream.kafka import create_topics
from tests.jsonl_corpus import LABELS, TINY_RECIPE, write_corpus
from tests.stream.worker_harness import WorkerProcess, collect, produce, run, unique_names, worker_env

pytestmark = pytest.mark.integration

RULES = f"""labels = {json.dumps(list(LABELS))}

[[rule]]
name = "customer_frustrated"
kind = "negative_streak"
roles = ["customer"]
emotions = ["frustrated"]
k = 1
m = 1
severity = "warning"
"""


def test_worker_serves_a_model_with_its_own_label_set(stack, tmp_path):
    train, dev = write_corpus(tmp_path / "train.jsonl", 12, seed=3), write_corpus(tmp_path / "dev.jsonl", 3, seed=4)
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(TINY_RECIPE)
    assert model_cli(["train", "--dataset", "jsonl", "--train", str(train), "--dev", str(dev), "--config", str(recipe),
                      "--out", str(tmp_path / "art")]) == 0
    rules = tmp_path / "rules.toml"
    rules.write_text(RULES)
    names = unique_names()
    run(create_topics(stack.bootstrap, {names["utterances"]: 3, names["emotions"]: 3, names["dlq"]: 1}))
    w = WorkerProcess(worker_env(stack, tmp_path / "art", names, rules_path=rules), tmp_path / "worker.log")
    # The dev file replayed as utterance messages: its lines are utterance messages plus a label.
    dialogues = load_jsonl(dev)
    rows = [json.loads(line) for line in dev.read_text().splitlines()]
    messages = sorted((r for r in rows), key=lambda r: (r["conversation_id"], r["seq"]))
    messages = [{k: v for k, v in m.items() if k != "label"} for m in messages]
    messages += [{"type": "end", "conversation_id": d.id} for d in dialogues]
    n = sum(len(d) for d in dialogues)
    try:
        w.wait_ready()
        run(produce(stack.bootstrap, names["utterances"], messages))
        events = run(collect(stack.bootstrap, names["emotions"],
                             lambda ev: sum(e["status"] == "final" for e in ev) >= n, timeout_s=120))
    finally:
        w.stop()
    finals = [e for e in events if e["status"] == "final"]
    assert len(finals) == n, w.tail()
    assert all(set(e["scores"]) == set(LABELS) and e["emotion"] in LABELS for e in finals)
