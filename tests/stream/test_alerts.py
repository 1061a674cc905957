"""Alert rules and conversation summaries (stream/core/: rules, monitor, trajectory, risk, summary):
pure functions, no broker."""

from __future__ import annotations

import json
from importlib.resources import files

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stream.core.codec import monitor_from_dict, monitor_to_dict, trajectory_from_dict, trajectory_to_dict
from stream.core.events import model_id_of
from stream.core.monitor import MonitorState, on_final
from stream.core.rules import check_labels, load_rules
from stream.core.summary import monitor_risk, summarize
from stream.core.trajectory import MAX_TRAJECTORY, Final, Trajectory

MELD = ["neutral", "joy", "surprise", "anger", "sadness", "disgust", "fear"]
MODEL = {"name": "emotion-si-meld", "version": "0.1.0"}
MODEL_ID = model_id_of(MODEL)
CID = "call-1042"


def _validator(name: str):
    schema = json.loads(files("stream").joinpath("schemas", f"{name}.schema.json").read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


ALERT = _validator("alert")
SUMMARY = _validator("summary")


def ev(seq, emotion, role="customer", speaker=None, score=0.7, status="final", cid=CID, model=MODEL):
    speaker = speaker or (f"{role}-1042" if role else "anon")
    rest = (1.0 - score) / (len(MELD) - 1)
    scores = {lab: (score if lab == emotion else rest) for lab in MELD}
    return {"event_id": f"{seq:032x}", "conversation_id": cid, "seq": seq, "speaker": speaker, "role": role,
            "emotion": emotion, "scores": scores, "status": status, "model": model, "context_reset": False,
            "ts_produced": 1764165600.0 + seq, "ts_received": 1764165600.1 + seq, "ts_emitted": 1764165600.2 + seq}


def run(rules, events, state=None):
    state = state or MonitorState()
    alerts = []
    for i, e in enumerate(events):
        state, out = on_final(rules, state, e, now=1764165700.0 + i)
        for a in out:
            ALERT.validate(a)
        alerts.extend(out)
    return state, alerts


def dialogue(customer_emotions, agent="neutral", **kw):
    """Customer and agent take turns: customer at even seqs, agent at odd seqs."""
    out = []
    for i, emo in enumerate(customer_emotions):
        out.append(ev(2 * i, emo, **kw))
        out.append(ev(2 * i + 1, agent, role="agent"))
    return out


def by_rule(alerts, name, kind="raised"):
    return [a for a in alerts if a["rule"] == name and a["kind"] == kind]


@pytest.fixture(scope="module")
def rules():
    return load_rules()


def test_default_rules_load(rules):
    names = {r.name: r for r in rules}
    assert set(names) == {"customer_negative_streak", "customer_negative_streak_critical", "customer_intense_anger",
                          "customer_escalation", "customer_recovered"}
    streak = names["customer_negative_streak"]
    assert (streak.kind, streak.k, streak.m, streak.severity, streak.roles) == ("negative_streak", 3, 4, "warning", ("customer",))
    assert set(streak.emotions) == {"anger", "disgust", "sadness"}
    assert names["customer_negative_streak_critical"].severity == "critical"
    assert names["customer_recovered"].kind == "recovery" and names["customer_recovered"].severity == "info"
    check_labels(rules, MELD)  # the default file is for MELD labels
    with pytest.raises(ValueError, match="anger"):
        check_labels(rules, ["Neutral", "Joyful", "Peaceful", "Powerful", "Scared", "Mad", "Sad"])


def test_long_angry_run_raises_once(rules):
    state, alerts = run(rules, dialogue(["anger"] * 20))
    streak = by_rule(alerts, "customer_negative_streak")
    assert len(streak) == 1, alerts
    a = streak[0]
    # customer finals are seqs 0, 2, 4: three of the (so far three) customer finals
    assert (a["seq_from"], a["seq_to"], a["severity"], a["role"], a["speaker"]) == (0, 4, "warning", "customer", "customer-1042")
    assert a["reason"] == "customer: anger or disgust or sadness in 3 of the last 3 utterances (seq 0-4)"
    assert a["closes"] is None and a["model"] == MODEL and a["ts_emitted"] > 0
    crit = by_rule(alerts, "customer_negative_streak_critical")
    assert len(crit) == 1 and crit[0]["seq_to"] == 6 and crit[0]["severity"] == "critical"
    assert not by_rule(alerts, "customer_intense_anger")  # score 0.7 < 0.8
    assert not by_rule(alerts, "customer_escalation")  # never neutral -> anger
    assert len(alerts) == 2
    assert monitor_risk(state) == 1.0


def test_intense_anger_twice_is_critical(rules):
    evs = [ev(0, "anger", score=0.9), ev(1, "neutral", role="agent"), ev(2, "neutral"), ev(3, "anger", score=0.85)]
    _, alerts = run(rules, evs)
    hits = by_rule(alerts, "customer_intense_anger")
    assert len(hits) == 1 and hits[0]["severity"] == "critical" and (hits[0]["seq_from"], hits[0]["seq_to"]) == (0, 3)
    assert "score >= 0.8" in hits[0]["reason"]


def test_escalation_neutral_to_anger(rules):
    # the agent's utterance in between does not break "consecutive finals of the customer"
    _, alerts = run(rules, dialogue(["neutral", "neutral", "anger"]))
    esc = by_rule(alerts, "customer_escalation")
    assert len(esc) == 1
    assert (esc[0]["seq_from"], esc[0]["seq_to"], esc[0]["severity"]) == (2, 4, "warning")
    assert "neutral" in esc[0]["reason"] and "anger" in esc[0]["reason"]
    # joy -> anger too; sadness -> anger and neutral -> sadness not
    _, alerts = run(rules, dialogue(["joy", "anger"]))
    assert len(by_rule(alerts, "customer_escalation")) == 1
    _, alerts = run(rules, dialogue(["sadness", "anger", "neutral", "sadness"]))
    assert not by_rule(alerts, "customer_escalation")


def test_recovery_after_calm(rules):
    state, alerts = run(rules, dialogue(["anger", "anger", "disgust"]))
    raised = by_rule(alerts, "customer_negative_streak")
    assert len(raised) == 1
    risk_angry = monitor_risk(state)
    assert risk_angry >= 0.6 + 0.4 * 0.5  # all negative + an open warning
    # 3 calm customer finals: not yet
    # (the agent's anger in between does not count against the customer)
    calm = [ev(6, "neutral"), ev(7, "anger", role="agent"), ev(8, "joy"), ev(9, "anger", role="agent"), ev(10, "neutral")]
    state, more = run(rules, calm, state)
    assert more == []
    state, more = run(rules, [ev(12, "surprise")], state)
    assert len(more) == 1
    rec = more[0]
    # named after the alert it closes, so (rule, role, speaker) pairs them; `closes` pairs them exactly
    assert (rec["kind"], rec["rule"], rec["severity"], rec["role"], rec["speaker"]) == (
        "recovered", "customer_negative_streak", "info", "customer", "customer-1042")
    assert (rec["seq_from"], rec["seq_to"]) == (6, 12)
    assert rec["closes"] == raised[0]["alert_id"] != rec["alert_id"]
    assert "rule customer_recovered" in rec["reason"] and "seq 6-12" in rec["reason"]
    assert all(not g.open for g in state.groups)
    assert monitor_risk(state) == pytest.approx(0.6 * 1 / 5)  # one negative final left in the last 5, no open alert
    # a second calm stretch does not recover again; a new angry episode raises again
    state, more = run(rules, [ev(s, "neutral") for s in (14, 16, 18, 20)], state)
    assert more == []
    state, more = run(rules, [ev(s, "anger") for s in (22, 24, 26)], state)
    assert [a["rule"] for a in more if a["kind"] == "raised"][:2] == ["customer_escalation", "customer_negative_streak"]


def test_recovery_closes_each_open_alert(rules):
    state, alerts = run(rules, dialogue(["neutral", "anger", "anger", "anger", "anger"]))
    raised = [a for a in alerts if a["kind"] == "raised"]
    assert [a["rule"] for a in raised] == ["customer_escalation", "customer_negative_streak", "customer_negative_streak_critical"]
    assert monitor_risk(state) == pytest.approx(0.6 * 4 / 5 + 0.4)  # 4 of the last 5 negative, a critical open
    state, more = run(rules, [ev(s, "neutral") for s in (10, 12, 14, 16)], state)
    assert [(a["kind"], a["rule"], a["closes"]) for a in more] == [("recovered", a["rule"], a["alert_id"]) for a in raised]
    assert len({a["alert_id"] for a in alerts + more}) == 6
    assert all((a["seq_from"], a["seq_to"], a["severity"]) == (10, 16, "info") for a in more)
    s = summarize(state, CID, "end", MODEL_ID, now=1.0)
    assert s["open_alerts"] == [] and [a["kind"] for a in s["alerts"]] == ["raised"] * 3 + ["recovered"] * 3


def test_recovery_run_starts_after_the_latest_raise(rules):
    # a calm final before the alert does not count towards its recovery
    _, alerts = run(rules, [ev(0, "anger"), ev(1, "neutral"), ev(2, "anger"), ev(3, "anger"),
                            ev(4, "neutral"), ev(5, "neutral"), ev(6, "neutral")])
    assert not [a for a in alerts if a["kind"] == "recovered"]


def test_cooldown(tmp_path):
    path = tmp_path / "rules.toml"
    path.write_text("""
[[rule]]
name = "any_anger"
kind = "negative_streak"
emotions = ["anger"]
k = 1
m = 1
cooldown = 5

[[rule]]
name = "calm"
kind = "recovery"
emotions = ["anger"]
m = 1
""")
    rules = load_rules(path)
    # anger, calm (recovers), anger (only 2 finals after the raise: cooling down), calm, calm, anger (5 after)
    _, alerts = run(rules, [ev(i, e) for i, e in enumerate(["anger", "neutral", "anger", "neutral", "neutral", "anger"])])
    assert [(a["rule"], a["kind"], a["seq_to"]) for a in alerts] == [
        ("any_anger", "raised", 0), ("any_anger", "recovered", 1), ("any_anger", "raised", 5)]


def test_agent_anger_does_not_trigger_customer_rules(rules):
    evs = [ev(i, "anger", role="agent") if i % 2 else ev(i, "neutral") for i in range(20)]
    state, alerts = run(rules, evs)
    assert alerts == []
    assert monitor_risk(state) == 0.0
    assert {g.role for g in state.groups} == {"customer"}


def test_null_role_groups_per_speaker(rules):
    evs = []
    for i in range(4):
        evs.append(ev(2 * i, "anger", role=None, speaker="alice"))
        evs.append(ev(2 * i + 1, "neutral", role=None, speaker="bob"))
    _, alerts = run(rules, evs)
    streak = by_rule(alerts, "customer_negative_streak")
    assert len(streak) == 1
    assert streak[0]["role"] is None and streak[0]["speaker"] == "alice"
    assert (streak[0]["seq_from"], streak[0]["seq_to"]) == (0, 4)  # bob's finals do not dilute alice's
    assert streak[0]["reason"].startswith("speaker alice: ")
    assert all(a["speaker"] == "alice" for a in alerts)


def test_no_role_ignore(tmp_path):
    path = tmp_path / "rules.toml"
    path.write_text('[[rule]]\nname = "s"\nkind = "negative_streak"\nno_role = "ignore"\nemotions = ["anger"]\nk = 1\nm = 1\n')
    _, alerts = run(load_rules(path), [ev(0, "anger", role=None, speaker="alice")])
    assert alerts == []


def test_non_final_and_redelivered_events_are_ignored(rules):
    state = MonitorState()
    for status in ("provisional", "revised"):
        new, out = on_final(rules, state, ev(0, "anger", status=status), now=1.0)
        assert new is state and out == []
    state, _ = run(rules, [ev(0, "anger"), ev(1, "anger"), ev(2, "anger")])
    again, out = on_final(rules, state, ev(2, "anger"), now=2.0)
    assert again is state and out == []


def test_summary_fields_and_determinism(rules):
    evs = dialogue(["neutral", "joy", "anger", "anger", "sadness", "neutral"])
    evs[4]["scores"]["anger"], evs[4]["scores"]["neutral"] = 0.95, 0.0  # seq 4 anger, highest peak
    state, alerts = run(rules, evs)
    s = summarize(state, CID, "end", MODEL_ID, now=1764165999.0)
    SUMMARY.validate(s)
    assert s["conversation_id"] == CID and s["ended_by"] == "end" and s["utterances"] == 12
    assert s["distribution"] == {"customer": {"neutral": 2, "joy": 1, "anger": 2, "sadness": 1}, "agent": {"neutral": 6}}
    assert [p["seq"] for p in s["trajectory"]] == list(range(12)) and not s["trajectory_truncated"]
    assert s["trajectory"][4] == {"seq": 4, "role": "customer", "speaker": "customer-1042", "emotion": "anger", "score": 0.95}
    assert [p["seq"] for p in s["peaks"]] == [4, 2, 6]  # non-neutral, by score, ties by seq
    assert all(p["emotion"] != "neutral" for p in s["peaks"])
    assert [a["alert_id"] for a in s["alerts"]] == [a["alert_id"] for a in alerts]
    assert set(s["alerts"][0]) == {"alert_id", "rule", "kind", "severity", "seq_from", "seq_to"}
    assert s["open_alerts"] == [a["alert_id"] for a in alerts if a["kind"] == "raised"]
    assert 0.0 <= s["risk"] <= 1.0 and s["model"] == MODEL and s["ts_emitted"] == 1764165999.0
    # same input, same ids; other conversation or model, other ids
    state2, alerts2 = run(rules, evs)
    assert alerts2 == alerts
    assert summarize(state2, CID, "end", MODEL_ID, now=1764165999.0) == s
    assert summarize(state2, CID, "idle", MODEL_ID, now=5.0)["summary_id"] == s["summary_id"]
    assert summarize(state, "call-7", "end", MODEL_ID, now=1.0)["summary_id"] != s["summary_id"]
    other = {"name": "emotion-si-meld", "version": "0.2.0"}
    assert summarize(state, CID, "end", model_id_of(other), now=1.0)["summary_id"] != s["summary_id"]
    _, alerts3 = run(rules, dialogue(["neutral", "joy", "anger", "anger", "sadness", "neutral"], model=other))
    assert {a["alert_id"] for a in alerts3}.isdisjoint(a["alert_id"] for a in alerts)
    assert len({a["alert_id"] for a in alerts}) == len(alerts)
    with pytest.raises(ValueError):
        summarize(state, CID, "crash", MODEL_ID, now=1.0)


def test_empty_summary_and_trajectory_cap(rules):
    s = summarize(MonitorState(), CID, "idle", MODEL_ID, now=1.0)
    SUMMARY.validate(s)
    assert s["utterances"] == 0 and s["trajectory"] == [] and s["peaks"] == [] and s["risk"] == 0.0
    state, _ = run(rules, [ev(i, "neutral", role="agent") for i in range(MAX_TRAJECTORY + 20)])
    s = summarize(state, CID, "idle", MODEL_ID, now=1.0)
    SUMMARY.validate(s)
    assert s["utterances"] == MAX_TRAJECTORY + 20 and s["trajectory_truncated"]
    assert len(s["trajectory"]) == MAX_TRAJECTORY and s["trajectory"][0]["seq"] == 20


def test_state_round_trips_through_json(rules):
    evs = dialogue(["neutral", "anger", "anger", "anger", "neutral"]) + [ev(100, "anger", role=None, speaker="x")]
    state, _ = run(rules, evs)
    assert any(g.open for g in state.groups)
    restored = monitor_from_dict(json.loads(json.dumps(monitor_to_dict(state))))
    assert restored == state
    # and carries on exactly like the original
    tail = [ev(s, "neutral") for s in (102, 104, 106, 108)]
    assert run(rules, tail, restored) == run(rules, tail, state)
    with pytest.raises(ValueError, match="version"):
        monitor_from_dict({**monitor_to_dict(state), "v": 99})


def test_state_stays_bounded(rules):
    evs = [ev(i, ["anger", "neutral", "neutral", "anger", "anger", "anger", "neutral", "neutral", "neutral", "neutral"][i % 10])
           for i in range(3000)]
    state, alerts = run(rules, evs)
    assert len(alerts) > 100 and state.alerts_truncated and len(state.alerts) == 100
    assert len(state.trajectory) == MAX_TRAJECTORY
    assert all(len(g.last_finals) <= 5 for g in state.groups)
    assert len(json.dumps(monitor_to_dict(state))) < 200_000
    SUMMARY.validate(summarize(state, CID, "end", MODEL_ID, now=1.0))


@pytest.mark.parametrize(
    "text, match",
    [
        ('[[rule]]\nname = "x"\nkind = "shouting"\nemotions = ["anger"]\n', "unknown kind 'shouting'"),
        ('[[rule]]\nname = "x"\nkind = "negative_streak"\nemotions = ["anger"]\nk = 1\nm = 2\nthreshold = 3\n',
         "unknown key 'threshold'"),
        ('[[rule]]\nname = "x"\nkind = "recovery"\nemotions = ["anger"]\nm = 2\nk = 1\n', "unknown key 'k'"),
        ('[[rule]]\nname = "x"\nkind = "negative_streak"\nemotions = ["anger"]\nm = 2\n', "missing required key 'k'"),
        ('[[rule]]\nname = "x"\nkind = "negative_streak"\nemotions = ["anger"]\nk = 3\nm = 2\n', "'k' \\(3\\) must not exceed"),
        ('[[rule]]\nname = "x"\nkind = "negative_streak"\nemotions = ["anger"]\nk = 1\nm = 2\nseverity = "panic"\n', "'severity'"),
        ('[[rule]]\nname = "x"\nkind = "negative_streak"\nemotions = ["anger"]\nk = 1\nm = 2\nroles = "customer"\n', "'roles'"),
        ('[[rule]]\nname = "x"\nkind = "negative_streak"\nemotions = ["anger"]\nk = 1\nm = 2\nmin_score = 2\n', "'min_score'"),
        ('labels = ["neutral", "anger"]\n[[rule]]\nname = "x"\nkind = "negative_streak"\nemotions = ["angry"]\nk = 1\nm = 2\n',
         "'angry'"),
        (('[[rule]]\nname = "x"\nkind = "recovery"\nemotions = ["anger"]\nm = 2\n'
          '[[rule]]\nname = "x"\nkind = "recovery"\nemotions = ["anger"]\nm = 3\n'),
         "duplicate rule name 'x'"),
        ('[[rules]]\nname = "x"\n', "unknown top-level key 'rules'"),
        ('[[rule]\nname = ', "not valid TOML"),
    ],
)
def test_bad_rules_file(tmp_path, text, match):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=match) as info:
        load_rules(path)
    assert str(path) in str(info.value)


