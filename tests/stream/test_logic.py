"""The pure stream logic, driven directly with a tiny real model (no Kafka, no Redis)."""

import numpy as np
import pytest
import torch

from model.modeling import EmotionSIModel
from model.scorer import Scorer
from stream.core.contract import validate_event
from stream.core.codec import decode_state, encode_state, trajectory_to_dict
from stream.core.conversation import ConversationConfig, advance_conversations
from stream.core.events import event_id
from stream.core.validate import EndMessage, UtteranceMessage
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def scorer():
    torch.manual_seed(5)
    return Scorer.from_model(EmotionSIModel(tiny_config(lookahead=2, window=4)), "tiny", "1")


def utt(cid, seq, text=None, speaker=None, role=None):
    text = text or f"{cid} says thing number {seq}"
    return UtteranceMessage(cid, seq, speaker or ("cust" if seq % 2 else "agent"), role, text, 100.0 + seq, f"d{cid}{seq}{text}")


def run(scorer, convs, items, now=1000.0):
    cfg = ConversationConfig(scorer.labels, scorer.model_id, scorer.window)
    vecs = np.zeros((len(items), 32), dtype=np.float32)
    idx = [i for i, x in enumerate(items) if isinstance(x, UtteranceMessage)]
    if idx:
        vecs[idx] = scorer.encode([items[i].text for i in idx])
    return advance_conversations(cfg, scorer.step, convs, items, vecs, now)


def finals(events):
    return [(e["conversation_id"], e["seq"]) for e in events if e["status"] == "final"]


def test_event_sequence_for_one_conversation(scorer):
    convs, out = run(scorer, {"c": None}, [utt("c", i) for i in range(5)] + [EndMessage("c", None)])
    ev = out.events
    assert [e["seq"] for e in ev if e["status"] == "provisional"] == [0, 1, 2, 3, 4]
    assert finals(ev) == [("c", 0), ("c", 1), ("c", 2), ("c", 3), ("c", 4)]  # L=2 -> 0,1,2 in stream, 3,4 at end
    assert all(set(e["scores"]) == set(scorer.labels) and abs(sum(e["scores"].values()) - 1) < 1e-3 for e in ev)
    assert all("text" not in e for e in ev)  # no transcript text unless configured
    assert convs["c"].ended and not convs["c"].awaiting_final
    for e in ev:
        if e["status"] == "revised":  # a revision changes the label relative to the last one emitted
            earlier = [x for x in ev if x["seq"] == e["seq"] and x["ts_emitted"] <= e["ts_emitted"] and x is not e]
            assert earlier and earlier[-1]["emotion"] != e["emotion"]


def test_batch_split_gives_the_same_events_as_one_batch(scorer):
    """Interleaved conversations, processed in one batch or one message at a time: same final events."""
    items = [utt("a", 0), utt("b", 0), utt("a", 1), utt("a", 2), utt("b", 1), utt("a", 3), EndMessage("a", None), EndMessage("b", None)]
    _, whole = run(scorer, {"a": None, "b": None}, items)
    convs, events = {"a": None, "b": None}, []
    for item in items:
        new, out = run(scorer, {item.conversation_id: convs[item.conversation_id]}, [item])
        convs.update(new)
        events += out.events
    key = lambda e: (e["event_id"], e["emotion"], tuple(round(v, 4) for v in e["scores"].values()))  # noqa: E731
    assert sorted(map(key, whole.events)) == sorted(map(key, events))
    assert sorted(finals(events)) == [("a", 0), ("a", 1), ("a", 2), ("a", 3), ("b", 0), ("b", 1)]


def test_redelivery_is_recognised_and_regressions_rejected(scorer):
    convs, _ = run(scorer, {"c": None}, [utt("c", 0), utt("c", 1), utt("c", 2)])
    again, out = run(scorer, convs, [utt("c", 1), utt("c", 2, text="something else entirely"), utt("c", 3)])
    assert out.duplicates == [0]
    assert [(i, r.error) for i, r in out.rejected] == [(1, "seq_regression")]
    assert [e["seq"] for e in out.events if e["status"] == "provisional"] == [3]
    assert again["c"].last_seq == 3


def test_state_lost_midway_flags_a_context_reset(scorer):
    _, out = run(scorer, {"c": None}, [utt("c", 7)])
    assert out.events[0]["context_reset"] is True
    _, out = run(scorer, {"d": None}, [utt("d", 0)])
    assert out.events[0]["context_reset"] is False


