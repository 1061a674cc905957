"""The streaming step (model.streaming) against offline scoring, its state codec and its purity.

The reference is the training/offline forward (`score_dialogues`, `score_windows`): a target scored
at horizon T by `step` equals offline scoring of the conversation's first T + 1 utterances under
the same window, every target's horizon being T."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from model.config import WEIGHTS_DIR
from model.dialogue import party_ids
from model.modeling import EmotionSIModel, stream_kernel
from model.streaming import DialogueState, finalize, step
from tests.conftest import tiny_config


@pytest.fixture(scope="module", params=["meld-mpnet", "meld-small"])
def meld(request):
    """Each shipped MELD artifact: the default (MPNet) and the fast one (MiniLM, MPNet-taught)."""
    from model.artifact import load_artifact

    return load_artifact(WEIGHTS_DIR / request.param)[0]


def real_looking(rng, n: int, dim: int) -> np.ndarray:
    """Like the encoder's mean-pooled vectors: per-dimension offsets, spread ~0.37 (MiniLM on MELD)."""
    offset = np.random.default_rng(123).normal(0, 0.15, dim)
    return (offset + rng.normal(0, 0.37, (n, dim))).astype(np.float32)


@torch.inference_mode()
def offline_at_horizon(model, prefixes: list[np.ndarray], speakers: list[list[str]]) -> list[dict[int, np.ndarray]]:
    """Offline emotion probs of the last L + 1 utterances of conversation prefixes, at horizon =
    the prefix's last utterance (what `step` scores them at): the forward GRUs over the whole
    prefix, then `score_windows` over the window ending there (as `score_dialogues` builds it)."""
    cfg = model.cfg
    W, Q = cfg.window, cfg.lookahead + 1
    lengths = [len(s) for s in speakers]
    B, T = len(prefixes), max(lengths)
    u = torch.zeros(B, T, prefixes[0].shape[1])
    p = torch.zeros(B, T, dtype=torch.long)
    for i, (v, s) in enumerate(zip(prefixes, speakers)):
        u[i, : len(s)] = torch.from_numpy(v)
        p[i, : len(s)] = torch.tensor(party_ids(s, cfg.num_parties))
    fwd = model.forward_states(u, p)
    horizon = torch.tensor(lengths) - 1
    cols = horizon[:, None] - (W - 1) + torch.arange(W)  # (B, W)
    mask = cols >= 0
    cols = cols.clamp(min=0)
    rows = torch.arange(B)[:, None].expand_as(cols)
    t_rows = torch.arange(B).repeat_interleave(Q)
    t_pos = torch.arange(W - Q, W).repeat(B)
    logits, _ = model.score_windows(u[rows, cols], p[rows, cols], fwd[rows, cols], mask, t_pos, t_rows)
    probs = torch.softmax(logits, -1).numpy().reshape(B, Q, -1)
    return [{n - Q + j: probs[i, j] for j in range(Q) if n - Q + j >= 0} for i, n in enumerate(lengths)]


def check_against_offline(model, lengths, rng, roundtrip_every: int = 3) -> float:
    """Step conversations of the given lengths (interleaved, fewer live ones as they end) and
    compare every score with offline scoring; returns the largest difference."""
    L, D = model.cfg.lookahead, model.encoder.dim
    B, T = len(lengths), max(lengths)
    vecs = [real_looking(rng, n, D) for n in lengths]
    speakers = [[f"spk{rng.integers(0, 10)}" for _ in range(n)] for n in lengths]  # > num_parties names
    states = [DialogueState() for _ in range(B)]
    worst = 0.0
    for t in range(T):
        live = [i for i in range(B) if t < lengths[i]]
        new, outs = step(model, [states[i] for i in live], np.stack([vecs[i][t] for i in live]), [speakers[i][t] for i in live])
        refs = offline_at_horizon(model, [vecs[i][: t + 1] for i in live], [speakers[i][: t + 1] for i in live])
        for i, s, scored, ref in zip(live, new, outs, refs):
            assert [x.position for x in scored] == list(range(max(0, t - L), t + 1))
            assert [x.final for x in scored] == [x.position == t - L for x in scored]
            for x in scored:
                worst = max(worst, float(np.abs(x.probs - ref[x.position]).max()))
            assert sorted(s.pending) == list(range(max(0, t - L + 1), t + 1))
            states[i] = DialogueState.from_bytes(s.to_bytes()) if t % roundtrip_every == 0 else s
    return worst


