"""Incremental inference as a pure function: `step(model, states, inputs) -> (states, scores)`.

A conversation's state is what the stream side stores (in Redis) between utterances:
  - the forward GRU states of the last `window` utterances (the newest one is the carried state),
  - their utterance vectors and party ids (for the backward GRUs and the cross-attention),
  - the party index of the first `num_parties - 1` speakers (the others share the last index),
  - the latest scores of the utterances that are not final yet.
Its size is bounded by `window` whatever the conversation's length, so the cost per utterance
is constant. States are never mutated: `step` returns new ones.

`step` takes one new utterance per conversation for a batch of conversations and scores all of
them together (one padded window per conversation). Several utterances of the same
conversation go in successive calls, in `seq` order.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from model.modeling import EmotionSIModel


@dataclass(frozen=True)
class Scored:
    """Scores of one utterance at one horizon."""

    position: int  # 0-based index of the utterance in its conversation
    probs: np.ndarray  # (E,) softmax over the emotion labels
    final: bool  # True when `lookahead` later utterances were seen (or the conversation ended)


@dataclass(frozen=True)
class DialogueState:
    seen: int = 0  # utterances stepped so far (= position of the next one)
    parties: dict[str, int] = field(default_factory=dict)
    vectors: np.ndarray | None = None  # (k, D) last k <= window utterance vectors
    party_ids: np.ndarray | None = None  # (k,)
    fwd: np.ndarray | None = None  # (k, branches, H) forward states after each of them
    pending: dict[int, np.ndarray] = field(default_factory=dict)  # position -> latest probs, not final

    # ---- serialisation (the stream side stores these bytes) ------------------------
    def to_bytes(self) -> bytes:
        meta = {"seen": str(self.seen), "parties": json.dumps(self.parties), "pending": json.dumps(sorted(self.pending))}
        tensors = {f"pending.{p}": v.astype(np.float32) for p, v in self.pending.items()}
        if self.vectors is not None:
            tensors.update(vectors=self.vectors, party_ids=self.party_ids, fwd=self.fwd)
        return st_save(tensors, metadata=meta)

    @classmethod
    def from_bytes(cls, data: bytes) -> "DialogueState":
        tensors = st_load(data)
        header_len = int.from_bytes(data[:8], "little")
        meta = json.loads(data[8 : 8 + header_len]).get("__metadata__", {})
        pending = {int(p): tensors[f"pending.{p}"] for p in json.loads(meta["pending"])}
        return cls(
            seen=int(meta["seen"]),
            parties=json.loads(meta["parties"]),
            vectors=tensors.get("vectors"),
            party_ids=tensors.get("party_ids"),
            fwd=tensors.get("fwd"),
            pending=pending,
        )


def assign_party(parties: dict[str, int], speaker: str, num_parties: int) -> tuple[dict[str, int], int]:
    """Party index = order of first appearance, capped (same rule as offline `party_ids`).

    The map is bounded: it holds the first `num_parties - 1` speakers only. Every other speaker
    gets the last index, as offline, so remembering them changes nothing (a conversation with a
    new name per utterance no longer grows its state)."""
    if speaker in parties:
        return parties, parties[speaker]
    if len(parties) >= num_parties - 1:
        return parties, num_parties - 1
    idx = len(parties)
    return {**parties, speaker: idx}, idx


@torch.inference_mode()
def step(
    model: EmotionSIModel,
    states: list[DialogueState],
    vectors: np.ndarray | torch.Tensor,  # (B, D) one new utterance vector per conversation
    speakers: list[str],
) -> tuple[list[DialogueState], list[list[Scored]]]:
    """Advance B conversations by one utterance each; re-score the last `lookahead` + 1."""
    cfg = model.cfg
    dev = next(model.parameters()).device
    L, W = cfg.lookahead, cfg.window
    if isinstance(vectors, torch.Tensor):  # already on a device (GPU check, notebooks)
        u_new = vectors.to(dev, torch.float32)
    else:
        u_new = torch.as_tensor(np.asarray(vectors, dtype=np.float32), device=dev)  # (B, D)
    B, D = u_new.shape

    parties, new_party = [], []
    for s, spk in zip(states, speakers):
        p, idx = assign_party(s.parties, spk, cfg.num_parties)
        parties.append(p)
        new_party.append(idx)
    party_new = torch.tensor(new_party, device=dev)  # (B,)

    # 1. carried forward state -> forward states of the new utterances (B, branches, H)
    if model.context is not None:
        # Assembled on the host and moved in one copy (one per conversation costs a GPU dearly).
        zeros = np.zeros((cfg.branches, cfg.hidden), dtype=np.float32)
        h0 = torch.from_numpy(np.stack([s.fwd[-1] if s.fwd is not None else zeros for s in states])).to(dev)  # (B, br, H)
        f_new = model.forward_states(u_new.unsqueeze(1), party_new.unsqueeze(1), h0)[:, 0]  # (B, br, H)
    else:
        f_new = u_new.new_zeros(B, 1, 1)

    # 2. windows: the last <= W utterances ending at the new one, left-padded to a common width
    new_states, lens = [], []
    u_host, f_host = u_new.cpu().numpy(), f_new.cpu().numpy()  # one device->host copy each
    for i, s in enumerate(states):
        def tail(old, new):
            both = new if old is None else np.concatenate([old, new])
            return both[-W:]

        vec = tail(s.vectors, u_host[i : i + 1])
        pid = tail(s.party_ids, np.array([new_party[i]], dtype=np.int64))
        fwd = tail(s.fwd, f_host[i : i + 1])
        new_states.append(replace(s, seen=s.seen + 1, parties=parties[i], vectors=vec, party_ids=pid, fwd=fwd))
        lens.append(len(vec))
    # Always the full window width: the same shapes whatever the position (constant cost per
    # utterance, one compiled graph for torch.compile); left padding is masked out.
    width = W
    n_targets = [min(L + 1, k) for k in lens]
    u_win = np.zeros((B, width, D), dtype=np.float32)
    p_win = np.zeros((B, width), dtype=np.int64)
    f_win = np.zeros((B, width, *f_host.shape[1:]), dtype=np.float32)
    mask = np.zeros((B, width), dtype=bool)
    for i, s in enumerate(new_states):
        k = lens[i]
        u_win[i, width - k :] = s.vectors
        p_win[i, width - k :] = s.party_ids
        f_win[i, width - k :] = s.fwd
        mask[i, width - k :] = True
    u_win, p_win, f_win, mask = (torch.from_numpy(a).to(dev) for a in (u_win, p_win, f_win, mask))

    # 3. score every target in [T - L, T] of every conversation in one call
    rows = torch.tensor([i for i in range(B) for _ in range(n_targets[i])], device=dev)
    back = torch.tensor([j for i in range(B) for j in range(n_targets[i])], device=dev)  # 0 = horizon
    target_pos = width - 1 - back
    logits, _ = model.score_windows(u_win, p_win, f_win, mask, target_pos, rows)
    probs = torch.softmax(logits.float(), dim=-1).cpu().numpy()

    out_states, outputs = [], []
    cursor = 0
    for i, s in enumerate(new_states):
        horizon = s.seen - 1
        pending = dict(s.pending)
        scored = []
        for j in range(n_targets[i]):
            pos = horizon - j
            final = j == L
            scored.append(Scored(pos, probs[cursor + j], final))
            if final:
                pending.pop(pos, None)
            else:
                pending[pos] = probs[cursor + j]
        cursor += n_targets[i]
        scored.sort(key=lambda x: x.position)
        out_states.append(replace(s, pending=pending))
        outputs.append(scored)
    return out_states, outputs


def finalize(state: DialogueState) -> tuple[DialogueState, list[Scored]]:
    """End of conversation (or idle timeout): the pending utterances become final with their
    latest scores, which already used every later utterance there is (horizon = last one)."""
    out = [Scored(p, v, True) for p, v in sorted(state.pending.items())]
    return replace(state, pending={}), out