def test_utterance_after_end_is_rejected(scorer):
    convs, _ = run(scorer, {"c": None}, [utt("c", 0), EndMessage("c", None)])
    _, out = run(scorer, convs, [utt("c", 1)])
    assert [r.error for _, r in out.rejected] == ["conversation_ended"] and not out.events


def test_conversation_round_trips_through_bytes(scorer):
    convs, _ = run(scorer, {"c": None}, [utt("c", 0, role="customer"), utt("c", 1)])
    back = decode_state(encode_state(convs["c"]))
    assert back.last_seq == 1 and back.awaiting_final.keys() == convs["c"].awaiting_final.keys()
    assert back.awaiting_final[0].role == "customer" and back.recent == convs["c"].recent


def test_event_ids_are_deterministic_and_distinct():
    a = event_id("m@1", "c", 3, "final")
    assert a == event_id("m@1", "c", 3, "final") and len(a) == 32
    assert len({a, event_id("m@1", "c", 3, "provisional"), event_id("m@1", "c", 3, "revised", 4), event_id("m@1", "c", 3, "revised", 5)}) == 4


def test_text_is_echoed_only_when_configured(scorer):
    cfg = ConversationConfig(scorer.labels, scorer.model_id, scorer.window, echo_text=True)
    item = utt("c", 0, text="please call me back")
    _, out = advance_conversations(cfg, scorer.step, {"c": None}, [item], scorer.encode([item.text]), 0.0)
    assert out.events[0]["text"] == "please call me back"
    _, out = run(scorer, {"c": None}, [item])
    assert "text" not in out.events[0]


def test_end_for_an_unknown_conversation_is_a_no_op(scorer):
    convs, out = run(scorer, {"ghost": None}, [EndMessage("ghost", None)])
    assert convs == {} and not out.events and not out.summaries and not out.rejected


def test_state_size_stops_growing_once_the_caps_are_reached(scorer, monkeypatch):
    """Per-utterance cost must not grow with the conversation: the stored state (read and written
    with every utterance) is the same size at position 700 as at 1,200, alert rules on. (The alert
    list is capped at 10 here instead of 100 so that this cap, too, is reached by position 700.)"""
    from stream.core import monitor
    from stream.core.rules import load_rules
    from stream.core.trajectory import MAX_TRAJECTORY

    monkeypatch.setattr(monitor, "MAX_ALERTS", 10)
    cfg = ConversationConfig(scorer.labels, scorer.model_id, scorer.window, False, load_rules(None, scorer.labels))
    rng = np.random.default_rng(0)
    conv, sizes = None, {}
    for seq in range(1200):
        item = utt("long", seq, text="x", role=("customer", "agent")[seq % 2])
        new, _ = advance_conversations(cfg, scorer.step, {"long": conv}, [item], rng.standard_normal((1, 32)).astype(np.float32), 1000.0 + seq)
        conv = decode_state(encode_state(new["long"]))
        if seq + 1 in (700, 1200):
            sizes[seq + 1] = len(encode_state(new["long"]))
    assert len(conv.monitor.trajectory) == MAX_TRAJECTORY and conv.monitor.trajectory_truncated
    assert len(conv.monitor.alerts) == 10 and conv.monitor.alerts_truncated
    assert abs(sizes[1200] - sizes[700]) <= 0.02 * sizes[700], sizes
    # packed: ~22 bytes of JSON per final (a list of objects took ~80)
    import json

    assert len(json.dumps(trajectory_to_dict(conv.monitor.trajectory))) < 30 * MAX_TRAJECTORY


