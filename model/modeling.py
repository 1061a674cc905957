"""The whole forward pass: Li, Zhang, Ji and Liu (2020), made streamable.

    text --UtteranceEncoder--> u_t (D)                            one vector per utterance
    u_t  --forward GRUs-->      f_t  (branches, H)                carried: O(1) per utterance
    window of the last W utterances ending at horizon T:
         --backward GRUs-->     b_j  (branches, H)                bounded lookahead / window
    emotion side  e_t = [f;b]_emotion-private (+ [f;b]_shared)
    SI side       s_j = [f;b]_SI-private      (+ [f;b]_shared)
    cross-attention: query e_t, keys/values s_j over the window  -> a_t
    emotion head(e_t, a_t)  ->  emotion logits       SI head(s_t) -> speaker logits

Every mode is the same computation with a different horizon T for target t:
provisional T = t, final T = min(t + L, n - 1), offline (the paper) T = n - 1 with an unbounded
window. Streaming therefore equals offline scoring under the same window by construction; the
tests check it numerically.

Branch order in every (.., branches, ..) axis: 0 emotion-private (or the one plain GRU),
1 SI-private, 2 shared.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ModelConfig

EMOTION, SI_PRIVATE, SHARED = 0, 1, 2
PARTY_DIM = 16


def quiet_transformers() -> None:
    # Its load report lists the unused pooler weights on every start; nothing to act on.
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


class UtteranceEncoder(nn.Module):
    """A BERT-family transformer (MiniLM: BERT; MPNet) with mean pooling.

    Mean pooling because both bases were trained as sentence encoders with mean pooling: the
    pooled vector is meaningful before any fine-tuning, which matters for the frozen lower layers.

    The transformer is built from `base_config` (the base's transformers config, read by
    `model.encoders`) or, for tests, from `cfg.tiny_encoder`; its pretrained weights are loaded by
    `model.encoders.build_model`. `lower` runs the frozen part (embeddings and the bottom layers),
    `upper` the trainable top layers and the pooling: training computes `lower` once per utterance
    and caches it (model.training.cache); `forward` is `upper(lower(.))`.
    """

    def __init__(self, cfg: ModelConfig, base_config=None):
        super().__init__()
        from transformers import AutoModel, BertConfig

        quiet_transformers()
        if cfg.tiny_encoder is not None:
            t = cfg.tiny_encoder
            base_config = BertConfig(
                vocab_size=30522,
                hidden_size=t.hidden,
                num_hidden_layers=t.layers,
                num_attention_heads=t.heads,
                intermediate_size=t.intermediate,
                max_position_embeddings=512,
            )
        elif base_config is None:
            raise ValueError(f"base encoder {cfg.base_encoder!r} needs its config: build the model with model.encoders.build_model")
        self.bert = AutoModel.from_config(base_config, add_pooling_layer=False)
        self.kind = base_config.model_type  # "bert" or "mpnet"
        self.dim = base_config.hidden_size
        n_layers = base_config.num_hidden_layers
        self.first_trainable = n_layers - min(cfg.trainable_encoder_layers, n_layers)
        if cfg.tiny_encoder is None:
            for name, p in self.bert.named_parameters():
                p.requires_grad = self.is_trainable(name)

    def is_trainable(self, name: str) -> bool:
        """Trainable = in one of the top `trainable_encoder_layers` transformer layers."""
        parts = name.split(".")
        if parts[:2] == ["encoder", "layer"]:
            return int(parts[2]) >= self.first_trainable
        return False

    def _mask(self, hidden: torch.Tensor, attention_mask: torch.Tensor):
        from transformers.masking_utils import create_bidirectional_mask

        return create_bidirectional_mask(config=self.bert.config, inputs_embeds=hidden, attention_mask=attention_mask)

    def _layers(self, hidden: torch.Tensor, attention_mask: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        mask = self._mask(hidden, attention_mask)
        if self.kind == "mpnet":
            bias = self.bert.encoder.compute_position_bias(hidden)  # relative positions, shared by all layers
            for layer in self.bert.encoder.layer[start:stop]:
                hidden = layer(hidden, mask, bias)[0]
        else:
            for layer in self.bert.encoder.layer[start:stop]:
                out = layer(hidden, mask)
                hidden = out[0] if isinstance(out, tuple) else out
        return hidden

    def lower(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Hidden states (N, S, D) after the frozen bottom layers."""
        hidden = self.bert.embeddings(input_ids=input_ids)  # (N, S, D)
        return self._layers(hidden, attention_mask, 0, self.first_trainable)

    def upper(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Utterance vectors (N, D) from `lower`'s hidden states (N, S, D): top layers, mean pooling."""
        hidden = self._layers(hidden, attention_mask, self.first_trainable, len(self.bert.encoder.layer))
        m = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (N, S, 1)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)  # (N, D)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # input_ids, attention_mask: (N, S)
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (N, S, D)
        m = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (N, S, 1)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)  # (N, D)