def test_missing_rules_file(tmp_path):
    with pytest.raises(ValueError, match="cannot read"):
        load_rules(tmp_path / "nope.toml")


LABELS = st.sampled_from(MELD)
ROLES = st.sampled_from(["customer", "agent", None])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(LABELS, ROLES, st.sampled_from(["a", "b"]), st.floats(0.2, 1.0)), max_size=60))
def test_random_conversations(steps):
    rules = load_rules()
    state = MonitorState()
    open_ids: set[str] = set()
    for seq, (emo, role, spk, score) in enumerate(steps):
        state, out = on_final(rules, state, ev(seq, emo, role=role, speaker=spk, score=score), now=float(seq))
        for a in out:
            ALERT.validate(a)
            assert a["seq_from"] <= a["seq_to"] == seq
            if a["kind"] == "raised":
                assert a["alert_id"] not in open_ids
                open_ids.add(a["alert_id"])
            else:
                assert a["closes"] in open_ids
                open_ids.discard(a["closes"])
        assert open_ids == {a.alert_id for g in state.groups for a in g.open}
        assert 0.0 <= monitor_risk(state) <= 1.0
        assert monitor_from_dict(json.loads(json.dumps(monitor_to_dict(state)))) == state
    SUMMARY.validate(summarize(state, CID, "end", MODEL_ID, now=1.0))


