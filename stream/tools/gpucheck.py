"""GPU check: backend equivalence against eager float32, and throughput for batch sizes 1-256.

    python -m stream.tools.gpucheck [--model DIR] [--json]

Prints a table (backend x batch size -> encoder ms per batch and utterances/s, then the whole
model path a worker batch takes: tokenise + encode + one streaming step of B conversations) and
the largest absolute difference of each backend's utterance vectors and emotion probabilities
from eager float32. TensorRT rows appear where
torch-tensorrt is installed; elsewhere they are skipped with a message.

Then the step path with the encoder stubbed out (`stream/tools/pathbench.py`: state decode, window
assembly, GRU/attention step, events and alert rules, state encode, on precomputed random
utterance vectors) for batches of 64 and 256 conversations: `path_utt_per_s_b64`,
`path_utt_per_s_b256`, and `path_vs_encoder_b256` = that rate over the encoder's own rate at
batch 256 (compile, else the fastest backend measured). Issue 15's target: >= 0.5.
Each row is printed as soon as it is measured (stderr), so a run cut short still says something.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from model.artifact import load_artifact
from model.backends import BackendUnavailable, build_encoder, tensorrt_available
from model.config import DEFAULT_MODEL
from model.encoders import load_tokenizer
from model.encoding import encode_texts, tokenize
from model.streaming import DialogueState, step

BATCHES = (1, 8, 32, 64, 128, 256)
TEXTS = ["I have been on hold for forty minutes and nobody can tell me anything.", "Thanks, that fixed it!",
         "Okay.", "Could you please check whether the refund went through yesterday?"]


PATH_BATCHES = (64, 256)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


def timed(fn, ids, mask, repeats: int = 20) -> float:
    with torch.inference_mode():
        for _ in range(3):
            fn(ids, mask)
        _sync(ids.device)
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn(ids, mask)
        _sync(ids.device)
    return (time.perf_counter() - t0) / repeats


def first_probs(model, vecs: torch.Tensor):
    """Emotion probabilities of each vector as the opening utterance of its own conversation."""
    _, scored = step(model, [DialogueState()] * len(vecs), vecs.float().cpu().numpy(), ["customer"] * len(vecs))
    return np.stack([s[0].probs for s in scored])


def timed_path(model, tok, fn, texts: list[str], repeats: int = 10) -> float:
    """Seconds for tokenise + encode + step of len(texts) fresh conversations (what a worker batch costs)."""
    def once():
        vecs = encode_texts(model, tok, texts, 256, fn)
        step(model, [DialogueState()] * len(texts), vecs, ["customer"] * len(texts))
    dev = _device_of(model)
    with torch.inference_mode():
        once()
        _sync(dev)
        t0 = time.perf_counter()
        for _ in range(repeats):
            once()
        _sync(dev)
    return (time.perf_counter() - t0) / repeats


def stubbed_path(model, batches=PATH_BATCHES, seconds: float = 2.0, model_id: str = "gpucheck@0") -> dict[int, dict]:
    """The worker's step path with the encoder stubbed out, on the model's device (CPU or CUDA):
    per batch size {utt_per_s, ms_per_batch, stages_ms}. The shipped alert rules are on when they
    fit the model's labels (as in the worker), off otherwise."""
    from stream.core.rules import check_labels, load_rules
    from stream.tools.pathbench import path_rate

    labels = model.cfg.emotion_labels
    try:
        rules = load_rules(None, labels)
        check_labels(rules, labels)
    except ValueError:
        rules = ()
    out = {}
    for b in batches:
        r = path_rate(model, b, labels=labels, model_id=model_id, rules=rules, seconds=seconds)
        out[b] = {"utt_per_s": round(r.utt_per_s, 1), "ms_per_batch": round(r.ms_per_batch, 3),
                  "stages_ms": {k: round(v, 3) for k, v in r.stages_ms.items()}}
    return out


def path_vs_encoder(path: dict[int, dict], rows: list[dict], batch: int = 256) -> tuple[float | None, str | None]:
    """(stubbed path rate / encoder rate at `batch`, the backend compared with): compile when it was
    measured, else the fastest encoder at that batch."""
    enc = {r["backend"]: r["utt_per_s"] for r in rows if r["batch"] == batch}
    if batch not in path or not enc:
        return None, None
    name = "compile" if "compile" in enc else max(enc, key=enc.get)
    return round(path[batch]["utt_per_s"] / enc[name], 4), name


