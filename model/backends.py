"""Encoder backends: eager PyTorch, torch.compile, TensorRT, and ahead-of-time export.

The encoder (MiniLM, ~90% of the compute per utterance) is what a backend accelerates; the
GRUs and heads stay eager (tiny, and their shapes vary with the number of conversations).

| backend  | where          | what |
|----------|----------------|------|
| eager    | CPU or CUDA    | plain PyTorch (float32; CUDA: float16 autocast) |
| compile  | CPU or CUDA    | torch.compile with dynamic shapes; on CUDA float16 with CUDA graphs (mode "reduce-overhead") |
| tensorrt | CUDA + extra   | torch-tensorrt, dynamic batch and sequence, float16 (`pip install 'emotion-monitor[tensorrt]'`) |
| auto     | anywhere       | tensorrt if installed and on CUDA, else compile on CUDA, else eager |
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable
from pathlib import Path

import torch

log = logging.getLogger("emotion_monitor.backends")
BACKENDS = ("auto", "eager", "compile", "tensorrt")
MAX_BATCH, MAX_TOKENS = 256, 64

EncodeFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (ids, mask) -> (N, D)


class BackendUnavailable(RuntimeError):
    pass


def tensorrt_available() -> bool:
    return importlib.util.find_spec("torch_tensorrt") is not None


def choose_backend(requested: str, device: torch.device) -> str:
    if requested not in BACKENDS:
        raise ValueError(f"unknown backend {requested!r}: use one of {', '.join(BACKENDS)}")
    if requested == "auto":
        if device.type == "cuda" and tensorrt_available():
            return "tensorrt"
        return "compile" if device.type == "cuda" else "eager"
    if requested == "tensorrt":
        if not tensorrt_available():
            raise BackendUnavailable(
                "backend 'tensorrt' asked for, but torch-tensorrt is not installed: on a CUDA host run "
                "`pip install 'emotion-monitor[tensorrt]'`, or use --backend compile / eager")
        if device.type != "cuda":
            raise BackendUnavailable("backend 'tensorrt' needs a CUDA device; use eager or compile on CPU")
    return requested


def build_encoder(encoder: torch.nn.Module, backend: str, device: torch.device) -> tuple[str, EncodeFn]:
    """Returns (backend actually used, encode function)."""
    chosen = choose_backend(backend, device)
    log.info("encoder backend: %s (asked: %s, device: %s)", chosen, backend, device)
    if chosen == "eager":
        if device.type == "cuda":
            def eager_fp16(ids, mask):
                with torch.autocast("cuda", dtype=torch.float16):
                    return encoder(ids, mask).float()
            return chosen, eager_fp16
        return chosen, encoder
    if chosen == "compile":
        if device.type != "cuda":
            return chosen, torch.compile(encoder, dynamic=True)

        # float16 like eager on CUDA, and CUDA graphs ("reduce-overhead") to remove the per-kernel
        # launch cost that dominates small batches. `.float()` copies the output out of the graph's
        # static buffer, which the next call overwrites.
        def fp16(ids, mask):
            with torch.autocast("cuda", dtype=torch.float16):
                return encoder(ids, mask)

        compiled = torch.compile(fp16, dynamic=True, mode="reduce-overhead")
        return chosen, lambda ids, mask: compiled(ids, mask).float()
    trt = compile_tensorrt(encoder, device)
    return chosen, lambda ids, mask: trt(ids, mask).float()


def compile_tensorrt(encoder: torch.nn.Module, device: torch.device):  # pragma: no cover - CUDA + torch-tensorrt only
    """A TensorRT module (float16, dynamic batch 1-256 and sequence 1-64)."""
    import torch_tensorrt

    inputs = [
        torch_tensorrt.Input(min_shape=(1, 1), opt_shape=(64, 24), max_shape=(MAX_BATCH, MAX_TOKENS), dtype=torch.int64),
        torch_tensorrt.Input(min_shape=(1, 1), opt_shape=(64, 24), max_shape=(MAX_BATCH, MAX_TOKENS), dtype=torch.int64),
    ]
    return torch_tensorrt.compile(encoder.eval().to(device), ir="dynamo", inputs=inputs, enabled_precisions={torch.float16})


def export_encoder(encoder: torch.nn.Module, path: str | Path, example: tuple[torch.Tensor, torch.Tensor]) -> Path:
    """torch.export program with dynamic batch and sequence length, saved as .pt2."""
    from torch.export import Dim

    batch, seq = Dim("batch", min=1, max=MAX_BATCH), Dim("seq", min=1, max=MAX_TOKENS)
    program = torch.export.export(encoder.eval(), example, dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq}))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, str(path))
    return path


def load_exported(path: str | Path) -> EncodeFn:
    return torch.export.load(str(path)).module()