def test_shipped_rules_exist_for_both_shipped_label_sets():
    from model.training.data import EMORYNLP_LABELS, MELD_LABELS

    for labels in (MELD_LABELS, EMORYNLP_LABELS):
        rules = load_rules(None, labels)
        check_labels(rules, labels)  # would raise on a label the model does not have
        assert {r.kind for r in rules} == {"negative_streak", "escalation", "recovery"}


def test_version_1_state_with_a_list_trajectory_still_loads(rules):
    state, _ = run(rules, dialogue(["neutral", "anger", "joy"]))
    d = monitor_to_dict(state)
    finals = [f.to_dict() for f in state.trajectory.finals()]
    old = {**d, "v": 1, "trajectory": finals}  # what a worker of the previous release stored
    restored = monitor_from_dict(json.loads(json.dumps(old)))
    assert restored.trajectory.finals() == state.trajectory.finals() and restored == state


def test_trajectory_packs_many_speakers_and_keeps_the_last_finals():
    # one-off speakers must not grow the packed tables past the cap
    t = Trajectory()
    for i in range(3 * MAX_TRAJECTORY):
        t = t.append(Final(i, None, f"speaker-{i}", ("anger", "joy", "neutral")[i % 3], 0.12345))
    finals = t.finals()
    assert len(t) == MAX_TRAJECTORY and [f.seq for f in finals] == list(range(2 * MAX_TRAJECTORY, 3 * MAX_TRAJECTORY))
    assert finals[-1] == Final(3 * MAX_TRAJECTORY - 1, None, f"speaker-{3 * MAX_TRAJECTORY - 1}", "neutral", 0.12345)
    assert len(t.who_table) <= 2 * MAX_TRAJECTORY
    assert trajectory_from_dict(json.loads(json.dumps(trajectory_to_dict(t)))) == t