def _note(msg: str) -> None:
    print(f"gpucheck: {msg}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m stream.tools.gpucheck", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    p.add_argument("--json", action="store_true")
    p.add_argument("--path-seconds", type=float, default=2.0, help="seconds per stubbed-path batch size (default 2)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpucheck: no CUDA device; nothing to check", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    model, _ = load_artifact(args.model, dev)
    tok = load_tokenizer(model.cfg)
    enc = model.encoder.eval()
    backends = ["eager", "compile"] + (["tensorrt"] if tensorrt_available() else [])
    if not tensorrt_available():
        print("gpucheck: torch-tensorrt not installed here: tensorrt rows skipped (pip install 'emotion-monitor[tensorrt]')")
    ids, mask = tokenize(tok, TEXTS * 64, model.cfg.max_tokens, dev)
    with torch.inference_mode():
        ref = enc(ids[:64], mask[:64]).float()  # eager float32 reference
    rows, diffs, prob_diffs = [], {}, {}
    for name in backends:
        try:
            used, fn = build_encoder(enc, name, dev)
        except BackendUnavailable as exc:
            print(f"gpucheck: {name}: {exc}")
            continue
        with torch.inference_mode():
            out = fn(ids[:64], mask[:64]).float()
            diffs[used] = float((out - ref).abs().max())
            prob_diffs[used] = float(abs(first_probs(model, out) - first_probs(model, ref)).max())
        for b in BATCHES:
            sec = timed(fn, ids[:b], mask[:b])
            path = timed_path(model, tok, fn, (TEXTS * 64)[:b])
            rows.append({"backend": used, "batch": b, "ms_per_batch": round(sec * 1000, 3), "utt_per_s": round(b / sec, 1),
                         "path_ms_per_batch": round(path * 1000, 3), "path_utt_per_s": round(b / path, 1)})
            _note(f"{used} batch {b}: encoder {sec * 1000:.3f} ms ({b / sec:.0f} utt/s), path {path * 1000:.3f} ms")
    _note("step path with the encoder stubbed out")
    stub = stubbed_path(model, PATH_BATCHES, args.path_seconds)
    ratio, versus = path_vs_encoder(stub, rows, 256)
    print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    print("max |backend - eager fp32| over 64 utterance vectors: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    print("max |backend - eager fp32| over their emotion probabilities: " + ", ".join(f"{k} {v:.2e}" for k, v in prob_diffs.items()))
    print(f"{'backend':<10}{'batch':>6}{'enc ms':>10}{'enc utt/s':>12}{'path ms':>10}{'path utt/s':>12}")
    for r in rows:
        print(f"{r['backend']:<10}{r['batch']:>6}{r['ms_per_batch']:>10.3f}{r['utt_per_s']:>12.1f}"
              f"{r['path_ms_per_batch']:>10.3f}{r['path_utt_per_s']:>12.1f}")
    print("step path, encoder stubbed (state decode, window assembly, GRU/attention step, events, state encode):")
    for b, r in stub.items():
        print(f"  path_utt_per_s_b{b} {r['utt_per_s']:.1f}  ({r['ms_per_batch']:.2f} ms per batch; ms: "
              + ", ".join(f"{k} {v:.2f}" for k, v in r["stages_ms"].items()) + ")")
    if ratio is not None:
        print(f"  path_vs_encoder_b256 {ratio:.3f}  (over the {versus} encoder at batch 256; target >= 0.5)")
    if args.json:
        print(json.dumps({"device": torch.cuda.get_device_name(0), "max_abs_diff": diffs, "max_prob_diff": prob_diffs, "rows": rows,
                          "path_utt_per_s_b64": stub.get(64, {}).get("utt_per_s"),
                          "path_utt_per_s_b256": stub.get(256, {}).get("utt_per_s"),
                          "path_vs_encoder_b256": ratio, "path_vs_encoder_backend": versus, "path_stages_ms": stub}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
