"""`emotion-monitor train` and `emotion-monitor evaluate` (the model side of the CLI)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from model.config import DEFAULT_MODEL

CONFIG_DIR = Path(__file__).parent / "configs"
# model.backends.BACKENDS, spelled out so that `--help` does not import torch (tested equal)
BACKENDS = ("auto", "eager", "compile", "tensorrt", "onnx", "onnx-int8")


def add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train the emotion + speaker-identification model",
        description="Train the multi-task model (emotion recognition + speaker identification on the Friends "
        "transcripts) and write an artifact folder: config.json, labels.json, model.safetensors, dev metrics, "
        "training curves and a dev confusion matrix. Uses CUDA when present.",
    )
    p.add_argument("--dataset", choices=["meld", "emorynlp", "jsonl"], required=True,
                   help="emotion dataset (its train split trains, its dev split selects); jsonl = your own labelled "
                   "conversations, one utterance per line (schema: model/schemas/labelled-utterance.schema.json), with --train/--dev")
    p.add_argument("--data-dir", type=Path, default=None, help="folder with meld/, emorynlp/, friends/ (default: $EMOTION_MONITOR_DATA_DIR or ../shared/data)")
    p.add_argument("--train", type=Path, default=None, help="training file (instead of the data dir's split; required for jsonl)")
    p.add_argument("--dev", type=Path, default=None, help="dev file that selects the epoch (instead of the data dir's split; required for jsonl)")
    p.add_argument("--out", type=Path, required=True, help="artifact folder to write")
    p.add_argument("--config", type=Path, default=None, help="recipe TOML (default: model/configs/<dataset>.toml)")
    p.add_argument("--seed", type=int, default=None, help="override the recipe's seed")
    p.add_argument("--epochs", type=int, default=None, help="override the recipe's number of epochs")
    p.add_argument("--teacher", action="append", default=[], type=Path, metavar="RUN_DIR",
                   help="distil from this trained artifact (repeatable: the teachers' mean probabilities); "
                   "distill_weight and distill_temperature are set with --set")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe or model field, e.g. --set si_weight=0 --set cross_attention=false (repeatable)")
    p.set_defaults(func=run_train)


def add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="score a trained model on a MELD CSV or EmoryNLP JSON file",
        description="Weighted-F1 over the emotion classes in three modes: offline (whole dialogue, as in the paper), "
        "final (streaming with the model's lookahead) and provisional (past context only); per-class F1 and a "
        "confusion-matrix PNG. With --json the last line printed is one JSON object.",
    )
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="artifact folder (default: model/weights/meld-mpnet, the default MELD model)")
    p.add_argument("--dataset", choices=["meld", "emorynlp", "jsonl"], required=True, help="format of --data")
    p.add_argument("--data", type=Path, required=True, help="a MELD CSV, an EmoryNLP JSON or a labelled JSONL file")
    p.add_argument("--plot", type=Path, default=None, help="confusion-matrix PNG to write (default: confusion_<file>.png here)")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.add_argument("--backend", choices=BACKENDS, default="eager",
                   help="encoder backend on the CPU (default eager: the model as trained, float32, chunks of 64); onnx "
                   "(float32) and onnx-int8 encode in chunks of 32 as the worker does (onnx-int8 needs the artifact's "
                   "calibration: `emotion-monitor calibrate`); auto scores with the encoder a worker serves on this "
                   "machine (on a CPU: onnx-int8 for an artifact that ships its calibration, as the MELD models do)")
    p.set_defaults(func=run_evaluate)


def add_calibrate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "calibrate",
        help="store the activation maxima the onnx-int8 backend needs (from the train split)",
        description="For the onnx-int8 encoder backend (SmoothQuant + int8, see docs/performance.md): run the artifact's "
        "encoder over --n random utterances of the dataset's TRAIN split (never dev or test) and write the maximum "
        "|activation| per input channel of each of its Linear layers to <model>/encoder_act_max.safetensors "
        "(float32, ~80 KB for MiniLM), with the SHA-256 of the artifact's model.safetensors. Run it once per "
        "artifact; the backend refuses an artifact without the file or whose weights changed since.",
    )
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="artifact folder (default: model/weights/meld-mpnet, the default MELD model)")
    p.add_argument("--dataset", choices=["meld", "emorynlp", "jsonl"], default=None,
                   help="dataset whose train split is read (default: the one named in the artifact's config.json)")
    p.add_argument("--data-dir", type=Path, default=None, help="folder with meld/, emorynlp/ (default: $EMOTION_MONITOR_DATA_DIR or ../shared/data)")
    p.add_argument("--train", type=Path, default=None, help="training file instead of the data dir's train split (required for jsonl)")
    p.add_argument("--n", type=int, default=1024, help="utterances drawn at random from the train split (default 1024)")
    p.add_argument("--seed", type=int, default=0, help="seed of that draw (default 0)")
    p.set_defaults(func=run_calibrate)


def run_calibrate(args: argparse.Namespace) -> int:
    import time

    from model.artifact import read_config
    from model.quantize import calibrate
    from model.training.data import default_data_dir, load_dataset, split_path

    if args.n < 1:
        raise SystemExit("--n must be at least 1")
    try:
        config = read_config(args.model)
    except (FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"calibrate: {exc}") from None
    dataset = args.dataset or config.get("meta", {}).get("dataset")
    if dataset is None:
        raise SystemExit(f"{args.model}/config.json names no dataset: pass --dataset")
    if args.train is not None:
        path = args.train
    elif dataset == "jsonl":
        raise SystemExit("--dataset jsonl needs --train FILE (your labelled training conversations)")
    else:
        path = split_path(args.data_dir or default_data_dir(), dataset, "train")
    if not path.exists():
        raise SystemExit(f"calibrate: {path} not found; pass --data-dir (or --train FILE); "
                         "`emotion-monitor data check --data-dir DIR` lists what is where")
    t0 = time.perf_counter()
    dialogues = load_dataset(dataset, path)
    n = min(args.n, sum(len(d.utterances) for d in dialogues))
    out = calibrate(args.model, dialogues, n=n, seed=args.seed, source=f"{dataset}:{path.name}")
    print(f"wrote {out} ({out.stat().st_size / 1e3:.0f} KB): activation maxima of {n} utterances of {path.name} "
          f"in {time.perf_counter() - t0:.1f} s")
    return 0


def add_soup(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "soup",
        help="average the weights of runs trained from the same initial weights into one artifact",
        description="A model soup: the mean of the weights of several `train` runs that share --seed (the same initial "
        "weights) and differ in data_seed (--set data_seed=N: batch order, truncation draws, dropout). The result is "
        "one artifact of the same size and speed as each run; it is scored on the dataset's dev split "
        "(dev_metrics.json, confusion matrix). With --compare each run and the ensemble of their probabilities (k "
        "times the encoder cost) are scored too, into soup_report.json.",
    )
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR", help="artifact folders written by `train` (two or more)")
    p.add_argument("--out", type=Path, required=True, help="artifact folder to write")
    p.add_argument("--dataset", choices=["meld", "emorynlp"], default=None, help="only for runs whose config.json names none")
    p.add_argument("--data-dir", type=Path, default=None, help="folder with the dev split (default: $EMOTION_MONITOR_DATA_DIR or ../shared/data)")
    p.add_argument("--data", type=Path, default=None, help="score on this file instead of the dev split")
    p.add_argument("--compare", action="store_true", help="also score each run and their probability ensemble")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.set_defaults(func=run_soup)


def add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="build the encoder ahead of time: a torch.export program, a TensorRT engine, or a warmed torch.compile",
        description="export: a torch.export program (.pt2) of the fine-tuned encoder with dynamic batch (1-256) and "
        "sequence (1-64) dimensions, loadable without the training code. tensorrt: a TensorRT module (float16, dynamic "
        "shapes; needs CUDA and `pip install 'emotion-monitor[tensorrt]'`). compile: runs torch.compile on typical shapes "
        "so its cache is warm (torch.compile has no portable file to save).",
    )
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="artifact folder (default: model/weights/meld-mpnet)")
    p.add_argument("--backend", choices=["export", "compile", "tensorrt"], default="export")
    p.add_argument("--out", type=Path, default=None, help="output file (default: <model>/encoder.<backend>.pt2)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    import time

    import torch

    from model.artifact import load_artifact
    from model.backends import (
        build_encoder,
        choose_backend,
        compile_tensorrt,
        export_encoder,
        resolve_device,
    )
    from model.encoders import load_tokenizer
    from model.encoding import tokenize

    device = resolve_device(args.device)
    model, _ = load_artifact(args.model, device)
    ids, mask = tokenize(load_tokenizer(model.cfg), ["An example utterance.", "Another, slightly longer example utterance here."],
                         model.cfg.max_tokens, device)
    out = args.out or Path(args.model) / f"encoder.{args.backend}.pt2"
    t0 = time.perf_counter()
    if args.backend == "export":
        export_encoder(model.encoder, out, (ids, mask))
        print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - t0:.1f} s")
        return 0
    if args.backend == "tensorrt":  # pragma: no cover - CUDA + torch-tensorrt only
        choose_backend("tensorrt", device)  # a clear error when it cannot work here
        import torch_tensorrt

        torch_tensorrt.save(compile_tensorrt(model.encoder, device), str(out), inputs=[ids, mask])
        print(f"wrote {out} in {time.perf_counter() - t0:.1f} s")
        return 0
    used, fn = build_encoder(model.encoder, "compile", device)
    with torch.inference_mode():
        for n in (1, 16, 64):  # typical batch sizes, so the first real batches hit a warm cache
            fn(ids.repeat(n, 1), mask.repeat(n, 1))
    print(f"compiled ({used}) in {time.perf_counter() - t0:.1f} s; the torch.compile cache is warm")
    return 0


def _parse_value(v: str):
    low = v.lower()
    if low in {"true", "false"}:
        return low == "true"
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def run_train(args: argparse.Namespace) -> int:
    import dataclasses

    from model.config import ModelConfig, TrainConfig
    from model.training.data import default_data_dir
    from model.training.trainer import Trainer

    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
    recipe, model = {}, {}
    for item in args.set:
        if "=" not in item:
            raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
        k, v = (x.strip() for x in item.split("=", 1))
        if k in train_fields:
            recipe[k] = _parse_value(v)
        elif k in model_fields:
            model[k] = _parse_value(v)
        else:
            raise SystemExit(f"--set {k}: not a field of the recipe or the model; see model/config.py")
    if (args.train is None) != (args.dev is None):
        raise SystemExit("--train and --dev go together")
    config = args.config or CONFIG_DIR / f"{args.dataset}.toml"
    recipe.update({k: v for k, v in (("seed", args.seed), ("epochs", args.epochs)) if v is not None})
    if args.teacher:
        for t in args.teacher:
            if not (t / "config.json").exists():
                raise SystemExit(f"--teacher {t}: not an artifact folder (no config.json); pass runs written by `train`")
        recipe["teachers"] = tuple(str(t) for t in args.teacher)
    cfg = TrainConfig.from_toml(config, model_overrides=model, **recipe)
    if cfg.dataset != args.dataset:
        raise SystemExit(f"{config} is a recipe for {cfg.dataset}, not {args.dataset}")
    data_dir = args.data_dir or (default_data_dir() if cfg.dataset != "jsonl" else None)
    try:
        trainer = Trainer(cfg, data_dir, args.out, train_file=args.train, dev_file=args.dev).setup()
    except (ValueError, FileNotFoundError) as exc:
        raise SystemExit(f"train: {exc}") from None
    result = trainer.train()
    dev = result["dev"]
    print(f"dev weighted-F1: offline {dev['weighted_f1_offline']:.2f}  final {dev['weighted_f1_final']:.2f}  "
          f"provisional {dev['weighted_f1_provisional']:.2f}  (best epoch {result['best_epoch']})")
    return 0


def run_soup(args: argparse.Namespace) -> int:
    from model.training.soup import run_soup as soup

    return soup(args)


def run_evaluate(args: argparse.Namespace) -> int:
    from model.artifact import load_artifact
    from model.encoders import load_tokenizer
    from model.offline import MODES
    from model.training.data import load_dataset
    from model.training.evaluate import evaluate, plot_confusion

    model, config = load_artifact(args.model)
    dialogues = load_dataset(args.dataset, args.data)
    tokenizer, encode, used = load_tokenizer(model.cfg), None, "eager"
    if args.backend != "eager":
        import torch

        from model.backends import ONNX_BACKENDS, BackendUnavailable, build_encoder
        from model.encoding import encode_texts
        from model.quantize import CalibrationError

        try:
            used, fn = build_encoder(model.encoder, args.backend, torch.device("cpu"), args.model)
        except (BackendUnavailable, CalibrationError) as exc:
            raise SystemExit(f"evaluate: {exc}") from None
        chunk = 32 if used in ONNX_BACKENDS else 64  # as the worker's Scorer encodes

        def encode(texts):
            return encode_texts(model, tokenizer, texts, chunk, fn)
    metrics, probs, gold = evaluate(model, tokenizer, dialogues, encode=encode)
    metrics["backend"] = used
    plot = args.plot or Path(f"confusion_{args.data.stem}.png")
    plot_confusion(gold, probs["final"].argmax(-1), model.cfg.emotion_labels, plot, f"{args.data.name}, final")
    metrics["model"] = f"{config['name']}@{config['version']}"
    metrics["confusion_png"] = str(plot)
    print(f"{metrics['n_utterances']} utterances, model {metrics['model']}, encoder backend {metrics['backend']}")
    for mode in MODES:
        per = "  ".join(f"{k} {v:.1f}" for k, v in metrics["per_class"][mode].items())
        print(f"  {mode:<12} weighted-F1 {metrics[f'weighted_f1_{mode}']:6.2f}   per class: {per}")
    print(f"confusion matrix (final): {plot}")
    if args.json:
        print(json.dumps(metrics))
    return 0


def add_data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "data",
        help="check the training data folder",
        description="`data check`: which of the expected dataset files are in --data-dir, their rows and SHA-256, "
        "and where the public datasets come from (their pages and licences). The project never ships them.",
    )
    p.add_argument("action", choices=["check"])
    p.add_argument("--data-dir", type=Path, default=None, help="folder with meld/, emorynlp/, friends/ (default: $EMOTION_MONITOR_DATA_DIR or ../shared/data)")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.set_defaults(func=run_data)


def run_data(args: argparse.Namespace) -> int:
    from model.training.data import check_data_dir, default_data_dir

    report = check_data_dir(args.data_dir or default_data_dir())
    print(f"data dir: {report['data_dir']}")
    for f in report["files"]:
        if f["present"]:
            print(f"  ok       {f['path']:<42} {f['rows']:>7} rows  sha256 {f['sha256'][:16]}...")
        else:
            print(f"  missing  {f['path']:<42} {f['dataset']}: get it from {f['source']} ({f['licence']})")
    missing = [f for f in report["files"] if not f["present"]]
    print(f"{len(report['files']) - len(missing)} of {len(report['files'])} files present; "
          + ("every dataset can be trained." if not missing else "train only what is complete, or fetch the rest (see above)."))
    if args.json:
        print(json.dumps(report))
    return 0 if not missing else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.cli")
    sub = parser.add_subparsers(dest="command", required=True)
    add_train(sub)
    add_evaluate(sub)
    add_data(sub)
    add_soup(sub)
    add_export(sub)
    add_calibrate(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