@pytest.mark.parametrize("impl", ["loop", "gru"])
def test_step_equals_offline_on_the_shipped_weights(meld, impl):
    """Positions before, at and past the window (16), conversations of different lengths, more
    speakers than party ids: within 1e-5 of offline scoring (measured: ~1e-7)."""
    stream_kernel(meld).bwd_impl = impl
    try:
        W = meld.cfg.window
        worst = check_against_offline(meld, [2 * W + 5, W + 1, W, 3, 1, W + 7], np.random.default_rng(0))
    finally:
        stream_kernel(meld).bwd_impl = "loop"
    assert worst < 1e-5


@pytest.mark.parametrize(
    "over",
    [{}, {"cross_attention": False}, {"shared_private": False, "cross_attention": False}, {"shared_private": False},
     {"use_context": False}, {"use_context": False, "cross_attention": False}, {"lookahead": 0, "window": 3},
     {"lookahead": 0, "window": 1}, {"lookahead": 3, "window": 4}],
    ids=["full", "no-xattn", "plain-gru", "plain-gru-xattn", "utterance-only", "utterance-only-no-xattn", "L0", "W1", "L3W4"],
)
@pytest.mark.parametrize("impl", ["loop", "gru"])
def test_every_variant_equals_offline(over, impl):
    torch.manual_seed(5)
    model = EmotionSIModel(tiny_config(**over)).eval()
    stream_kernel(model).bwd_impl = impl
    assert check_against_offline(model, [11, 6, 2, 1], np.random.default_rng(1), roundtrip_every=2) < 1e-5


def test_kernel_logits_equal_score_windows(meld):
    """The kernel's logits (no dropout, projections folded) against score_windows over windows
    with 1..W real columns, targets in the last L + 1 columns."""
    cfg, rng = meld.cfg, np.random.default_rng(2)
    W, Q, B = cfg.window, cfg.lookahead + 1, 24
    u = torch.from_numpy(real_looking(rng, B * W, meld.encoder.dim).reshape(B, W, -1))
    p = torch.from_numpy(rng.integers(0, cfg.num_parties, (B, W)))
    k = torch.from_numpy(np.arange(B) % W + 1)  # real columns per window
    mask = torch.arange(W)[None] >= (W - k)[:, None]
    u, p = u * mask[..., None], p * mask
    with torch.inference_mode():
        f = meld.forward_states(u, p)
        got = stream_kernel(meld).score(u, p, f, mask)  # (B, Q, E)
        rows = torch.arange(B).repeat_interleave(Q)
        cols = torch.arange(W - Q, W).repeat(B)
        ref, _ = meld.score_windows(u, p, f, mask, cols, rows)
    ref = ref.view(B, Q, -1)
    real = (cols.view(B, Q) >= (W - k)[:, None])
    assert float((got - ref).abs()[real].max()) < 1e-5


# ---- the stored bytes --------------------------------------------------------------------------


def old_to_bytes(state: DialogueState) -> bytes:
    """The first format, as DialogueState.to_bytes wrote it (safetensors, before the compact one)."""
    from safetensors.numpy import save as st_save

    pending = state.pending
    meta = {"seen": str(state.seen), "parties": json.dumps(state.parties), "pending": json.dumps(sorted(pending))}
    tensors = {f"pending.{p}": v.astype(np.float32) for p, v in pending.items()}
    if state.vectors is not None:
        tensors.update(vectors=np.ascontiguousarray(state.vectors), party_ids=state.party_ids.astype(np.int64),
                       fwd=np.ascontiguousarray(state.fwd))
    return st_save(tensors, metadata=meta)


