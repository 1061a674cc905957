"""stream.dashboard.state: the dashboard's in-memory board (pure, no broker, no browser)."""

from __future__ import annotations

import itertools
import json
import uuid

import pytest

from stream.dashboard.state import BoardState, coalesce


class Clock:
    def __init__(self, t: float = 1_700_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def tick(self, s: float = 1.0) -> float:
        self.t += s
        return self.t


MELD = ("neutral", "joy", "surprise", "anger", "sadness", "disgust", "fear")
EMORYNLP = ("Neutral", "Joyful", "Peaceful", "Powerful", "Scared", "Mad", "Sad")


def emotion(cid="c1", seq=0, status="final", emotion_="neutral", speaker="cust-1", role="customer", score=0.8,
            labels=MELD) -> dict:
    scores = dict.fromkeys(labels, 0.05)
    scores[emotion_] = score
    return {"event_id": uuid.uuid5(uuid.NAMESPACE_URL, f"{cid}/{seq}/{status}").hex, "conversation_id": cid,
            "seq": seq, "speaker": speaker, "role": role, "emotion": emotion_, "scores": scores, "status": status,
            "model": {"name": "meld", "version": "t"}, "context_reset": False, "ts_produced": 1.0,
            "ts_received": 1.1, "ts_emitted": 1.2}


_ids = itertools.count()


def alert(cid="c1", kind="raised", severity="warning", rule="customer_anger", role="customer", speaker="cust-1",
          alert_id=None, reason="customer angry in 3 of the last 4 turns", closes=None) -> dict:
    return {"alert_id": alert_id or f"a{next(_ids)}", "conversation_id": cid, "rule": rule, "kind": kind,
            "severity": severity, "role": role, "speaker": speaker, "seq_from": 1, "seq_to": 4, "reason": reason,
            "closes": closes, "model": {"name": "meld", "version": "t"}, "ts_emitted": 2.0}


def summary(cid="c1", ended_by="end", trajectory=None) -> dict:
    trajectory = trajectory if trajectory is not None else [
        {"seq": 0, "role": "customer", "speaker": "cust-1", "emotion": "anger", "score": 0.9}]
    return {"summary_id": f"s-{cid}", "conversation_id": cid, "ended_by": ended_by, "utterances": len(trajectory),
            "distribution": {"customer": {"anger": 1}}, "trajectory": trajectory, "peaks": trajectory[:3],
            "alerts": [{"alert_id": "a-x", "rule": "customer_anger", "kind": "raised", "severity": "warning",
                        "seq_from": 0, "seq_to": 0}],
            "trajectory_truncated": False, "alerts_truncated": False, "open_alerts": ["a-x"], "risk": 0.7,
            "model": {"name": "meld", "version": "t"}, "ts_emitted": 3.0}


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def board(clock):
    return BoardState(clock=clock)


def ids(convs):
    return [c.conversation_id for c in convs]


# ---- timeline --------------------------------------------------------------------------------

def test_provisional_then_final_replaces_and_a_late_provisional_does_not_undo_the_final(board):
    board.apply_emotion(emotion(seq=0, status="provisional", emotion_="joy"))
    cell = board.get("c1").cells[0]
    assert (cell.status, cell.emotion) == ("provisional", "joy")
    board.apply_emotion(emotion(seq=0, status="revised", emotion_="neutral"))
    assert board.get("c1").cells[0].status == "revised"
    deltas = board.apply_emotion(emotion(seq=0, status="final", emotion_="anger", score=0.9))
    cell = board.get("c1").cells[0]
    assert (cell.status, cell.emotion, cell.score) == ("final", "anger", 0.9)
    assert {"op": "cell", "conversation_id": "c1", "cell": cell.to_json()} in deltas
    # at-least-once delivery: a redelivered provisional must not overwrite the final verdict
    late = board.apply_emotion(emotion(seq=0, status="provisional", emotion_="joy"))
    assert board.get("c1").cells[0].status == "final" and board.get("c1").cells[0].emotion == "anger"
    assert not [d for d in late if d["op"] == "cell"]
    header = board.get("c1").header()
    assert header["utterances"] == 1 and header["finals"] == 1 and header["last_emotion"] == "anger"


def test_malformed_events_are_counted_and_skipped(board):
    for bad in (None, [], "x", {"conversation_id": "c1"}, emotion(status="maybe"), emotion(seq=-1),
                {**emotion(), "seq": "3"}, {**emotion(), "seq": True}, {**emotion(), "emotion": ""}):
        assert board.apply_emotion(bad) == []
    assert board.apply_alert({"alert_id": "x", "conversation_id": "c1", "kind": "meh"}) == []
    assert board.apply_summary({"no": "id"}) == []
    assert board.stats["skipped"] == 11 and not board.active
    # scores with NaN do not break the JSON the server sends
    board.apply_emotion({**emotion(), "scores": {"neutral": float("nan")}})
    json.dumps(board.snapshot(), allow_nan=False)


# ---- risk ordering ---------------------------------------------------------------------------

def test_ranking_is_the_summaries_risk_then_recency(board, clock):
    # calm: all neutral; angry: customer negative in 3 of its last 5 finals; warned / critical: open alerts
    for cid in ("calm", "angry", "warned", "critical", "recent-calm"):
        for seq in range(5):
            emo = "anger" if cid == "angry" and seq >= 2 else "neutral"
            board.apply_emotion(emotion(cid=cid, seq=seq, emotion_=emo))
        clock.tick()
    board.apply_alert(alert(cid="warned", severity="warning"))
    board.apply_alert(alert(cid="critical", severity="critical", rule="escalation"))
    # stream.core.risk: 0.6 * negative share + 0.4 * the most severe open alert's weight
    risks = {c.conversation_id: c.header()["risk"] for c in board.ranked()}
    assert risks == {"critical": 0.4, "angry": 0.36, "warned": 0.2, "recent-calm": 0.0, "calm": 0.0}
    assert ids(board.ranked()) == ["critical", "angry", "warned", "recent-calm", "calm"]
    angry = board.get("angry").header()
    assert angry["negative_share"] == pytest.approx(0.6) and angry["risk_level"] == "elevated"
    assert board.get("critical").header()["risk_level"] == "critical"
    assert board.get("warned").header()["open_alert_count"] == 1
    # recovery closes the alert: "warned" falls back among the calm ones (most recent first)
    board.apply_alert(alert(cid="warned", kind="recovered", severity="info"))
    clock.tick()
    assert board.get("warned").header()["open_alert_count"] == 0
    assert ids(board.ranked()) == ["critical", "angry", "warned", "recent-calm", "calm"]


def test_the_board_and_the_summary_agree_on_risk(board):
    """The same finals and alerts through the monitor (summary risk) and the board (ranking)."""
    from stream.core.monitor import MonitorState, on_final
    from stream.core.rules import load_rules
    from stream.core.summary import monitor_risk

    rules, state = load_rules(), MonitorState()
    emotions = ["neutral", "anger", "anger", "joy", "anger", "sadness", "neutral", "disgust", "anger"]
    for seq, emo in enumerate(emotions):
        agent = seq % 3 == 2
        ev = emotion(cid="same", seq=seq, emotion_=emo, role="agent" if agent else "customer",
                     speaker="ag" if agent else "cust-1")
        state, alerts = on_final(rules, state, ev, 1.0)
        board.apply_emotion(ev)
        for a in alerts:
            board.apply_alert(a)
        assert board.get("same").risk() == monitor_risk(state), seq
    assert monitor_risk(state) > 0.4  # an open alert and negative finals: the check is not vacuous


def test_negative_share_follows_the_rules_file(board):
    # the shipped MELD rules watch the customer: an angry agent is not negative
    for seq in range(6):
        board.apply_emotion(emotion(cid="roles", seq=seq, speaker="ag", role="agent", emotion_="anger"))
    board.apply_emotion(emotion(cid="roles", seq=6, emotion_="neutral"))
    assert board.get("roles").negative_share() == 0.0
    # provisional negatives do not count, only finals
    board.apply_emotion(emotion(cid="roles", seq=7, status="provisional", emotion_="anger"))
    assert board.get("roles").negative_share() == 0.0
    # old negatives fall out of the rules' window (5: the longest streak rule's m)
    for seq in range(3):
        board.apply_emotion(emotion(cid="window", seq=seq, emotion_="sadness"))
    for seq in range(3, 8):
        board.apply_emotion(emotion(cid="window", seq=seq, emotion_="joy"))
    assert board.get("window").negative_share() == 0.0
    # fear is no rule's emotion in the shipped file: not negative
    board.apply_emotion(emotion(cid="fear", seq=0, emotion_="fear"))
    assert board.get("fear").negative_share() == 0.0
    # no roles: each speaker is its own group; EmoryNLP labels get EmoryNLP's rules (Mad, Sad)
    for seq, (speaker, emo) in enumerate([("Ross", "Mad"), ("Rachel", "Scared"), ("Ross", "Mad"), ("Rachel", "Sad")]):
        board.apply_emotion(emotion(cid="emory", seq=seq, role=None, speaker=speaker, emotion_=emo, labels=EMORYNLP))
    header = board.get("emory").header()
    assert header["negative_share"] == 1.0 and header["negative_emotions"] == ["mad", "sad"]
    assert board.get("fear").header()["negative_emotions"] == ["anger", "disgust", "sadness"]


def test_a_rules_path_decides_for_every_conversation(tmp_path, clock):
    rules = tmp_path / "rules.toml"
    rules.write_text('[[rule]]\nname = "fear_streak"\nkind = "negative_streak"\nroles = ["customer"]\n'
                     'emotions = ["fear"]\nk = 1\nm = 2\n')
    board = BoardState(clock=clock, rules_path=rules)
    board.apply_emotion(emotion(seq=0, emotion_="anger"))
    board.apply_emotion(emotion(seq=1, emotion_="fear"))
    assert board.get("c1").negative_share() == 0.5


# ---- alerts feed -------------------------------------------------------------------------------

def test_alert_feed_is_most_recent_first_bounded_and_deduplicated(clock):
    board = BoardState(max_alerts=3, max_alerts_per_conversation=2, clock=clock)
    for i in range(5):
        board.apply_alert(alert(alert_id=f"a{i}", cid=f"c{i % 2}"))
    assert [a["alert_id"] for a in board.alerts] == ["a4", "a3", "a2"]
    assert [a["alert_id"] for a in board.get("c0").alerts] == ["a4", "a2"]
    assert board.apply_alert(alert(alert_id="a4", cid="c0")) == []  # redelivered
    assert len(board.alerts) == 3 and board.stats["alerts"] == 5
    snap = board.snapshot()
    assert [a["alert_id"] for a in snap["alerts"]] == ["a4", "a3", "a2"]
    assert snap["alerts"][0]["reason"] == "customer angry in 3 of the last 4 turns"


def test_recovered_closes_the_alert_it_names_else_pairs_on_rule_role_and_speaker(board):
    board.apply_alert(alert(alert_id="r1", rule="customer_negative_streak", severity="warning"))
    board.apply_alert(alert(alert_id="r2", rule="agent_negative_streak", role="agent", speaker="ag", severity="critical"))
    assert set(board.get("c1").open_alerts) == {"r1", "r2"}
    # the contract's way: `closes` names the raised alert (rule/role as the closed alert)
    board.apply_alert(alert(alert_id="k2", kind="recovered", severity="info", rule="agent_negative_streak",
                            role="agent", speaker="ag", closes="r2"))
    assert set(board.get("c1").open_alerts) == {"r1"}
    assert board.get("c1").header()["risk_level"] == "warning"
    # without `closes`: paired on (rule, role, speaker)
    board.apply_alert(alert(alert_id="k1", kind="recovered", severity="info", rule="customer_negative_streak"))
    assert board.get("c1").open_alerts == {} and board.get("c1").header()["risk_level"] == "low"
    assert [a["alert_id"] for a in board.alerts] == ["k1", "k2", "r2", "r1"]


def test_an_alert_for_an_unseen_conversation_creates_it(board):
    deltas = board.apply_alert(alert(cid="new", severity="critical"))
    assert [d["op"] for d in deltas] == ["alert", "conv"]
    assert ids(board.ranked()) == ["new"] and board.get("new").header()["risk_level"] == "critical"


# ---- summaries ---------------------------------------------------------------------------------

def test_summary_moves_the_conversation_to_recently_ended(board):
    board.apply_emotion(emotion(cid="a", seq=0))
    board.apply_emotion(emotion(cid="b", seq=0))
    board.apply_alert(alert(cid="a", severity="critical"))
    deltas = board.apply_summary(summary(cid="a", trajectory=[
        {"seq": 0, "role": "customer", "speaker": "cust-1", "emotion": "neutral", "score": 0.8},
        {"seq": 1, "role": "agent", "speaker": "ag", "emotion": "joy", "score": 0.7}]))
    assert ids(board.ranked()) == ["b"] and ids(board.recently_ended()) == ["a"]
    ended = board.get("a")
    assert ended.summary["ended_by"] == "end" and ended.summary["distribution"] == {"customer": {"anger": 1}}
    assert ended.open_alerts == {} and ended.header()["state"] == "ended"
    assert ended.summary["open_alerts"] == ["a-x"] and ended.summary["risk"] == 0.7
    assert sorted(ended.cells) == [0, 1] and ended.cells[1].status == "final"  # filled from the trajectory
    full = [d for d in deltas if d["op"] == "ended"][0]["conversation"]
    assert full["summary"]["summary_id"] == "s-a" and full["state"] == "ended"
    # a late final for the ended conversation updates it there, it does not come back as active
    board.apply_emotion(emotion(cid="a", seq=2, emotion_="joy"))
    assert ids(board.ranked()) == ["b"] and 2 in board.get("a").cells
    snap = board.snapshot()
    assert [c["conversation_id"] for c in snap["ended"]] == ["a"]
    assert snap["ended"][0]["summary"]["peaks"][0]["seq"] == 0


def test_summary_of_an_unknown_conversation_and_the_ended_list_bound(clock):
    board = BoardState(max_ended=2, clock=clock)
    for cid in ("x", "y", "z"):
        deltas = board.apply_summary(summary(cid=cid, ended_by="idle"))
        clock.tick()
    assert ids(board.recently_ended()) == ["z", "y"]
    assert {"op": "remove", "conversation_id": "x"} in deltas
    assert board.get("z").summary["ended_by"] == "idle" and board.get("z").cells[0].emotion == "anger"


# ---- memory bounds -----------------------------------------------------------------------------

def test_the_least_recently_active_conversation_is_evicted_beyond_max_conversations(clock):
    board = BoardState(max_conversations=3, clock=clock)
    for cid in ("old", "mid", "new"):
        board.apply_emotion(emotion(cid=cid))
        clock.tick()
    board.apply_emotion(emotion(cid="old", seq=1))  # "old" is active again: "mid" is now the idlest
    clock.tick()
    deltas = board.apply_emotion(emotion(cid="newest"))
    assert {"op": "remove", "conversation_id": "mid"} in deltas
    assert set(board.active) == {"old", "new", "newest"} and board.stats["evicted"] == 1


def test_cells_per_conversation_are_bounded_oldest_seqs_dropped(clock):
    board = BoardState(max_utterances=4, clock=clock)
    for seq in range(6):
        deltas = board.apply_emotion(emotion(seq=seq))
    conv = board.get("c1")
    assert sorted(conv.cells) == [2, 3, 4, 5]
    assert {"op": "trim", "conversation_id": "c1", "below_seq": 2} in deltas
    assert conv.header()["utterances"] == 6
    board.apply_emotion(emotion(seq=0, status="final"))  # older than everything kept: not stored
    assert sorted(conv.cells) == [2, 3, 4, 5]


def test_evict_idle_drops_conversations_without_events(board, clock):
    board.apply_emotion(emotion(cid="idle"))
    clock.tick(100)
    board.apply_emotion(emotion(cid="busy"))
    clock.tick(10)
    assert board.evict_idle(60) == [{"op": "remove", "conversation_id": "idle"}]
    assert set(board.active) == {"busy"}


def test_coalesce_keeps_one_header_per_conversation_after_the_other_deltas(board):
    deltas = []
    for seq in range(3):
        deltas += board.apply_emotion(emotion(seq=seq))
    out = coalesce(deltas)
    assert [d["op"] for d in out] == ["cell", "cell", "cell", "conv"]
    assert out[-1]["conv"]["utterances"] == 3
    json.dumps(out, allow_nan=False)