class ContextEncoder(nn.Module):
    """Forward and backward GRUs per branch (the paper's BiGRUs, split so the forward half can be carried)."""

    def __init__(self, cfg: ModelConfig, dim: int):
        super().__init__()
        self.cfg = cfg
        self.party = nn.Embedding(cfg.num_parties, PARTY_DIM)
        in_dims = [dim + PARTY_DIM] + [dim] * (cfg.branches - 1)  # parties only on the emotion side
        self.fwd = nn.ModuleList(nn.GRU(d, cfg.hidden, batch_first=True) for d in in_dims)
        self.bwd = nn.ModuleList(nn.GRU(d, cfg.hidden, batch_first=True) for d in in_dims)

    def inputs(self, u: torch.Tensor, parties: torch.Tensor) -> list[torch.Tensor]:
        # u (B, T, D), parties (B, T) -> per branch (B, T, D_b)
        emo = torch.cat([u, self.party(parties)], dim=-1)
        return [emo] + [u] * (self.cfg.branches - 1)

    def forward_states(
        self, u: torch.Tensor, parties: torch.Tensor, h0: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Forward GRU states (B, T, branches, H), from h0 (B, branches, H) or zeros.

        Right padding is harmless: a state at a real position only reads positions before it.
        """
        outs = []
        for b, x in enumerate(self.inputs(u, parties)):
            h = None if h0 is None else h0[:, b].unsqueeze(0).contiguous()  # (1, B, H)
            out, _ = self.fwd[b](x, h)  # (B, T, H)
            outs.append(out)
        return torch.stack(outs, dim=2)

    def backward_states(self, u: torch.Tensor, parties: torch.Tensor) -> torch.Tensor:
        """Backward GRU states over left-padded windows (N, W, D) -> (N, W, branches, H).

        Windows end at their horizon (the last column); flipping makes them right-padded, so
        each real position's state reads only real positions between it and the horizon.
        """
        outs = []
        for b, x in enumerate(self.inputs(u, parties)):
            out, _ = self.bwd[b](x.flip(1))
            outs.append(out.flip(1))
        return torch.stack(outs, dim=2)


class EmotionSIModel(nn.Module):
    def __init__(self, cfg: ModelConfig, base_config=None):
        super().__init__()
        self.cfg = cfg
        self.encoder = UtteranceEncoder(cfg, base_config)
        d, h = self.encoder.dim, cfg.hidden
        self.drop = nn.Dropout(cfg.dropout)
        if cfg.use_context:
            self.context = ContextEncoder(cfg, d)
            per_branch = 2 * h
            self.emo_dim = per_branch * (2 if cfg.shared_private else 1)
            self.si_dim = self.emo_dim
        else:
            self.context = None
            self.emo_dim = self.si_dim = d
        if cfg.cross_attention:
            a = 2 * h if cfg.use_context else d
            self.query = nn.Linear(self.emo_dim, a)
            self.attn = nn.MultiheadAttention(
                a, cfg.attn_heads, dropout=cfg.dropout, kdim=self.si_dim, vdim=self.si_dim, batch_first=True
            )
            head_in = self.emo_dim + a
        else:
            head_in = self.emo_dim
        self.emotion_head = nn.Sequential(
            nn.Linear(head_in, 256), nn.GELU(), nn.Dropout(cfg.dropout), nn.Linear(256, len(cfg.emotion_labels))
        )
        self.si_head = nn.Sequential(
            nn.Linear(self.si_dim, 256), nn.GELU(), nn.Dropout(cfg.dropout), nn.Linear(256, len(cfg.speaker_labels))
        )

    # ---- utterance level -------------------------------------------------------------
    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.encoder(input_ids, attention_mask)  # (N, D)

    # ---- context level ---------------------------------------------------------------
    def forward_states(self, u: torch.Tensor, parties: torch.Tensor, h0: torch.Tensor | None = None) -> torch.Tensor:
        # (B, T, D), (B, T) -> (B, T, branches, H); an empty placeholder without context
        if self.context is None:
            return u.new_zeros(u.shape[0], u.shape[1], 1, 1)
        return self.context.forward_states(self.drop(u), parties, h0)

    def score_windows(
        self,
        u_win: torch.Tensor,  # (M, W, D) left-padded windows, the horizon in the last column
        party_win: torch.Tensor,  # (M, W)
        fwd_win: torch.Tensor,  # (M, W, branches, H) carried forward states
        win_mask: torch.Tensor,  # (M, W) True at real positions
        target_pos: torch.Tensor,  # (N,) column of each target utterance
        rows: torch.Tensor | None = None,  # (N,) window of each target, non-decreasing; None = target n in window n
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Emotion logits (N, E) and SI logits (N, S).

        Several targets may share a window (streaming re-scores the last L + 1 utterances of a
        conversation against one window): the backward GRUs then run once per window, not per target.
        """
        if rows is None:
            rows = torch.arange(u_win.shape[0], device=u_win.device)
        if self.context is None:
            reps = self.drop(u_win)  # (M, W, D)
            emo_seq = si_seq = reps
        else:
            bwd = self.context.backward_states(self.drop(u_win), party_win)  # (M, W, br, H)
            h = torch.cat([fwd_win, bwd], dim=-1)  # (M, W, br, 2H)
            if self.cfg.shared_private:
                emo_seq = torch.cat([h[:, :, EMOTION], h[:, :, SHARED]], dim=-1)  # (M, W, 4H)
                si_seq = torch.cat([h[:, :, SI_PRIVATE], h[:, :, SHARED]], dim=-1)  # (M, W, 4H)
            else:
                emo_seq = si_seq = h[:, :, EMOTION]  # (M, W, 2H)
            emo_seq, si_seq = self.drop(emo_seq), self.drop(si_seq)
        e_t = emo_seq[rows, target_pos]  # (N, emo_dim)
        s_t = si_seq[rows, target_pos]  # (N, si_dim)
        feats = e_t
        if self.cfg.cross_attention:
            # Targets that share a window become several queries of one attention call, so the
            # window's keys and values are projected once, not once per target.
            M, N = u_win.shape[0], rows.shape[0]
            counts = torch.bincount(rows, minlength=M)
            slot = torch.arange(N, device=rows.device) - (counts.cumsum(0) - counts)[rows]  # rows come grouped
            q = u_win.new_zeros(M, int(counts.max()), self.attn.embed_dim)
            q[rows, slot] = self.query(e_t)
            a, _ = self.attn(q, si_seq, si_seq, key_padding_mask=~win_mask, need_weights=False)  # (M, Q, A)
            feats = torch.cat([e_t, a[rows, slot]], dim=-1)
        return self.emotion_head(feats), self.si_head(s_t)

    def score_dialogues(
        self,
        u: torch.Tensor,  # (B, T, D) right-padded utterance vectors
        parties: torch.Tensor,  # (B, T)
        lengths: torch.Tensor,  # (B,)
        lookahead: torch.Tensor | int | None,  # per target (N,) with -1 = whole dialogue, or one value
        window: torch.Tensor | int | None,  # per target (N,) or one value; None = unbounded
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Offline scoring of every utterance: logits (N, E), (N, S) in (dialogue, position) order.

        Target t of a dialogue of n utterances uses horizon T = min(t + lookahead, n - 1) (n - 1
        when lookahead is -1/None) and the `window` utterances ending at T.
        """
        dev = u.device
        B, T = parties.shape
        fwd = self.forward_states(u, parties)  # (B, T, br, H)
        pos = torch.arange(T, device=dev)
        valid = pos.unsqueeze(0) < lengths.unsqueeze(1)  # (B, T)
        b_idx, t_idx = valid.nonzero(as_tuple=True)  # (N,), (N,)
        n_len = lengths[b_idx]
        la = _per_target(lookahead, b_idx, -1)
        horizon = torch.where(la < 0, n_len - 1, torch.minimum(t_idx + la, n_len - 1))  # (N,)
        win = _per_target(window, b_idx, -1)
        win = torch.where(win < 0, torch.full_like(win, T), win)
        W = int(max(int(win.max()), 1))
        cols = horizon.unsqueeze(1) - (W - 1) + torch.arange(W, device=dev)  # (N, W)
        win_mask = (cols >= 0) & (cols > (horizon - win).unsqueeze(1))
        cols = cols.clamp(min=0)
        rows = b_idx.unsqueeze(1).expand_as(cols)
        target_pos = (W - 1) - (horizon - t_idx)
        return self.score_windows(u[rows, cols], parties[rows, cols], fwd[rows, cols], win_mask, target_pos)


def _per_target(value, b_idx: torch.Tensor, none_value: int) -> torch.Tensor:
    if value is None:
        return torch.full_like(b_idx, none_value)
    if isinstance(value, int):
        return torch.full_like(b_idx, value)
    return value.to(b_idx.device)


def emotion_si_loss(
    emo_logits: torch.Tensor,
    emo_targets: torch.Tensor,  # (N,) -100 = no label (SI corpus)
    si_logits: torch.Tensor,
    si_targets: torch.Tensor,  # (N,) -100 = unknown / group speaker
    si_weight: float,
    class_weights: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    zero = emo_logits.sum() * 0.0
    emo = (
        F.cross_entropy(emo_logits, emo_targets, weight=class_weights, ignore_index=-100, label_smoothing=label_smoothing)
        if (emo_targets >= 0).any()
        else zero
    )
    si = F.cross_entropy(si_logits, si_targets, ignore_index=-100) if si_weight > 0 and (si_targets >= 0).any() else zero
    return emo + si_weight * si, {"loss_emotion": emo.item(), "loss_si": si.item()}


class StreamKernel:
    """The streaming step's arithmetic (inference only, no dropout), on weights prepared once.

    Computes what `forward_states` + `score_windows` compute for the last `lookahead` + 1 columns
    of each window, and only what the emotion logits of those columns depend on:
      - the emotion-private backward GRU runs over the last L + 1 columns only (a target reads the
        backward states between it and the horizon); the SI-private and shared ones run over the
        whole window when the cross-attention reads them (its keys and values are the SI side of
        every column), else the shared one runs over the last L + 1 columns too;
      - the party embedding enters the emotion GRUs as a per-party table (embedding @ its input
        weights), so every branch's input projection is one matrix product over the vectors;
      - on the CPU the backward GRUs of all branches advance together, one batched matrix product
        per column (`nn.GRU` runs them one branch at a time); on CUDA they stay cuDNN calls;
      - the cross-attention projects its few queries instead of the window's keys and values:
        q . (Wk s + bk) = (Wk^T q) . s + const (the constant cancels in the softmax), and
        sum_j a_j (Wv s_j + bv) = Wv (sum_j a_j s_j) + bv;
      - no SI head (streaming emits emotions only).
    Equal to `score_windows` up to float rounding (tests: within 1e-5 on the shipped weights).
    """

    def __init__(self, model: "EmotionSIModel", bwd_impl: str | None = None):
        cfg = model.cfg
        self.cfg, self.emotion_head = cfg, model.emotion_head
        self.Q = cfg.lookahead + 1
        self.context = model.context is not None
        self.xattn = cfg.cross_attention
        if cfg.num_parties > 2**15:
            raise ValueError(f"num_parties {cfg.num_parties}: streaming states store party ids as int16")
        p0 = next(model.parameters())
        self.device = p0.device
        self.bwd_impl = bwd_impl or ("gru" if self.device.type == "cuda" else "loop")
        with torch.no_grad():
            if self.context:
                self._prepare_context(model)
            if self.xattn:
                self._prepare_attention(model)

    def _prepare_context(self, model: "EmotionSIModel") -> None:
        cfg, ctx = self.cfg, model.context
        D, H = model.encoder.dim, cfg.hidden
        self.H, self.ctx = H, ctx
        self.emo_br = (EMOTION, SHARED) if cfg.shared_private else (EMOTION,)
        self.si_br = (SI_PRIVATE, SHARED) if cfg.shared_private else (EMOTION,)
        full = list(self.si_br) if self.xattn else []
        short = [b for b in self.emo_br if b not in full]
        self.full, self.short = full, short  # backward branches over the whole window / the last L + 1

        def stack(grus, order):
            w_ih = torch.cat([grus[b].weight_ih_l0[:, :D] for b in order]).t().contiguous()  # (D, n*3H)
            b_ih = torch.cat([grus[b].bias_ih_l0 for b in order]).contiguous()
            w_hh = torch.stack([grus[b].weight_hh_l0.t() for b in order]).contiguous()  # (n, H, 3H)
            b_hh = torch.stack([grus[b].bias_hh_l0 for b in order]).unsqueeze(1).contiguous()  # (n, 1, 3H)
            return w_ih, b_ih, w_hh, b_hh

        # party embedding through the emotion branch's input weights: (P, 3H) per direction
        emb = ctx.party.weight
        self.party_fwd = (emb @ ctx.fwd[EMOTION].weight_ih_l0[:, D:].t()).contiguous()
        self.party_bwd = (emb @ ctx.bwd[EMOTION].weight_ih_l0[:, D:].t()).contiguous()
        self.fwd_w = stack(ctx.fwd, range(cfg.branches))
        order = full + short
        self.bwd_full_w = stack(ctx.bwd, full) if full else None
        self.bwd_short_w = stack(ctx.bwd, short) if short else None
        _, _, w_hh, b_hh = stack(ctx.bwd, order)  # full branches first: they go on alone past the targets
        self.bwd_hh = (w_hh, b_hh)

    def _prepare_attention(self, model: "EmotionSIModel") -> None:
        attn = model.attn
        if attn.bias_k is not None or attn.add_zero_attn:
            raise NotImplementedError("StreamKernel: attention with bias_k/add_zero_attn")
        A, nh = attn.embed_dim, attn.num_heads
        hd = A // nh
        if attn._qkv_same_embed_dim:
            w_q, w_k, w_v = attn.in_proj_weight.chunk(3)
        else:
            w_q, w_k, w_v = attn.q_proj_weight, attn.k_proj_weight, attn.v_proj_weight
        b = attn.in_proj_bias if attn.in_proj_bias is not None else w_q.new_zeros(3 * A)
        b_q, _b_k, b_v = b.chunk(3)  # the key bias cancels in the softmax
        scale = hd ** -0.5
        self.nh, self.A = nh, A
        # query Linear then the attention's (scaled) query projection: one product
        q_w, q_b = w_q * scale, b_q * scale
        self.q_w = (q_w @ model.query.weight).contiguous()  # (A, emo_dim)
        self.q_b = (q_w @ model.query.bias + q_b).contiguous()
        self.k_w = w_k.reshape(nh, hd, -1).contiguous()  # (nh, hd, kdim)
        self.v_wt = w_v.reshape(nh, hd, -1).transpose(1, 2).contiguous()  # (nh, kdim, hd)
        self.v_b = b_v.reshape(nh, 1, hd).contiguous()
        # the attention's output projection folded into the emotion head's first layer
        first = model.emotion_head[0]
        emo_dim = first.in_features - A
        w1e, w1a = first.weight[:, :emo_dim], first.weight[:, emo_dim:]
        self.head1_w = torch.cat([w1e, w1a @ attn.out_proj.weight], dim=1).contiguous()
        self.head1_b = (first.bias + w1a @ attn.out_proj.bias).contiguous()

    # ---- the recurrences ------------------------------------------------------------------
    @staticmethod
    def _gru_step(gi: torch.Tensor, h: torch.Tensor, w_hh: torch.Tensor, b_hh: torch.Tensor) -> torch.Tensor:
        """One GRU step for n branches at once: gi (n, B, 3H) input projections with their bias,
        h (n, B, H) -> (n, B, H). PyTorch's gate order and formula (r, z, n)."""
        H = h.shape[-1]
        gh = torch.baddbmm(b_hh, h, w_hh)  # (n, B, 3H)
        rz = torch.sigmoid(gi[..., : 2 * H] + gh[..., : 2 * H])
        n = torch.tanh(torch.addcmul(gi[..., 2 * H :], rz[..., :H], gh[..., 2 * H :]))
        return torch.lerp(n, h, rz[..., H:])  # (1 - z) n + z h

    def forward_step(self, u: torch.Tensor, parties: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
        """Forward GRU states (B, branches, H) of one new utterance per conversation: u (B, D),
        parties (B,), h0 (B, branches, H) the carried states."""
        B = u.shape[0]
        w_ih, b_ih, w_hh, b_hh = self.fwd_w
        gi = torch.addmm(b_ih, u, w_ih).view(B, -1, 3 * self.H)  # (B, br, 3H)
        gi[:, EMOTION] += self.party_fwd[parties]
        h = self._gru_step(gi.transpose(0, 1), h0.transpose(0, 1), w_hh, b_hh)  # (br, B, H)
        return h.transpose(0, 1)

    def _backward_loop(self, u_w: torch.Tensor, p_w: torch.Tensor) -> dict[int, torch.Tensor]:
        B, W, D = u_w.shape
        Q, H, nF = self.Q, self.H, len(self.full)
        gis = []
        if self.full:
            w_ih, b_ih, _, _ = self.bwd_full_w
            gi = torch.addmm(b_ih, u_w.reshape(B * W, D), w_ih).view(B, W, nF, 3 * H)
            if EMOTION in self.full:
                gi[:, :, self.full.index(EMOTION)] += self.party_bwd[p_w]
            gis.append(gi)
        if self.short:
            w_ih, b_ih, _, _ = self.bwd_short_w
            gs = torch.addmm(b_ih, u_w[:, W - Q :].reshape(B * Q, D), w_ih).view(B, Q, len(self.short), 3 * H)
            if EMOTION in self.short:
                gs[:, :, self.short.index(EMOTION)] += self.party_bwd[p_w[:, W - Q :]]
        w_hh, b_hh = self.bwd_hh
        h = u_w.new_zeros(w_hh.shape[0], B, H)
        hs: list[torch.Tensor] = [None] * W  # type: ignore[list-item]
        for col in range(W - 1, -1 if self.full else W - Q - 1, -1):  # from the horizon back
            if col >= W - Q:
                parts = ([gis[0][:, col]] if self.full else []) + ([gs[:, col - (W - Q)]] if self.short else [])
                g = parts[0] if len(parts) == 1 else torch.cat(parts, 1)
                h = self._gru_step(g.transpose(0, 1), h, w_hh, b_hh)
            else:  # past the targets only the full-window branches are needed
                if col == W - Q - 1:
                    h = h[:nF]
                    w_hh, b_hh = w_hh[:nF], b_hh[:nF]
                h = self._gru_step(gis[0][:, col].transpose(0, 1), h, w_hh, b_hh)
            hs[col] = h
        out = {}
        if self.full:
            full = torch.stack([x[:nF] for x in hs], 2)  # (nF, B, W, H)
            out.update({b: full[i] for i, b in enumerate(self.full)})
        if self.short:
            short = torch.stack([x[nF:] for x in hs[W - Q :]], 2)  # (nS, B, Q, H)
            out.update({b: short[i] for i, b in enumerate(self.short)})
        return out

    def _backward_gru(self, u_w: torch.Tensor, p_w: torch.Tensor) -> dict[int, torch.Tensor]:
        """The same with the model's nn.GRU modules (cuDNN on CUDA), one call per branch."""
        ctx, W, Q = self.ctx, u_w.shape[1], self.Q
        out = {}
        for b in self.full + self.short:
            cols = slice(0, W) if b in self.full else slice(W - Q, W)
            x = u_w[:, cols]
            if b == EMOTION:
                x = torch.cat([x, ctx.party(p_w[:, cols])], dim=-1)
            out[b] = ctx.bwd[b](x.flip(1))[0].flip(1)
        return out

    # ---- scoring ----------------------------------------------------------------------------
    def score(self, u_w: torch.Tensor, p_w: torch.Tensor, f_w: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Emotion logits (B, L + 1, E) of the last L + 1 columns of left-padded windows ending at
        their horizon: u_w (B, W, D), p_w (B, W), f_w (B, W, branches, H) forward states (the
        horizon's included), mask (B, W) True at real columns. Columns before a window's first
        real one give meaningless rows (the caller drops them)."""
        Q = self.Q
        if self.context:
            bwd = (self._backward_loop if self.bwd_impl == "loop" else self._backward_gru)(u_w, p_w)
            W = u_w.shape[1]

            def last(b):  # backward states of branch b at the last Q columns
                x = bwd[b]
                return x if x.shape[1] == Q else x[:, W - Q :]

            emo = torch.cat([x for b in self.emo_br for x in (f_w[:, W - Q :, b], last(b))], dim=-1)  # (B, Q, emo_dim)
            si = torch.cat([x for b in self.si_br for x in (f_w[:, :, b], bwd[b])], dim=-1) if self.xattn else None
        else:
            emo, si = u_w[:, u_w.shape[1] - Q :], u_w
        if not self.xattn:
            return self.emotion_head(emo)
        head = self.emotion_head  # Linear (out_proj folded in), GELU, Dropout (off), Linear
        h = F.linear(torch.cat([emo, self._attend(emo, si, mask)], dim=-1), self.head1_w, self.head1_b)
        return head[3](head[1](h))

    def _attend(self, emo: torch.Tensor, si: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """nn.MultiheadAttention(query(emo), si, si) with the projections moved to the query side,
        before its output projection (folded into the emotion head): (B, Q, A)."""
        B, Q, _ = emo.shape
        nh, A, kdim = self.nh, self.A, si.shape[-1]
        q = F.linear(emo, self.q_w, self.q_b)  # (B, Q, A), scaled
        qt = torch.bmm(q.reshape(B * Q, nh, A // nh).transpose(0, 1), self.k_w)  # (nh, BQ, kdim)
        qt = qt.view(nh, B, Q, kdim).permute(1, 2, 0, 3).reshape(B, Q * nh, kdim)
        bias = torch.zeros(mask.shape, dtype=si.dtype, device=si.device).masked_fill_(~mask, float("-inf")).unsqueeze(1)
        att = torch.softmax(torch.baddbmm(bias, qt, si.transpose(1, 2)), dim=-1)  # (B, Q*nh, W)
        c = torch.bmm(att, si).view(B * Q, nh, kdim).transpose(0, 1)  # (nh, BQ, kdim)
        o = torch.baddbmm(self.v_b, c, self.v_wt)  # (nh, BQ, hd)
        return o.transpose(0, 1).reshape(B, Q, A)


def stream_kernel(model: "EmotionSIModel") -> StreamKernel:
    """The model's StreamKernel, prepared on first use and again whenever its weights change: one
    of its modules replaced, a parameter moved (`.to()`) or updated in place (optimizer steps,
    `load_state_dict`: each parameter's version counter). A Parameter object swapped into one of
    those modules by hand is not noticed (the kernel's parameter list is taken when it is built,
    so a step costs ~37 pointer and counter reads here instead of a walk over the module tree)."""
    parts = (model.context, getattr(model, "query", None), getattr(model, "attn", None), model.emotion_head)
    cached = model.__dict__.get("_stream_kernel")
    if cached is not None:
        built_parts, params, key, kern = cached
        if all(a is b for a, b in zip(built_parts, parts)) and key == _weights_key(params):
            return kern
    params = [p for m in parts if m is not None for p in m.parameters()]
    kern = StreamKernel(model)
    model.__dict__["_stream_kernel"] = (parts, params, _weights_key(params), kern)
    return kern


def _weights_key(params: list[torch.Tensor]) -> tuple:
    return tuple((p.data_ptr(), p._version) for p in params)
