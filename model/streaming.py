"""Incremental inference as a pure function: `step(model, states, inputs) -> (states, scores)`.

A conversation's state is what the stream side stores (in Redis) between utterances:
  - the forward GRU states of the last `window` utterances (the newest one is the carried state),
  - their utterance vectors and party ids (for the backward GRUs and the cross-attention),
  - the party index of the first `num_parties - 1` speakers (the others share the last index),
  - the latest scores of the utterances that are not final yet (the last `lookahead` ones).
Its size is bounded by `window` whatever the conversation's length, so the cost per utterance
is constant. States are never mutated: `step` returns new ones.

`step` takes one new utterance per conversation for a batch of conversations and scores all of
them together. The per-utterance arrays of a state have fixed shapes ((window, ...), left-padded
while the conversation is shorter), so a batch's windows are assembled with one stack per array
and shifted by one column at once; the arithmetic is `model.modeling.StreamKernel` (only what
the emotion scores of the last `lookahead` + 1 utterances depend on). Several utterances of the
same conversation go in successive calls, in `seq` order.

Stored bytes (`to_bytes`): a fixed header, the speaker map as JSON, then the arrays' raw bytes
(only the rows of real utterances); `from_bytes` reads them without copying. States written in
the first format (safetensors, before this one) still decode.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from model.modeling import EmotionSIModel, stream_kernel


@dataclass(frozen=True, slots=True)
class Scored:
    """Scores of one utterance at one horizon."""

    position: int  # 0-based index of the utterance in its conversation
    probs: np.ndarray  # (E,) softmax over the emotion labels
    final: bool  # True when `lookahead` later utterances were seen (or the conversation ended)


@dataclass(frozen=True)
class DialogueState:
    """One conversation's rolling state. The window arrays hold the last `window` utterances,
    oldest first, left-padded with zeros while fewer were seen (states decoded from bytes hold
    the real rows only; `step` pads them); the properties below give the real rows."""

    seen: int = 0  # utterances stepped so far (= position of the next one)
    parties: dict[str, int] = field(default_factory=dict)
    vec_win: np.ndarray | None = None  # (W, D) float32 utterance vectors
    pid_win: np.ndarray | None = None  # (W,) party ids
    fwd_win: np.ndarray | None = None  # (W, branches, H) float32 forward states after each utterance
    # Latest probs of the utterances not final yet, newest first: row r is position seen - 1 - r.
    pending_probs: np.ndarray | None = None  # (n, E) float32, n <= lookahead
    # The speaker map's stored bytes, kept with the map they encode (it rarely changes).
    _parties_raw: tuple[dict, int, bytes] | None = field(default=None, compare=False, repr=False)

    # ---- the real rows (views, no copies) ------------------------------------------------
    @property
    def rows(self) -> int:
        return 0 if self.vec_win is None else min(self.seen, len(self.vec_win))

    @property
    def vectors(self) -> np.ndarray | None:  # (k, D) last k <= window utterance vectors
        return None if self.vec_win is None else self.vec_win[len(self.vec_win) - self.rows :]

    @property
    def party_ids(self) -> np.ndarray | None:  # (k,)
        return None if self.pid_win is None else self.pid_win[len(self.pid_win) - self.rows :]

    @property
    def fwd(self) -> np.ndarray | None:  # (k, branches, H)
        return None if self.fwd_win is None else self.fwd_win[len(self.fwd_win) - self.rows :]

    @property
    def pending(self) -> dict[int, np.ndarray]:
        """position -> latest probs, for the utterances not final yet."""
        if self.pending_probs is None:
            return {}
        return {self.seen - 1 - r: self.pending_probs[r] for r in range(len(self.pending_probs) - 1, -1, -1)}

    # ---- serialisation (the stream side stores these bytes) ------------------------------
    def to_bytes(self, version: int = 2, prefix: bytes = b"", float16: bool = False) -> bytes:
        """Version 2 (default): the compact format. Version 1: the first format (safetensors), for
        a rolling upgrade while workers that only read it still run. `prefix` (a caller's own
        header) goes first, in the same copy: `from_bytes(memoryview(data)[len(prefix):])` reads
        the state back without copying either. `float16`: the window arrays in half precision
        (half the bytes; scores then move by up to ~1e-4, so streaming no longer equals offline
        scoring within 1e-5); the pending scores stay float32."""
        if version == 1:
            return prefix + _to_bytes_v1(self)
        k = self.rows
        pend = self.pending_probs
        n_pend, E = (0, 0) if pend is None else pend.shape
        flags, names = _parties_bytes(self)
        if float16:
            flags |= _FLOAT16
        D, br, H = (0, 0, 0) if k == 0 else (self.vec_win.shape[1], *self.fwd_win.shape[1:])
        head = _HEAD.pack(MAGIC, self.seen, k, D, br, H, n_pend, E, flags, len(names))
        parts = [prefix, head, names, _ZEROS[: -(len(head) + len(names)) % _ALIGN]]
        if n_pend:
            parts.append(_raw(pend, np.float32))
        if k:
            dtype = np.float16 if float16 else np.float32
            parts += [_raw(self.vec_win[-k:], dtype), _raw(self.fwd_win[-k:], dtype), _raw(self.pid_win[-k:], np.int16)]
        return b"".join(parts)

    @classmethod
    def from_bytes(cls, data: bytes | memoryview) -> "DialogueState":
        """Any bytes-like object; the arrays are read-only views of it (no copies)."""
        if bytes(data[:4]) != MAGIC:
            return _from_bytes_v1(bytes(data))
        _, seen, k, D, br, H, n_pend, E, flags, n_names = _HEAD.unpack_from(data)
        off = _HEAD.size
        raw = bytes(data[off : off + n_names])
        if flags & _JSON_NAMES:
            parties = json.loads(raw)
        else:
            names = raw.decode().split("\0") if n_names else ()
            parties = dict(zip(names, range(len(names))))
        off += n_names
        off += -off % _ALIGN
        vec = fwd = pend = pid = None
        if n_pend:
            pend = np.frombuffer(data, np.float32, n_pend * E, off).reshape(n_pend, E)
            off += 4 * n_pend * E
        if k:
            n_vec, n_fwd = k * D, k * br * H
            window = np.frombuffer(data, np.float16 if flags & _FLOAT16 else np.float32, n_vec + n_fwd, off)
            vec, fwd = window[:n_vec].reshape(k, D), window[n_vec:].reshape(k, br, H)
            pid = np.frombuffer(data, np.int16, k, off + window.nbytes)
        return _state(seen, parties, vec, pid, fwd, pend, (parties, flags & _JSON_NAMES, raw))


MAGIC = b"DSv2"  # the first format (safetensors) starts with its header's length: never these bytes
# magic, seen, rows, D, branches, H, pending rows, E, flags, speaker map length
_HEAD = struct.Struct("<4sqHHHHHHHI")
_ALIGN = 16  # the arrays start 16-byte aligned (relative to the data)
_ZEROS = bytes(_ALIGN)
_JSON_NAMES = 1  # flag: the speaker map is JSON (else its names, NUL-separated, in index order)
_FLOAT16 = 2  # flag: the window arrays (vectors, forward states) are float16


def _state(seen, parties, vec, pid, fwd, pend, parties_raw) -> DialogueState:
    """DialogueState(...) without the frozen dataclass's per-field __setattr__ (a hot path)."""
    s = object.__new__(DialogueState)
    object.__setattr__(s, "__dict__", {"seen": seen, "parties": parties, "vec_win": vec, "pid_win": pid, "fwd_win": fwd,
                                       "pending_probs": pend, "_parties_raw": parties_raw})
    return s


