"""GPU check: backend equivalence against eager float32, and throughput for batch sizes 1-256.

    python -m model.gpucheck [--model DIR] [--json]

Prints a table (backend x batch size -> encoder ms per batch and utterances/s, then the whole
model path a worker batch takes: tokenise + encode + one streaming step of B conversations) and
the largest absolute difference of each backend's utterance vectors and emotion probabilities
from eager float32. TensorRT rows appear where
torch-tensorrt is installed; elsewhere they are skipped with a message.
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
from model.inference import encode_texts, tokenize
from model.encoders import load_tokenizer
from model.streaming import DialogueState, step

BATCHES = (1, 8, 32, 64, 128, 256)
TEXTS = ["I have been on hold for forty minutes and nobody can tell me anything.", "Thanks, that fixed it!",
         "Okay.", "Could you please check whether the refund went through yesterday?"]


def timed(fn, ids, mask, repeats: int = 20) -> float:
    with torch.inference_mode():
        for _ in range(3):
            fn(ids, mask)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn(ids, mask)
        torch.cuda.synchronize()
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
    with torch.inference_mode():
        once()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(repeats):
            once()
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m model.gpucheck", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=Path(__file__).parent / "weights" / "meld")
    p.add_argument("--json", action="store_true")
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
    print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    print("max |backend - eager fp32| over 64 utterance vectors: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    print("max |backend - eager fp32| over their emotion probabilities: " + ", ".join(f"{k} {v:.2e}" for k, v in prob_diffs.items()))
    print(f"{'backend':<10}{'batch':>6}{'enc ms':>10}{'enc utt/s':>12}{'path ms':>10}{'path utt/s':>12}")
    for r in rows:
        print(f"{r['backend']:<10}{r['batch']:>6}{r['ms_per_batch']:>10.3f}{r['utt_per_s']:>12.1f}"
              f"{r['path_ms_per_batch']:>10.3f}{r['path_utt_per_s']:>12.1f}")
    if args.json:
        print(json.dumps({"device": torch.cuda.get_device_name(0), "max_abs_diff": diffs, "max_prob_diff": prob_diffs, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