def test_idle_flush_keeps_the_conversation_open_and_its_context(scorer):
    """A pause flushes the pending utterances; the conversation goes on with the same context:
    the same final scores as without the pause for every utterance the flush did not cut short,
    one final per utterance, nothing revised after its final."""
    from stream.core.conversation import on_idle

    cfg = ConversationConfig(scorer.labels, scorer.model_id, scorer.window)
    items = [utt("c", i) for i in range(6)]
    straight, out_straight = run(scorer, {"c": None}, items + [EndMessage("c", None)])
    convs, out1 = run(scorer, {"c": None}, items[:3])
    convs, flushed = on_idle(cfg, convs, set(), now=1500.0)
    assert not convs["c"].ended and not convs["c"].awaiting_final and not flushed.summaries
    assert finals(flushed.events) == [("c", 1), ("c", 2)]
    convs, out2 = run(scorer, convs, items[3:] + [EndMessage("c", None)])
    events = out1.events + flushed.events + out2.events
    assert sorted(finals(events)) == [("c", i) for i in range(6)]
    final_seq = set()
    for e in events:
        assert e["seq"] not in final_seq, e  # nothing about an utterance after its final
        if e["status"] == "final":
            final_seq.add(e["seq"])
    want = {e["seq"]: e["scores"] for e in out_straight.events if e["status"] == "final"}
    got = {e["seq"]: e["scores"] for e in events if e["status"] == "final"}
    for seq in (0, 3, 4, 5):  # not cut short by the flush: the same as an uninterrupted conversation
        assert got[seq] == pytest.approx(want[seq], abs=1e-5)
    assert [s["ended_by"] for s in out2.summaries] == ["end"]


def test_abandonment_ends_with_a_summary_and_later_utterances_are_rejected(scorer):
    from stream.core.conversation import on_idle

    cfg = ConversationConfig(scorer.labels, scorer.model_id, scorer.window)
    convs, _ = run(scorer, {"c": None}, [utt("c", 0), utt("c", 1)])
    convs, out = on_idle(cfg, convs, {"c"}, now=5000.0)
    assert convs["c"].ended and convs["c"].ended_by == "abandoned"
    assert [s["ended_by"] for s in out.summaries] == ["abandoned"] and sorted(finals(out.events)) == [("c", 0), ("c", 1)]
    assert decode_state(encode_state(convs["c"])).ended_by == "abandoned"  # the codec keeps it
    _, later = run(scorer, convs, [utt("c", 2)])
    assert [(i, r.error) for i, r in later.rejected] == [(0, "conversation_ended")]
    assert "abandoned" in later.rejected[0][1].reason


def test_event_time_is_stored_per_conversation(scorer):
    cfg = ConversationConfig(scorer.labels, scorer.model_id, scorer.window)
    items = [utt("c", 0), utt("c", 1)]
    vecs = scorer.encode([x.text for x in items])
    convs, _ = advance_conversations(cfg, scorer.step, {"c": None}, items, vecs, 1000.0, event_ts=[50.0, 60.0])
    assert convs["c"].last_event_ts == 60.0 and convs["c"].last_activity == 1000.0


def test_partition_clock_follows_event_time_and_only_idle_wall_time():
    from stream.core.conversation import PartitionClock

    clock = PartitionClock(100.0, wall_at=1000.0, busy_at=0.0)
    # catching up on a backlog: the worker is busy the whole time, event time is the watermark
    assert clock.now(wall=1060.0, busy=60.0) == 100.0
    clock = clock.advance(105.0, wall=1060.0, busy=60.0)
    assert clock.now(wall=1060.5, busy=60.5) == 105.0
    # caught up, nothing more arrives: event time advances with the time spent waiting for input
    assert clock.now(wall=1090.0, busy=60.0) == pytest.approx(135.0)
    # an older timestamp (another producer's clock) does not move it back
    assert clock.advance(90.0, wall=1090.0, busy=60.0).watermark == 105.0


def test_settings_need_an_abandonment_timeout_longer_than_the_idle_timeout():
    from pydantic import ValidationError

    from stream.settings import Settings

    assert Settings().abandon_after_s == 1800.0
    with pytest.raises(ValidationError, match="ABANDON_AFTER_S"):
        Settings(idle_finalize_s=60, abandon_after_s=30)


# ---- issue 13: seq gaps (6), model changes (7), old redeliveries (8), bounded state (10) -------

