"""Training recipe: `Trainer(cfg, data_dir, out_dir)` with setup(), train(), evaluate().

One step = a batch of emotion dialogues (MELD or EmoryNLP, with their own speakers as SI
labels) plus a batch of Friends scene chunks (SI labels only), encoded in one encoder call.
Each target utterance sees a random slice of its future (right-truncation), so the same
weights serve provisional, final and offline scoring.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.artifact import save_artifact, stored_state
from model.backends import resolve_device
from model.config import ModelConfig, TrainConfig
from model.encoders import build_model, load_tokenizer
from model.encoding import encode_bucketed
from model.modeling import emotion_si_loss
from model.offline import MODES, pad_dialogues
from model.training import data as D
from model.training.distill import distillation_loss, teacher_probs
from model.training.evaluate import evaluate, plot_confusion

# 0.2.0: base encoder recorded in the config, text normalised on the encoder's input path.
MODEL_VERSION = "0.2.0"


def artifact_name(dataset: str, base_encoder: str) -> str:
    """The model id's name part: the dataset, and the base when it is not the original minilm
    (events and stored states carry name@version, so two bases must never share one)."""
    return f"emotion-si-{dataset}" if base_encoder == "minilm" else f"emotion-si-{dataset}-{base_encoder}"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Trainer:
    def __init__(self, cfg: TrainConfig, data_dir: str | Path | None, out_dir: str | Path | None, quiet: bool = False,
                 train_file: str | Path | None = None, dev_file: str | Path | None = None):
        """`data_dir` holds meld/, emorynlp/, friends/; `train_file`/`dev_file` replace its splits
        (required for dataset "jsonl", your own labelled conversations)."""
        self.cfg = cfg
        self.data_dir = Path(data_dir) if data_dir is not None else None
        self.train_file, self.dev_file = train_file, dev_file
        self.out_dir = Path(out_dir) if out_dir else None
        self.quiet = quiet
        self.device = resolve_device("auto")
        self.history: list[dict[str, Any]] = []
        # Length-sorted encoder chunks: small ones cut padding on CPU; a GPU wants big ones.
        self.encode_batch = 256 if self.device.type == "cuda" else 32

    # ------------------------------------------------------------------------------
    def setup(self) -> "Trainer":
        cfg = self.cfg
        seed_everything(cfg.seed)
        self._setup_data()
        self.model_cfg = ModelConfig.from_dict({"emotion_labels": self.labels, "speaker_labels": self.speaker_labels, **cfg.model_overrides})
        self._setup_si_corpus()
        self.label_index = {n.lower(): i for i, n in enumerate(self.labels)}
        self.speaker_index = {n: i for i, n in enumerate(self.speaker_labels)}
        self.tokenizer = load_tokenizer(self.model_cfg)
        self.model = build_model(self.model_cfg).to(self.device)
        if cfg.data_seed is not None:
            seed_everything(cfg.data_seed)  # the initial weights above depend on `seed` alone
        enc = [p for n, p in self.model.named_parameters() if n.startswith("encoder.") and p.requires_grad]
        rest = [p for n, p in self.model.named_parameters() if not n.startswith("encoder.") and p.requires_grad]
        groups = [{"params": rest, "lr": cfg.head_lr}]
        if enc:
            groups.append({"params": enc, "lr": cfg.encoder_lr})
        self.optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
        self.steps_per_epoch = math.ceil(len(self.train_set) / cfg.batch_dialogues)
        total = max(1, self.steps_per_epoch * cfg.epochs)
        warm = max(1, int(total * cfg.warmup_fraction))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min((s + 1) / warm, max(0.0, (total - s) / max(1, total - warm)))
        )
        self._setup_cache()
        self.ema = WeightEMA(self.model, cfg.ema_decay) if cfg.ema_decay > 0 else None
        self.class_weights = None
        if cfg.class_weighting:
            counts = np.bincount([self.label_index[u.emotion.lower()] for d in self.train_set for u in d.utterances], minlength=len(self.labels))
            w = (counts.sum() / np.maximum(counts, 1)) ** 0.5
            self.class_weights = torch.tensor(w / w.mean(), dtype=torch.float32, device=self.device)
        self.teacher: dict[int, torch.Tensor] | None = None
        if cfg.teachers:
            from rich.progress import Progress

            with Progress(disable=self.quiet) as bar:
                task = bar.add_task(f"teachers score the training set ({len(self.train_set)} dialogues each)", total=len(cfg.teachers))

                def done(teachers: int) -> None:
                    bar.update(task, completed=teachers)

                probs = teacher_probs(cfg.teachers, self.train_set, self.model_cfg.lookahead,
                                      self.model_cfg.window, cfg.distill_temperature, self.device, progress=done)
            self.teacher = {id(d): torch.as_tensor(p, device=self.device) for d, p in zip(self.train_set, probs)}
        self._log(
            f"train: {len(self.train_set)} dialogues, dev: {len(self.dev_set)}, SI chunks: {len(self.si_set)}, "
            f"device: {self.device}, trainable params: {sum(p.numel() for p in self.model.parameters() if p.requires_grad):,}"
        )
        return self

    def _setup_data(self) -> None:
        cfg = self.cfg
        if cfg.dataset == "jsonl" and not (self.train_file and self.dev_file):
            raise ValueError("dataset jsonl (your own conversations) needs --train FILE and --dev FILE")
        if self.data_dir is None and not (self.train_file and self.dev_file):
            raise ValueError(f"dataset {cfg.dataset} needs --data-dir (a folder with meld/, emorynlp/, friends/)")
        train = self.train_file or D.split_path(self.data_dir, cfg.dataset, "train")
        dev = self.dev_file or D.split_path(self.data_dir, cfg.dataset, "dev")
        self.train_set = D.load_dataset(cfg.dataset, train)
        self.dev_set = D.load_dataset(cfg.dataset, dev)
        if cfg.max_train_dialogues:
            self.train_set = self.train_set[: cfg.max_train_dialogues]
        self.labels = D.LABELS.get(cfg.dataset) or D.labels_of(self.train_set)
        known = {lab.lower() for lab in self.labels}
        for name, ds in (("train", self.train_set), ("dev", self.dev_set)):
            bad = [u.emotion for d in ds for u in d.utterances if u.emotion is None or u.emotion.lower() not in known]
            if bad:
                raise D.DatasetError(f"{name} data: {len(bad)} utterance(s) without a label the model knows ({sorted(set(map(str, bad)))[:5]}); "
                                     f"labels: {list(self.labels)}")
        self.speaker_labels, self.speaker_class = D.speaker_classes(cfg.dataset, self.train_set)

    def _setup_si_corpus(self) -> None:
        """Friends scene chunks for the auxiliary SI task (their speakers are Friends' SI classes)."""
        cfg = self.cfg
        self.si_set: list[D.Dialogue] = []
        if cfg.si_weight <= 0 or cfg.si_ratio <= 0:
            return
        if cfg.dataset not in ("meld", "emorynlp"):
            raise ValueError(f"si_ratio = {cfg.si_ratio}: the Friends SI corpus names Friends characters, not the speakers "
                             f"of dataset {cfg.dataset}; set si_ratio = 0 (SI then learns from your data's own speakers)")
        if self.data_dir is None:
            raise ValueError("si_ratio > 0 needs --data-dir with friends/friends_transcripts.jsonl (or set si_ratio = 0)")
        dev_texts = [u.text for d in self.dev_set for u in d.utterances]
        scenes = D.load_friends(self.data_dir / D.FRIENDS_FILE, exclude_texts=dev_texts)
        if cfg.max_si_scenes:
            scenes = scenes[: cfg.max_si_scenes]
        self.si_set = D.chunk(scenes, cfg.si_chunk)

    def _setup_cache(self) -> None:
        """The frozen lower layers' hidden states for every text of train, dev and the SI pool (cache_hidden)."""
        self.cache = None
        if not self.cfg.cache_hidden:
            return
        from rich.progress import Progress

        from model.training.hidden_cache import build_cache, cache_path

        texts = [u.text for ds in (self.train_set, self.dev_set, self.si_set) for d in ds for u in d.utterances]
        path = cache_path(self.model, texts, self.model_cfg.max_tokens)
        verb = "loading" if path.exists() else "computing"
        with Progress(disable=self.quiet) as bar:
            task = bar.add_task(f"{verb} the frozen layers' hidden states ({len(set(texts)):,} texts)", total=len(set(texts)))
            self.cache = build_cache(self.model, self.tokenizer, texts, 64, path,
                                     progress=lambda done, total: bar.update(task, completed=done))
        self._log(f"hidden-state cache: {path} ({self.cache.states.numel() * 2 / 1e9:.2f} GB)")

    # ------------------------------------------------------------------------------
    def _targets(self, dialogues: list[D.Dialogue], with_emotion: bool) -> tuple[list[int], list[int]]:
        emo, si = [], []
        for d in dialogues:
            for u in d.utterances:
                emo.append(self.label_index[u.emotion.lower()] if with_emotion else -100)
                cls = self.speaker_class(u.speaker)
                si.append(self.speaker_index[cls] if cls is not None else -100)
        return emo, si

    def _truncation(self, n: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        """Per-target lookahead (0..L, or -1 = whole dialogue), window (W, or -1 = unbounded), and the
        choice index (0..L + 1) that names the teacher's matching view (model.distill.views)."""
        L, W = self.model_cfg.lookahead, self.model_cfg.window
        probs = np.asarray(self.cfg.truncation_probs, dtype=np.float64)
        if len(probs) != L + 2:
            raise ValueError(f"truncation_probs needs L + 2 = {L + 2} values (lookahead 0..{L}, whole dialogue)")
        choice = np.random.choice(L + 2, size=n, p=probs / probs.sum())
        la = np.where(choice == L + 1, -1, choice)
        win = np.where(choice == L + 1, -1, W)
        return torch.as_tensor(la, device=self.device), torch.as_tensor(win, device=self.device), choice

    def train_step(self, emo_batch: list[D.Dialogue], si_batch: list[D.Dialogue]) -> dict[str, float]:
        model, cfg = self.model, self.cfg
        model.train()
        dialogues = emo_batch + si_batch
        e1, s1 = self._targets(emo_batch, True)
        e2, s2 = self._targets(si_batch, False)
        emo_t = torch.tensor(e1 + e2, device=self.device)
        si_t = torch.tensor(s1 + s2, device=self.device)
        texts = [u.text for d in dialogues for u in d.utterances]
        # bf16 for the transformer on CUDA only; the GRUs and heads stay in float32.
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            if self.cache is not None:
                vecs = self.cache.encode(model, texts, self.encode_batch)
            else:
                vecs = encode_bucketed(model, self.tokenizer, texts, self.encode_batch)
        u, parties, lengths = pad_dialogues(vecs.float(), dialogues, self.model_cfg.num_parties)
        la, win, choice = self._truncation(len(texts))
        emo_logits, si_logits = model.score_dialogues(u, parties, lengths, la, win)
        loss, parts = emotion_si_loss(
            emo_logits.float(), emo_t, si_logits.float(), si_t, cfg.si_weight, self.class_weights, cfg.label_smoothing
        )
        if self.teacher is not None and emo_batch:
            # Targets come in dialogue order, the emotion dialogues first; each is matched with the
            # teachers' view of the same truncation.
            n = len(e1)
            target = torch.cat([self.teacher[id(d)] for d in emo_batch])[torch.arange(n), torch.as_tensor(choice[:n])]
            kd = distillation_loss(emo_logits[:n].float(), target, cfg.distill_temperature)
            loss = loss + cfg.distill_weight * kd
            parts["loss_distill"] = kd.item()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update()
        return {"loss": loss.item(), **parts}

    def _si_batches(self, emo_batches: list[list[D.Dialogue]]) -> list[list[D.Dialogue]]:
        """SI chunks for each step: about si_ratio x the step's emotion utterances."""
        if not self.si_set:
            return [[] for _ in emo_batches]
        pool = list(self.si_set)
        random.shuffle(pool)
        out, k = [], 0
        for b in emo_batches:
            want, got = self.cfg.si_ratio * sum(len(d) for d in b), []
            while sum(len(d) for d in got) < want:
                if k == len(pool):
                    random.shuffle(pool)
                    k = 0
                got.append(pool[k])
                k += 1
            out.append(got)
        return out

    def train(self) -> dict[str, Any]:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        cfg = self.cfg
        best, best_state = -1.0, None
        t0 = time.time()
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"))
        with Progress(*columns, disable=self.quiet) as progress:
            for epoch in range(1, cfg.epochs + 1):
                order = list(self.train_set)
                random.shuffle(order)
                emo_batches = [order[i : i + cfg.batch_dialogues] for i in range(0, len(order), cfg.batch_dialogues)]
                si_batches = self._si_batches(emo_batches)
                task = progress.add_task(f"epoch {epoch}/{cfg.epochs}", total=len(emo_batches), info="")
                losses = []
                for eb, sb in zip(emo_batches, si_batches):
                    stats = self.train_step(eb, sb)
                    losses.append(stats)
                    progress.update(task, advance=1, info=f"loss {np.mean([s['loss'] for s in losses[-50:]]):.3f}")
                if self.ema is not None:
                    with self.ema.swapped_in():
                        metrics = self.evaluate()
                        candidate = stored_state(self.model)
                else:
                    metrics = self.evaluate()
                    candidate = None
                record = {
                    "epoch": epoch,
                    "seconds": round(time.time() - t0, 1),
                    "train_loss": float(np.mean([s["loss"] for s in losses])),
                    "train_loss_emotion": float(np.mean([s["loss_emotion"] for s in losses])),
                    "train_loss_si": float(np.mean([s["loss_si"] for s in losses])),
                    **({"train_loss_distill": float(np.mean([s["loss_distill"] for s in losses if "loss_distill" in s]))}
                       if self.teacher is not None else {}),
                    **{k: v for k, v in metrics.items() if k.startswith(("weighted", "macro"))},
                }
                score = (metrics["weighted_f1_final"] + metrics["weighted_f1_provisional"]) / 2
                record["selection_score"] = round(score, 2)
                self.history.append(record)
                self._log(
                    f"epoch {epoch}: loss {record['train_loss']:.3f}  dev weighted-F1 offline {metrics['weighted_f1_offline']:.2f} "
                    f"final {metrics['weighted_f1_final']:.2f} provisional {metrics['weighted_f1_provisional']:.2f}"
                )
                if score > best:
                    best, best_state = score, copy.deepcopy(candidate if candidate is not None else stored_state(self.model))
                    self.best_epoch = epoch
        if best_state is not None:
            self.model.load_state_dict(best_state, strict=False)
        return self.finish()

    def evaluate(self, through_cache: bool = True) -> dict[str, Any]:
        encode = self.cache.encode_fn(self.model) if (self.cache is not None and through_cache) else None
        metrics, self._dev_probs, self._dev_gold = evaluate(self.model, self.tokenizer, self.dev_set, encode=encode)
        return metrics

    # ------------------------------------------------------------------------------
    def finish(self) -> dict[str, Any]:
        """Score the selected weights on dev (as stored: float16) and write the artifact."""
        result: dict[str, Any] = {"best_epoch": getattr(self, "best_epoch", None), "history": self.history}
        if self.out_dir is None:
            result["dev"] = self.evaluate(through_cache=False)
            return result
        meta = {
            "dataset": self.cfg.dataset,
            "train_config": {k: v for k, v in vars(self.cfg).items()},
            "best_epoch": result["best_epoch"],
            "device": str(self.device),
        }
        path = save_artifact(self.model, self.out_dir, name=artifact_name(self.cfg.dataset, self.model_cfg.base_encoder), version=MODEL_VERSION, meta=meta,
                             int8=self.cfg.int8_weights)
        # Reload exactly what ships, so the reported dev numbers are those of the artifact.
        from model.artifact import load_artifact

        self.model, _ = load_artifact(path, self.device)
        dev = self.evaluate(through_cache=False)  # the whole encoder, as a served model computes it
        result["dev"] = dev
        (path / "dev_metrics.json").write_text(json.dumps(dev, indent=2) + "\n")
        (path / "training_history.json").write_text(json.dumps(self.history, indent=2) + "\n")
        plot_training_curves(self.history, path / "training_curves.png")
        plot_confusion(self._dev_gold, self._dev_probs["final"].argmax(-1), self.model_cfg.emotion_labels,
                       path / "confusion_dev_final.png", f"{self.cfg.dataset} dev, final (L={self.model_cfg.lookahead})")
        self._log(f"wrote {path}")
        return result

    def _log(self, msg: str) -> None:
        if not self.quiet:
            print(msg, flush=True)


class WeightEMA:
    """Shadow copy of the trainable parameters, s <- d*s + (1-d)*p after every optimizer step.

    The decay ramps up as (1+t)/(10+t) so early steps are not dominated by the initial weights.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay, self.steps = decay, 0
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        self.steps += 1
        d = min(self.decay, (1 + self.steps) / (10 + self.steps))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1.0 - d)

    @contextlib.contextmanager
    def swapped_in(self):
        """The averaged weights in the model for the duration (evaluation, saving), then the raw ones back."""
        backup = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, s in zip(self.params, self.shadow):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, b in zip(self.params, backup):
                    p.copy_(b)


def plot_training_curves(history: list[dict[str, Any]], path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(ep, [h["train_loss_emotion"] for h in history], "o-", label="emotion")
    a.plot(ep, [h["train_loss_si"] for h in history], "o-", label="speaker id")
    a.set_xlabel("epoch")
    a.set_ylabel("training loss")
    a.legend()
    for mode in MODES:
        b.plot(ep, [h[f"weighted_f1_{mode}"] for h in history], "o-", label=mode)
    b.set_xlabel("epoch")
    b.set_ylabel("dev weighted-F1 (%)")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
