"""Weight averaging of runs that started from the same weights (a "model soup", Wortsman et al. 2022).

Runs trained with the same `seed` (same initial weights: the packaged encoder and the same
random heads) but different `data_seed` (batch order, truncation draws, dropout) stay close
enough in weight space that their average is itself a good model. It is one artifact of the
same size and speed as each run, where an ensemble of the runs would multiply the encoder's
cost per utterance, which is what the streaming side pays for. Measured on MELD (model card,
fourth search): a soup of six scores like the mean of its runs, not like their ensemble.

    emotion-monitor soup --out DIR RUN_DIR RUN_DIR [...] [--compare]
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from model.artifact import read_config, save_artifact
from model.offline import MODES


def _init_seed(config: dict[str, Any]) -> int | None:
    return (config.get("meta") or {}).get("train_config", {}).get("seed")


def average_weights(paths: Sequence[str | Path]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config.json of the first run, the float32 mean of the runs' stored weights).

    Refuses runs whose network or initial weights differ: their average is not a model."""
    if len(paths) < 2:
        raise ValueError("a soup needs at least two runs")
    configs = [read_config(p) for p in paths]
    first = configs[0]
    for p, c in zip(paths[1:], configs[1:]):
        if c["model"] != first["model"]:
            raise ValueError(f"{p}: its network (config.json 'model') differs from {paths[0]}'s; only runs of one recipe can be averaged")
        if _init_seed(c) != _init_seed(first):
            raise ValueError(
                f"{p}: trained from seed {_init_seed(c)}, {paths[0]} from seed {_init_seed(first)}; runs must share `seed` "
                "(the initial weights) and differ only in `data_seed`"
            )
    total: dict[str, torch.Tensor] = {}
    for p in paths:
        state = load_file(str(Path(p) / "model.safetensors"))
        if total and state.keys() != total.keys():
            raise ValueError(f"{p}: its weights hold other tensors than {paths[0]}'s")
        for k, v in state.items():
            if not v.is_floating_point():
                total.setdefault(k, v)  # integer buffers (position ids) are the same in every run
                continue
            total[k] = total[k] + v.float() if k in total else v.float()
    n = len(paths)
    return first, {k: (v / n if v.is_floating_point() else v) for k, v in total.items()}


def make_soup(paths: Sequence[str | Path], out_dir: str | Path) -> Path:
    """Write the averaged artifact (stored as float16, like every artifact) to out_dir."""
    from model.config import ModelConfig
    from model.encoders import build_model

    config, state = average_weights(paths)
    cfg = ModelConfig.from_dict(config["model"])
    model = build_model(cfg, pretrained=False)
    model.load_state_dict(state, strict=False)  # the frozen encoder part comes from the package
    meta = dict(config.get("meta") or {})
    meta.pop("best_epoch", None)
    train_config = dict(meta.get("train_config") or {})
    train_config.pop("data_seed", None)
    meta["train_config"] = train_config
    metas = [read_config(p).get("meta") or {} for p in paths]
    meta["soup_of"] = [
        {"run": Path(p).name, "data_seed": m.get("train_config", {}).get("data_seed"), "best_epoch": m.get("best_epoch")}
        for p, m in zip(paths, metas)
    ]
    return save_artifact(model, out_dir, name=config["name"], version=config["version"], meta=meta)


def ensemble_probs(per_run: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Mean of the runs' probabilities per mode: what the soup is compared with."""
    return {m: np.mean([p[m] for p in per_run], axis=0) for m in per_run[0]}


def run_soup(args) -> int:
    from model.artifact import load_artifact
    from model.backends import resolve_device
    from model.encoders import load_tokenizer
    from model.training.data import default_data_dir, load_dataset, split_path
    from model.training.evaluate import evaluate, metrics_from_probs, plot_confusion

    runs = [Path(r) for r in args.runs]
    out = make_soup(runs, args.out)
    config = read_config(out)
    dataset = config["meta"].get("dataset") or args.dataset
    if dataset is None:
        raise SystemExit("the runs' config.json names no dataset: pass --dataset meld|emorynlp")
    dev_file = args.data or split_path(args.data_dir or default_data_dir(), dataset, "dev")
    dialogues = load_dataset(dataset, dev_file)
    device = resolve_device("auto")
    model, _ = load_artifact(out, device)
    tokenizer = load_tokenizer(model.cfg)
    metrics, probs, gold = evaluate(model, tokenizer, dialogues)
    (out / "dev_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    plot_confusion(gold, probs["final"].argmax(-1), model.cfg.emotion_labels, out / "confusion_dev_final.png",
                   f"{dataset} dev, final (L={model.cfg.lookahead}), soup of {len(runs)}")
    report: dict[str, Any] = {"soup": _scores(metrics), "runs": {}}
    if args.compare:
        per_run = []
        for r in runs:
            m, p, _ = evaluate(load_artifact(r, device)[0], tokenizer, dialogues)
            report["runs"][r.name] = _scores(m)
            per_run.append(p)
        report["ensemble"] = _scores(metrics_from_probs(gold, ensemble_probs(per_run), model.cfg.emotion_labels))
        report["runs_mean"] = {k: round(float(np.mean([v[k] for v in report["runs"].values()])), 2) for k in report["soup"]}
        (out / "soup_report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"soup of {len(runs)} runs -> {out}")
    rows = [("soup", report["soup"])]
    if args.compare:
        rows += [(name, s) for name, s in report["runs"].items()] + [("runs, mean", report["runs_mean"]), ("ensemble (k x cost)", report["ensemble"])]
    for name, s in rows:
        print(f"  {name:<24} weighted-F1 offline {s['offline']:6.2f}  final {s['final']:6.2f}  provisional {s['provisional']:6.2f}")
    if args.json:
        print(json.dumps(report))
    return 0


def _scores(metrics: dict[str, Any]) -> dict[str, float]:
    return {m: metrics[f"weighted_f1_{m}"] for m in MODES}
