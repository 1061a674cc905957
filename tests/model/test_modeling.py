import numpy as np
import pytest
import torch

from model.dialogue import Dialogue, Utterance
from model.encoding import encode_texts
from model.modeling import EmotionSIModel, emotion_si_loss
from model.offline import pad_dialogues, score_dialogues
from model.streaming import DialogueState, finalize, step
from tests.conftest import tiny_config


def dialogue(name: str, n: int, speakers=("A", "B")) -> Dialogue:
    return Dialogue(name, tuple(Utterance(f"{name} line {i} about something", speakers[i % len(speakers)], "neutral") for i in range(n)))


def test_output_shapes(tiny_model, tokenizer):
    dls = [dialogue("a", 5), dialogue("b", 2)]
    vecs = encode_texts(tiny_model, tokenizer, [u.text for d in dls for u in d.utterances])
    assert vecs.shape == (7, 32)
    u, parties, lengths = pad_dialogues(vecs, dls, tiny_model.cfg.num_parties)
    assert u.shape == (2, 5, 32) and parties.tolist()[1][:2] == [0, 1]
    emo, si = tiny_model.score_dialogues(u, parties, lengths, 2, 4)
    assert emo.shape == (7, 7)  # every utterance, 7 MELD emotions
    assert si.shape == (7, 7)  # 6 main characters + other
    fwd = tiny_model.forward_states(u, parties)
    assert fwd.shape == (2, 5, 3, 32)  # (B, T, branches, H)


@pytest.mark.parametrize(
    "over",
    [{}, {"cross_attention": False}, {"shared_private": False, "cross_attention": False}, {"use_context": False}],
    ids=["full", "no-xattn", "plain-gru", "utterance-only"],
)
def test_streaming_equals_offline_under_the_same_window(tokenizer, over):
    """Step-by-step scoring, conversations interleaved, equals offline scoring (tolerance 1e-5)."""
    torch.manual_seed(1)
    model = EmotionSIModel(tiny_config(**over)).eval()
    dls = [dialogue("long", 9, ("A", "B", "C")), dialogue("short", 3), dialogue("one", 1)]
    offline = score_dialogues(model, tokenizer, dls)
    vecs = encode_texts(model, tokenizer, [u.text for d in dls for u in d.utterances]).numpy()
    starts = np.cumsum([0] + [len(d) for d in dls])
    states = [DialogueState() for _ in dls]
    prov = [dict() for _ in dls]
    final = [dict() for _ in dls]
    for r in range(max(len(d) for d in dls)):
        live = [i for i, d in enumerate(dls) if r < len(d)]
        new, outs = step(model, [states[i] for i in live], vecs[[starts[i] + r for i in live]], [dls[i].utterances[r].speaker for i in live])
        for i, s, scored in zip(live, new, outs):
            states[i] = s
            positions = [x.position for x in scored]
            assert positions == list(range(max(0, r - 2), r + 1))  # re-scores the last L + 1
            for x in scored:
                if x.position == r:
                    prov[i][r] = x.probs
                if x.final:
                    final[i][x.position] = x.probs
            if r == len(dls[i]) - 1:
                states[i], rest = finalize(states[i])
                for x in rest:
                    final[i][x.position] = x.probs
    for mode, got in (("provisional", prov), ("final", final)):
        flat = np.concatenate([np.stack([got[i][p] for p in range(len(d))]) for i, d in enumerate(dls)])
        np.testing.assert_allclose(flat, offline[mode], atol=1e-5)
    # each utterance was final exactly once, and nothing is left pending
    assert all(len(f) == len(d) for f, d in zip(final, dls)) and not any(s.pending for s in states)


def test_window_bounds_the_state_and_the_context(tokenizer):
    torch.manual_seed(2)
    model = EmotionSIModel(tiny_config(window=4)).eval()
    state = DialogueState()
    for i in range(10):
        (state,), _ = step(model, [state], np.random.rand(1, 32).astype(np.float32), ["A" if i % 2 else "B"])
    assert state.vectors.shape == (4, 32) and state.fwd.shape == (4, 3, 32) and state.seen == 10
    # offline with a window differs from the unbounded offline mode on a long dialogue
    d = [dialogue("x", 10)]
    s = score_dialogues(model, tokenizer, d)
    assert np.abs(s["final"] - s["offline"]).max() > 1e-4