def test_a_gap_waits_for_the_missing_seq_and_is_filled_without_a_flag(scorer):
    convs, _ = run(scorer, {"g": None}, [utt("g", 0), utt("g", 1)])
    convs, out = run(scorer, convs, [utt("g", 3)])  # 2 is missing: 3 waits
    assert out.events == [] and sorted(convs["g"].held) == [3] and not out.rejected
    convs, out = run(scorer, convs, [utt("g", 2)])  # the hole is filled: 2, then 3, in order
    assert [e["seq"] for e in out.events if e["status"] == "provisional"] == [2, 3]
    assert not any(e["gap"] for e in out.events) and out.gaps_filled == 1 and out.gaps_skipped == 0
    assert convs["g"].last_seq == 3 and not convs["g"].held
    # the same scores as a conversation that never had the hole
    _, ref = run(scorer, {"h": None}, [utt("g", i) for i in range(4)])
    key = lambda e: (e["seq"], e["status"], tuple(e["scores"].values()))  # noqa: E731
    assert sorted(map(key, out.events)) == sorted(key(e) for e in ref.events if e["ts_emitted"] and any(
        (x["seq"], x["status"]) == (e["seq"], e["status"]) for x in out.events))


def test_a_gap_not_filled_within_the_wait_is_applied_with_a_gap_flag(scorer):
    from stream.core.conversation import on_idle

    cfg = ConversationConfig(scorer.labels, scorer.model_id, scorer.window, gap_wait_s=5.0)
    convs, _ = run(scorer, {"g": None}, [utt("g", 0)])
    convs, _ = run(scorer, convs, [utt("g", 2), utt("g", 3)])  # 1 never comes
    assert sorted(convs["g"].held) == [2, 3]
    held_ts = convs["g"].held[2].event_ts  # 1000.0 (run's now)
    changed, out = on_idle(cfg, convs, set(), 2000.0, scorer.step, event_now=held_ts + 1, flush=set())  # not yet
    assert not changed and not out.events
    changed, out = on_idle(cfg, convs, set(), 2000.0, scorer.step, event_now=held_ts + 6, flush=set())
    prov = [e for e in out.events if e["status"] == "provisional"]
    assert [(e["seq"], e["gap"]) for e in prov] == [(2, True), (3, False)] and out.gaps_skipped == 1
    assert changed["g"].last_seq == 3 and changed["g"].skipped == (1,)
    for e in out.events:
        validate_event(e, "emotion-event")
    # the missing one arriving now is not lost silently: it is dead-lettered as late
    _, out = run(scorer, changed, [utt("g", 1)])
    assert [r.error for _, r in out.rejected] == ["seq_late"]


def test_an_end_applies_the_held_utterances_first(scorer):
    convs, _ = run(scorer, {"g": None}, [utt("g", 0)])
    convs, out = run(scorer, convs, [utt("g", 5), EndMessage("g", None)])
    assert sorted(finals(out.events)) == [("g", 0), ("g", 5)] and out.summaries and convs["g"].ended
    assert [e["gap"] for e in out.events if e["seq"] == 5] == [True] * len([e for e in out.events if e["seq"] == 5])


def test_held_utterances_are_bounded_by_the_window(scorer):
    convs, _ = run(scorer, {"g": None}, [utt("g", 0)])
    convs, out = run(scorer, convs, [utt("g", s) for s in range(2, 2 + scorer.window + 1)])
    assert not convs["g"].held and convs["g"].last_seq == 1 + scorer.window + 1 and out.gaps_skipped == 1


def test_an_old_redelivery_beyond_the_recent_digests_is_a_duplicate(scorer):
    convs, _ = run(scorer, {"c": None}, [utt("c", i) for i in range(12)])
    assert 0 not in convs["c"].recent  # window 4: seq 0's digest is no longer kept
    _, out = run(scorer, convs, [utt("c", 0), utt("c", 0, text="other words")])
    assert out.duplicates == [0, 1] and not out.rejected and not out.events
    # within the digests kept, other content is still provably a regression
    _, out = run(scorer, convs, [utt("c", 11, text="other words")])
    assert [r.error for _, r in out.rejected] == ["seq_regression"]