def old_from_bytes(data: bytes) -> dict:
    """How the first format was read (the fields of the DialogueState it built)."""
    from safetensors.numpy import load as st_load

    tensors = st_load(data)
    header_len = int.from_bytes(data[:8], "little")
    meta = json.loads(data[8 : 8 + header_len]).get("__metadata__", {})
    pending = {int(p): tensors[f"pending.{p}"] for p in json.loads(meta["pending"])}
    return dict(seen=int(meta["seen"]), parties=json.loads(meta["parties"]), vectors=tensors.get("vectors"),
                party_ids=tensors.get("party_ids"), fwd=tensors.get("fwd"), pending=pending)


def stepped(model, n: int, rng, speakers=("a", "b", "c")) -> DialogueState:
    state = DialogueState()
    for t in range(n):
        (state,), _ = step(model, [state], real_looking(rng, 1, model.encoder.dim), [speakers[t % len(speakers)]])
    return state


def assert_same_state(a: DialogueState, b: DialogueState) -> None:
    assert a.seen == b.seen and a.parties == b.parties and sorted(a.pending) == sorted(b.pending)
    for x, y in ((a.vectors, b.vectors), (a.party_ids, b.party_ids), (a.fwd, b.fwd)):
        assert (x is None) == (y is None)
        if x is not None:
            np.testing.assert_array_equal(x, y)
    for p in a.pending:
        np.testing.assert_array_equal(a.pending[p], b.pending[p])


@pytest.mark.parametrize("n", [0, 1, 3, 4, 9])
def test_states_in_the_old_format_decode_and_continue_the_same(tiny_model, n):
    """A rolling upgrade: states already in Redis (first format) decode to the same state and the
    next step scores as if the state had never been stored."""
    rng = np.random.default_rng(n)
    state = stepped(tiny_model, n, rng)
    old = old_to_bytes(state)
    assert old[8:9] == b"{"  # safetensors: header length, then its JSON
    back = DialogueState.from_bytes(old)
    assert_same_state(back, state)
    # what a worker writes while old ones still run: they read it as the state it is
    was = old_from_bytes(state.to_bytes(version=1))
    assert was["seen"] == state.seen and was["parties"] == state.parties and sorted(was["pending"]) == sorted(state.pending)
    for name in ("vectors", "party_ids", "fwd"):
        assert (was[name] is None and getattr(state, name) is None) or np.array_equal(was[name], getattr(state, name))
    assert was["party_ids"] is None or was["party_ids"].dtype == np.int64
    vec = real_looking(rng, 1, tiny_model.encoder.dim)
    (s1,), (o1,) = step(tiny_model, [state], vec, ["b"])
    (s2,), (o2,) = step(tiny_model, [back], vec, ["b"])
    assert [(x.position, x.final) for x in o1] == [(x.position, x.final) for x in o2]
    for x, y in zip(o1, o2):
        np.testing.assert_array_equal(x.probs, y.probs)
    assert_same_state(s1, s2)


@pytest.mark.parametrize("n", [0, 1, 3, 4, 9])
def test_bytes_round_trip_exactly_without_copies(tiny_model, n):
    state = stepped(tiny_model, n, np.random.default_rng(n))
    data = state.to_bytes()
    assert data[:4] == b"DSv2"
    back = DialogueState.from_bytes(data)
    assert_same_state(back, state)
    assert back.to_bytes() == data
    if n:
        assert not back.vec_win.flags.owndata and not back.vec_win.flags.writeable  # views of the bytes
    # behind a caller's header, read through a memoryview (no copy of the state's bytes)
    framed = state.to_bytes(prefix=b'{"v":1}\n')
    assert framed == b'{"v":1}\n' + data
    view = DialogueState.from_bytes(memoryview(framed)[8:])
    assert_same_state(view, state)
    assert DialogueState.from_bytes(memoryview(b"x" + old_to_bytes(state))[1:]).seen == state.seen
    W, D = tiny_model.cfg.window, tiny_model.encoder.dim
    assert len(data) < 64 + 4 * min(n, W) * (D + 3 * 32 + 1) + 4 * 2 * 7  # header + the real rows only