def _parties_bytes(s: DialogueState) -> tuple[int, bytes]:
    cached = s._parties_raw
    if cached is not None and cached[0] is s.parties:
        return cached[1], cached[2]
    names = list(s.parties)
    if (list(s.parties.values()) == list(range(len(names))) and names != [""]
            and all(isinstance(n, str) and "\0" not in n for n in names)):
        return 0, "\0".join(names).encode()
    return _JSON_NAMES, json.dumps(s.parties, separators=(",", ":")).encode()


def _raw(a: np.ndarray, dtype) -> memoryview:
    return memoryview(np.ascontiguousarray(a, dtype=dtype)).cast("B")


def _to_bytes_v1(s: DialogueState) -> bytes:
    from safetensors.numpy import save as st_save

    pending = s.pending
    meta = {"seen": str(s.seen), "parties": json.dumps(s.parties), "pending": json.dumps(sorted(pending))}
    tensors = {f"pending.{p}": np.ascontiguousarray(v, dtype=np.float32) for p, v in pending.items()}
    if s.rows:
        tensors.update(vectors=np.ascontiguousarray(s.vectors, np.float32), party_ids=s.party_ids.astype(np.int64),
                       fwd=np.ascontiguousarray(s.fwd, np.float32))
    return st_save(tensors, metadata=meta)


def _from_bytes_v1(data: bytes) -> DialogueState:
    """The first format: safetensors, its metadata holding seen, the speaker map and the pending positions."""
    from safetensors.numpy import load as st_load

    tensors = st_load(data)
    header_len = int.from_bytes(data[:8], "little")
    meta = json.loads(data[8 : 8 + header_len]).get("__metadata__", {})
    seen = int(meta["seen"])
    positions = sorted(json.loads(meta["pending"]), reverse=True)
    if positions != list(range(seen - 1, seen - 1 - len(positions), -1)):
        raise ValueError(f"state: pending positions {positions} are not the last ones before {seen}")
    pend = np.stack([tensors[f"pending.{p}"] for p in positions]).astype(np.float32) if positions else None
    return DialogueState(seen, json.loads(meta["parties"]), tensors.get("vectors"), tensors.get("party_ids"),
                         tensors.get("fwd"), pend)


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