def test_a_state_of_another_model_is_not_continued(scorer):
    torch.manual_seed(6)
    other = Scorer.from_model(EmotionSIModel(tiny_config(lookahead=2, window=4)), "tiny", "2")
    convs, _ = run(scorer, {"m": None}, [utt("m", i) for i in range(4)])  # 2 and 3 pending under tiny@1
    assert convs["m"].model_id == "tiny@1" and sorted(m.seq for m in convs["m"].awaiting_final.values()) == [2, 3]
    convs2, out = run(other, convs, [utt("m", 4)])
    old = [e for e in out.events if e["model"]["version"] == "1"]
    assert [(e["seq"], e["status"]) for e in old] == [(2, "final"), (3, "final")]
    pending = convs["m"].dialogue.pending
    for e, pos in zip(old, sorted(pending)):  # the old model's own latest scores
        np.testing.assert_allclose([e["scores"][lab] for lab in scorer.labels], pending[pos], atol=1e-5)
    new = [e for e in out.events if e["model"]["version"] == "2"]
    assert [(e["seq"], e["status"], e["context_reset"]) for e in new] == [(4, "provisional", True)]
    assert convs2["m"].model_id == "tiny@2" and convs2["m"].dialogue.seen == 1 and out.model_changes == 1
    # the same as the new model starting on seq 4 alone
    _, ref = run(other, {"m": None}, [utt("m", 4)])
    assert new[0]["scores"] == ref.events[0]["scores"]


def test_ended_conversations_keep_a_small_tombstone(scorer):
    convs, _ = run(scorer, {"t": None}, [utt("t", i) for i in range(30)] + [EndMessage("t", None)])
    tomb = convs["t"]
    assert tomb.ended and tomb.dialogue.vectors is None and len(encode_state(tomb)) < 1500
    _, out = run(scorer, convs, [utt("t", 3), utt("t", 30)])  # redelivery; then after the end
    assert out.duplicates == [0] and [r.error for _, r in out.rejected] == ["conversation_ended"]


def test_the_speaker_map_is_bounded_and_streaming_still_equals_offline(scorer):
    speakers = [f"spk-{i}" for i in range(40)] + ["spk-0", "spk-3", "spk-39"]
    items = [utt("p", i, speaker=s) for i, s in enumerate(speakers)]
    convs, _ = run(scorer, {"p": None}, items)
    P = scorer.model.cfg.num_parties
    assert len(convs["p"].dialogue.parties) <= P - 1
    # the party ids the stream used are those offline scoring uses
    first_seen = list(dict.fromkeys(speakers))  # offline rule: order of first appearance, capped at P - 1
    offline = [min(first_seen.index(s), P - 1) for s in speakers]
    ids = list(convs["p"].dialogue.party_ids)
    assert ids == offline[-len(ids):]


def test_settings_are_checked_together_at_start():
    """Item 11: combinations that cannot work stop the worker at start with what to change."""
    from pydantic import ValidationError

    from stream.settings import Settings

    with pytest.raises(ValidationError, match="STATE_TTL_S .* must be longer than EMOTION_MONITOR_ABANDON_AFTER_S"):
        Settings(state_ttl_s=600, abandon_after_s=1800)  # state would expire before it is abandoned
    with pytest.raises(ValidationError, match="GAP_WAIT_S .* must be shorter"):
        Settings(idle_finalize_s=10, gap_wait_s=10)
    s = Settings(idle_finalize_s=2, abandon_after_s=8)
    assert s.gap_wait == 1.0 and Settings().gap_wait == 5.0


def test_a_model_whose_lookahead_reaches_its_window_is_refused_at_start():
    from stream.settings import Settings
    from stream.worker.batch import check_model_settings

    class FakeScorer:
        model_id, lookahead, window = "m@1", 4, 4

    with pytest.raises(ValueError, match="lookahead 4 must be smaller than its window 4"):
        check_model_settings(Settings(), FakeScorer())


def test_lookahead_zero_still_gets_flushes_and_summaries():
    """Item 11: with L = 0 every utterance is final on arrival; abandonment still ends the
    conversation with its summary and the end message too."""
    from stream.core.conversation import on_idle

    torch.manual_seed(5)
    sc = Scorer.from_model(EmotionSIModel(tiny_config(lookahead=0, window=4)), "tiny", "0")
    convs, out = run(sc, {"z": None, "y": None}, [utt("z", 0), utt("z", 1), utt("y", 0)])
    assert sorted(finals(out.events)) == [("y", 0), ("z", 0), ("z", 1)]  # final on arrival
    cfg = ConversationConfig(sc.labels, sc.model_id, sc.window)
    changed, idle = on_idle(cfg, convs, {"z"}, 2000.0, sc.step, event_now=5000.0)
    assert [m["conversation_id"] for m in idle.summaries] == ["z"] and changed["z"].ended and "y" not in changed
    _, out = run(sc, convs, [EndMessage("y", None)])
    assert [m["conversation_id"] for m in out.summaries] == ["y"]