def test_a_young_conversation_and_an_empty_state_are_small(meld):
    rng = np.random.default_rng(3)
    assert len(DialogueState().to_bytes()) <= 48
    full_state = stepped(meld, 20, rng)
    full = full_state.to_bytes()
    young = stepped(meld, 2, rng).to_bytes()
    assert len(young) < len(full) / 7
    assert len(full) < len(full_state.to_bytes(version=1))  # below the first format's size at a full window


def test_float16_window_arrays_halve_the_bytes_and_stay_within_1e_3(meld):
    """Opt-in (to_bytes(float16=True)): every stored state in half precision, 40 steps of 12
    conversations; scores within 1e-3 of float32 states (measured ~7e-5), pending scores exact."""
    rng = np.random.default_rng(10)
    B, D = 12, meld.encoder.dim
    full, half = [DialogueState()] * B, [DialogueState()] * B
    worst = 0.0
    for t in range(40):
        vec, spk = real_looking(rng, B, D), [f"s{rng.integers(0, 4)}" for _ in range(B)]
        full, o32 = step(meld, full, vec, spk)
        half, o16 = step(meld, half, vec, spk)
        worst = max(worst, max(float(np.abs(x.probs - y.probs).max()) for a, b in zip(o32, o16) for x, y in zip(a, b)))
        blobs = [s.to_bytes(float16=True) for s in half]
        back = [DialogueState.from_bytes(b) for b in blobs]
        for s, b in zip(half, back):
            assert b.vec_win.dtype == np.float16 and b.pending_probs.dtype == np.float32
            np.testing.assert_array_equal(b.vectors, s.vectors.astype(np.float16))
            np.testing.assert_array_equal(b.pending_probs, s.pending_probs)
            assert b.to_bytes(float16=True) == DialogueState.from_bytes(b.to_bytes(float16=True)).to_bytes(float16=True)
        half = back
    assert worst < 1e-3
    assert len(blobs[0]) < 0.51 * len(full[0].to_bytes())
    assert old_from_bytes(half[0].to_bytes(version=1))["vectors"].dtype == np.float32  # old readers get float32


@pytest.mark.parametrize("names", [["a\0b", "c"], ["", "x"], [""], ["émoji 😀", "tab\tname"], ["n\n", "\"q\""]])
def test_any_speaker_names_round_trip(tiny_model, names):
    state = stepped(tiny_model, 4, np.random.default_rng(4), speakers=names)
    back = DialogueState.from_bytes(state.to_bytes())
    assert back.parties == state.parties == {s: i for i, s in enumerate(dict.fromkeys(names))}


# ---- semantics -----------------------------------------------------------------------------------


def test_step_is_pure_and_states_can_be_reused(tiny_model):
    rng = np.random.default_rng(6)
    states = [stepped(tiny_model, n, rng) for n in (0, 2, 7)]
    before = [s.to_bytes() for s in states]
    vec = real_looking(rng, 3, tiny_model.encoder.dim)
    new1, out1 = step(tiny_model, states, vec, ["a", "b", "z"])
    new2, out2 = step(tiny_model, states, vec, ["a", "b", "z"])
    assert [s.to_bytes() for s in states] == before
    assert [s.to_bytes() for s in new1] == [s.to_bytes() for s in new2]
    for a, b in zip(out1, out2):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x.probs, y.probs)
    # the same (empty) state object several times in one batch
    same, outs = step(tiny_model, [DialogueState()] * 2, vec[:2], ["a", "a"])
    assert [s.seen for s in same] == [1, 1] and not np.array_equal(outs[0][0].probs, outs[1][0].probs)