def _shifted(arrays: list[np.ndarray | None], W: int, tail: tuple[int, ...], dtype) -> np.ndarray:
    """(B, W, *tail): each conversation's last W - 1 rows (zeros before its first utterance) in
    columns 0..W-2, the last column left for the new utterance. One stack, no per-row work."""
    out = np.empty((len(arrays), W, *tail), dtype=dtype)
    if W > 1:
        zeros = np.zeros((W - 1, *tail), dtype=dtype)
        rows = [zeros if a is None else a[1:] if len(a) == W else _pad(a, W - 1, zeros) for a in arrays]
        np.stack(rows, out=out[:, :-1])
    return out


def _pad(a: np.ndarray, n: int, zeros: np.ndarray) -> np.ndarray:
    a = a[len(a) - n :] if len(a) > n else a
    return np.concatenate([zeros[: n - len(a)], a]) if len(a) < n else a


@torch.inference_mode()
def step(
    model: EmotionSIModel,
    states: list[DialogueState],
    vectors: np.ndarray | torch.Tensor,  # (B, D) one new utterance vector per conversation
    speakers: list[str],
) -> tuple[list[DialogueState], list[list[Scored]]]:
    """Advance B conversations by one utterance each; re-score the last `lookahead` + 1."""
    cfg = model.cfg
    L, W, Q = cfg.lookahead, cfg.window, cfg.lookahead + 1
    kern = stream_kernel(model)
    dev = kern.device
    if isinstance(vectors, torch.Tensor):  # already on a device (GPU check, notebooks)
        u_host = vectors.detach().to("cpu", torch.float32).numpy()
    else:
        u_host = np.asarray(vectors, dtype=np.float32)
    B, D = u_host.shape
    if B == 0:
        return [], []
    br, H = (cfg.branches, cfg.hidden) if kern.context else (1, 1)

    parties, new_party = [], np.empty(B, dtype=np.int64)
    P = cfg.num_parties
    for i, (s, spk) in enumerate(zip(states, speakers)):
        p, new_party[i] = assign_party(s.parties, spk, P)
        parties.append(p)

    # 1. the windows, shifted by one: the new utterance in the last column
    vec = _shifted([s.vec_win for s in states], W, (D,), np.float32)
    vec[:, -1] = u_host
    pid = _shifted([s.pid_win for s in states], W, (), np.int64)
    pid[:, -1] = new_party
    fwd = _shifted([s.fwd_win for s in states], W, (br, H), np.float32)
    seen = np.fromiter((s.seen for s in states), dtype=np.int64, count=B) + 1
    mask = np.arange(W) >= (W - np.minimum(seen, W))[:, None]  # (B, W) real columns

    def to_dev(a: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(a)
        return t if dev.type == "cpu" else t.to(dev, non_blocking=False)

    u_w, p_w, f_w, m_w = to_dev(vec), to_dev(pid), to_dev(fwd), to_dev(mask)

    # 2. the carried forward state -> forward states of the new utterances (B, branches, H)
    if kern.context:
        if W > 1:
            h0 = f_w[:, -2]
        else:
            h0 = to_dev(np.stack([np.zeros((br, H), np.float32) if s.fwd_win is None else s.fwd_win[-1] for s in states],
                                 dtype=np.float32))
        f_new = kern.forward_step(u_w[:, -1], p_w[:, -1], h0)
        f_w[:, -1] = f_new
        if dev.type != "cpu":
            fwd[:, -1] = f_new.cpu().numpy()
    else:
        fwd[:, -1] = 0.0

    # 3. the last L + 1 utterances of every window scored in one call
    logits = kern.score(u_w, p_w, f_w, m_w)  # (B, Q, E), column j = position seen - Q + j
    probs = torch.softmax(logits.float(), dim=-1).cpu().numpy()
    pid16 = pid.astype(np.int16)  # as stored
    for a in (vec, pid16, fwd, probs):
        a.flags.writeable = False  # the new states' arrays are views into these

    # 4. per conversation: only object creation (views into the batch arrays, no copies)
    targets = list(probs.reshape(B * Q, -1))  # row i * Q + j: column j of conversation i
    pend_rows = list(probs[:, :0:-1]) if L else [None] * B  # (L, E) each, newest first
    out_states, outputs = [], []
    for i, (s, n, p, v, d, f, pend) in enumerate(zip(states, seen.tolist(), parties, vec, pid16, fwd, pend_rows)):
        base = i * Q - n + Q  # + position = index of its row in `targets`
        first = n - Q if n > Q else 0  # positions before the conversation's first utterance are padding
        final = n - Q
        outputs.append([Scored(pos, targets[base + pos], pos == final) for pos in range(first, n)])
        if n < L:
            pend = pend[:n]
        raw = s._parties_raw if p is s.parties else None
        out_states.append(_state(n, p, v, d, f, pend if L else None, raw))
    return out_states, outputs


def finalize(state: DialogueState) -> tuple[DialogueState, list[Scored]]:
    """End of conversation (or idle timeout): the pending utterances become final with their
    latest scores, which already used every later utterance there is (horizon = last one)."""
    out = [Scored(p, v, True) for p, v in sorted(state.pending.items())]
    return replace(state, pending_probs=None), out