def test_state_round_trips_through_bytes(tiny_model):
    state = DialogueState()
    for i in range(3):
        (state,), _ = step(tiny_model, [state], np.random.rand(1, 32).astype(np.float32), [f"s{i % 2}"])
    back = DialogueState.from_bytes(state.to_bytes())
    assert back.seen == 3 and back.parties == state.parties
    np.testing.assert_array_equal(back.fwd, state.fwd)
    assert sorted(back.pending) == sorted(state.pending) == [1, 2]
    np.testing.assert_array_equal(back.pending[2], state.pending[2])


def test_si_head_learns_speakers_and_loss_falls(tokenizer):
    """A tiny synthetic set: the speaker and the emotion are readable from the words."""
    torch.manual_seed(3)
    model = EmotionSIModel(tiny_config(dropout=0.0))
    words = {0: ("joey", "joy"), 1: ("ross", "anger"), 2: ("monica", "sadness")}
    dls = [Dialogue(f"d{k}", tuple(Utterance(f"{words[(k + i) % 3][0]} says {words[(k + i) % 3][1]}", str((k + i) % 3), words[(k + i) % 3][1]) for i in range(4))) for k in range(6)]
    emo_t = torch.tensor([model.cfg.emotion_labels.index(u.emotion) for d in dls for u in d.utterances])
    si_t = torch.tensor([int(u.speaker) for d in dls for u in d.utterances])  # classes 0..2 of the SI head
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        model.train()
        vecs = model.encode(*_tok(tokenizer, dls))
        u, p, lengths = pad_dialogues(vecs, dls, model.cfg.num_parties)
        emo, si = model.score_dialogues(u, p, lengths, 2, 4)
        loss, parts = emotion_si_loss(emo, emo_t, si, si_t, si_weight=1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < 0.3 * np.mean(losses[:5])
    model.eval()
    with torch.no_grad():
        vecs = model.encode(*_tok(tokenizer, dls))
        u, p, lengths = pad_dialogues(vecs, dls, model.cfg.num_parties)
        _, si = model.score_dialogues(u, p, lengths, 2, 4)
    assert (si.argmax(-1) == si_t).float().mean() > 0.9


def _tok(tokenizer, dls):
    enc = tokenizer([u.text for d in dls for u in d.utterances], padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def test_loss_ignores_unlabelled_targets():
    emo = torch.randn(4, 7)
    si = torch.randn(4, 7)
    none = torch.full((4,), -100)
    loss, parts = emotion_si_loss(emo, none, si, none, 0.5)
    assert loss.item() == 0.0 and parts == {"loss_emotion": 0.0, "loss_si": 0.0}


def test_length_buckets_respect_batch_size_and_token_budget():
    from model.encoding import length_buckets

    lengths = [5, 60, 7, 6, 64, 8, 5, 9]
    groups = length_buckets(lengths, max_batch=3, token_budget=100)
    flat = sorted(i for g in groups for i in g)
    assert flat == list(range(len(lengths)))  # every text exactly once
    for g in groups:
        assert len(g) <= 3 and len(g) * max(lengths[i] for i in g) <= 100
        assert [lengths[i] for i in g] == sorted(lengths[i] for i in g)
    # the two long texts do not pad the short ones
    assert all(max(lengths[i] for i in g) <= 9 for g in groups if any(lengths[i] < 10 for i in g))


def test_weight_ema_averages_and_swaps_back():
    """EMA shadow = lerp towards the weights after each step; swapped in for evaluation, then the
    raw weights come back untouched. Frozen parameters are not tracked."""
    from model.training.trainer import WeightEMA

    net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    net[1].weight.requires_grad_(False)
    ema = WeightEMA(net, decay=0.5)
    start = net[0].weight.detach().clone()
    with torch.no_grad():
        net[0].weight.add_(1.0)
    ema.update()  # step 1: decay min(0.5, 2/11) = 2/11
    d = 2 / 11
    expected = d * start + (1 - d) * (start + 1.0)
    raw = net[0].weight.detach().clone()
    with ema.swapped_in():
        assert torch.allclose(net[0].weight, expected)
    assert torch.equal(net[0].weight, raw)
    assert len(ema.shadow) == 3  # weight + bias of the first layer, bias of the second