def test_window_arrays_have_fixed_shapes_and_the_real_rows_are_views(tiny_model):
    W, D = tiny_model.cfg.window, tiny_model.encoder.dim
    state = stepped(tiny_model, 2, np.random.default_rng(7))
    assert state.vec_win.shape == (W, D) and state.fwd_win.shape == (W, 3, 32) and state.pid_win.shape == (W,)
    assert state.vectors.shape == (2, D) and state.fwd.shape == (2, 3, 32) and list(state.party_ids) == [0, 1]
    assert not state.vec_win[: W - 2].any()  # left padding


def test_finalize_then_continue(tiny_model):
    """A flush makes the pending utterances final; the next step re-scores the last L + 1 again and
    those already flushed come back as pending (the stream side ignores them), as before."""
    rng = np.random.default_rng(8)
    state = stepped(tiny_model, 5, rng)
    assert sorted(state.pending) == [3, 4]
    flushed, out = finalize(state)
    assert [(x.position, x.final) for x in out] == [(3, True), (4, True)] and flushed.pending == {}
    np.testing.assert_array_equal(out[1].probs, state.pending[4])
    back = DialogueState.from_bytes(flushed.to_bytes())
    assert back.pending == {} and back.seen == 5
    (nxt,), (scored,) = step(tiny_model, [back], real_looking(rng, 1, tiny_model.encoder.dim), ["a"])
    assert [(x.position, x.final) for x in scored] == [(3, True), (4, False), (5, False)]
    assert sorted(nxt.pending) == [4, 5]


def test_the_kernel_follows_weight_changes(tiny_model):
    rng = np.random.default_rng(9)
    vec = real_looking(rng, 1, tiny_model.encoder.dim)
    _, (before,) = step(tiny_model, [DialogueState()], vec, ["a"])
    with torch.no_grad():
        tiny_model.emotion_head[3].bias.add_(1.0 * torch.arange(7))
    _, (after,) = step(tiny_model, [DialogueState()], vec, ["a"])
    assert not np.allclose(before[0].probs, after[0].probs)
    (ref,) = offline_at_horizon(tiny_model, [vec], [["a"]])
    np.testing.assert_allclose(after[0].probs, ref[0], atol=1e-6)
    # the offline reference itself agrees with score_dialogues (final mode of a whole conversation)
    vecs = real_looking(rng, 9, tiny_model.encoder.dim)
    spk = [("a", "b", "c")[t % 3] for t in range(9)]
    (ref,) = offline_at_horizon(tiny_model, [vecs], [spk])
    with torch.inference_mode():
        logits, _ = tiny_model.score_dialogues(torch.from_numpy(vecs[None]), torch.tensor([party_ids(spk, 8)]),
                                               torch.tensor([9]), tiny_model.cfg.lookahead, tiny_model.cfg.window)
    final = torch.softmax(logits, -1).numpy()
    for pos, v in ref.items():
        np.testing.assert_allclose(v, final[pos], atol=1e-6)


def test_the_kernel_is_kept_until_a_module_is_replaced_or_weights_are_loaded(tiny_model):
    """stream_kernel reuses the prepared kernel while nothing changed and builds it again after
    load_state_dict (in place) or when one of the modules it reads is replaced."""
    import copy

    kern = stream_kernel(tiny_model)
    assert stream_kernel(tiny_model) is kern
    other = copy.deepcopy(tiny_model)
    with torch.no_grad():
        other.emotion_head[3].bias.add_(1.0)
    tiny_model.load_state_dict(other.state_dict())
    loaded = stream_kernel(tiny_model)
    assert loaded is not kern and stream_kernel(tiny_model) is loaded
    tiny_model.emotion_head = copy.deepcopy(other.emotion_head)  # the same values, another module
    assert stream_kernel(tiny_model) is not loaded
