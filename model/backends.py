"""Encoder backends: eager PyTorch, torch.compile, TensorRT, and ahead-of-time export.

The encoder (MiniLM, ~90% of the compute per utterance) is what a backend accelerates; the
GRUs and heads stay eager (tiny, and their shapes vary with the number of conversations).

| backend  | where          | what |
|----------|----------------|------|
| eager    | CPU or CUDA    | plain PyTorch (float32; CUDA: float16 autocast) |
| compile  | CPU or CUDA    | torch.compile with dynamic shapes; on CUDA float16 with CUDA graphs (mode "reduce-overhead") |
| tensorrt | CUDA + extra   | torch-tensorrt, dynamic batch and sequence, float16 (`pip install 'emotion-monitor[tensorrt]'`) |
| onnx     | CPU + extra    | ONNX Runtime, float32, exported at start-up (`pip install 'emotion-monitor[onnx]'`) |
| onnx-int8 | CPU + extra   | as onnx, then SmoothQuant + int8 (`model.quantize`; needs the artifact's stored calibration) |
| auto     | anywhere       | CUDA: tensorrt if installed, else compile; CPU: onnx-int8 for an artifact that ships a calibration of its weights, else onnx, if installed; else eager |

An artifact opts into int8 on the CPU by carrying `encoder_act_max.safetensors` (`emotion-monitor
calibrate`): ship it only with a model whose recipe kept its dev F1 within 0.2 in int8 over 3 seeds
(its model card says so); without the file, or with one of other weights, `auto` serves float onnx.

Why ONNX Runtime on CPU: eager PyTorch spends most of a small batch in per-operator overhead;
ONNX Runtime fuses the transformer's operators. Measured here (2 cores, this configuration,
`Scorer.encode`): 63 -> 168 utterances/s one at a time, 182 -> 231 in chunks of 8, 249 -> 197 in
chunks of 64 (so the Scorer encodes in chunks of at most 32); outputs equal within 1.3e-6.
"""

from __future__ import annotations

import importlib.util
import logging
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

log = logging.getLogger("emotion_monitor.backends")
BACKENDS = ("auto", "eager", "compile", "tensorrt", "onnx", "onnx-int8")
ONNX_BACKENDS = ("onnx", "onnx-int8")  # encoded in chunks of at most 32 (model.scorer)
MAX_BATCH, MAX_TOKENS = 256, 64

EncodeFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (ids, mask) -> (N, D)


class BackendUnavailable(RuntimeError):
    pass


def resolve_device(device: str = "auto") -> torch.device:
    """The one device rule: "auto" = CUDA when torch sees one, else the CPU; an explicit CUDA device
    on a machine without one is an error that says what to use instead."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} asked for, but torch sees no CUDA device; use 'cpu' or 'auto'")
    return torch.device(device)


def tensorrt_available() -> bool:
    return importlib.util.find_spec("torch_tensorrt") is not None


def onnxruntime_available() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("onnxruntime", "onnxscript"))


def choose_backend(requested: str, device: torch.device, artifact: str | Path | None = None) -> str:
    """The backend that serves `requested` on `device`; `artifact` (the model's folder) lets `auto`
    pick onnx-int8 on the CPU when the artifact ships a calibration of its own weights."""
    if requested not in BACKENDS:
        raise ValueError(f"unknown backend {requested!r}: use one of {', '.join(BACKENDS)}")
    if requested == "auto":
        if device.type == "cuda":
            return "tensorrt" if tensorrt_available() else "compile"
        if not onnxruntime_available():
            return "eager"
        from model.quantize import ships_calibration

        return "onnx-int8" if artifact is not None and ships_calibration(artifact) else "onnx"
    if requested in ONNX_BACKENDS:
        if not onnxruntime_available():
            raise BackendUnavailable(f"backend {requested!r} asked for, but ONNX Runtime is not installed: run "
                                     "`pip install 'emotion-monitor[onnx]'`, or use --backend eager")
        if device.type != "cpu":
            raise BackendUnavailable(f"backend {requested!r} runs on the CPU; on CUDA use compile or tensorrt")
    if requested == "tensorrt":
        if not tensorrt_available():
            raise BackendUnavailable(
                "backend 'tensorrt' asked for, but torch-tensorrt is not installed: on a CUDA host run "
                "`pip install 'emotion-monitor[tensorrt]'`, or use --backend compile / eager")
        if device.type != "cuda":
            raise BackendUnavailable("backend 'tensorrt' needs a CUDA device; use eager or compile on CPU")
    return requested


def build_encoder(encoder: torch.nn.Module, backend: str, device: torch.device,
                  artifact: str | Path | None = None) -> tuple[str, EncodeFn]:
    """Returns (backend actually used, encode function). `artifact`: the folder the encoder was
    loaded from, where `onnx-int8` reads its calibration (`model.quantize`)."""
    chosen = choose_backend(backend, device, artifact)
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
    if chosen == "onnx":
        return chosen, onnx_runtime_encoder(encoder)
    if chosen == "onnx-int8":
        from model.quantize import int8_encoder_graph, load_act_max

        if artifact is None:
            raise BackendUnavailable("backend 'onnx-int8' reads its calibration from the artifact folder; "
                                     "load the model from its folder (Scorer(path, backend=...))")
        act_max = load_act_max(artifact, encoder)  # before the export: a missing file fails at once
        proto = export_onnx(encoder)
        int8 = int8_encoder_graph(proto, encoder, act_max)
        if int8 is None:  # warned: the graph did not map onto the encoder
            return "onnx", ort_encoder(proto)
        log.info("encoder backend onnx-int8: SmoothQuant + int8 graph built")
        return chosen, ort_encoder(int8)
    trt = compile_tensorrt(encoder, device)
    return chosen, lambda ids, mask: trt(ids, mask).float()


def onnx_runtime_encoder(encoder: torch.nn.Module) -> EncodeFn:
    """Export the encoder to ONNX in memory (dynamic batch 1-256, sequence 1-64) and serve it with
    ONNX Runtime on the CPU, with as many threads as torch uses."""
    return ort_encoder(export_onnx(encoder))


def export_onnx(encoder: torch.nn.Module):
    """The encoder as an ONNX ModelProto (dynamic batch 1-256, sequence 1-64), in memory."""
    from torch.export import Dim

    batch, seq = Dim("batch", min=1, max=MAX_BATCH), Dim("seq", min=1, max=MAX_TOKENS)
    example = (torch.ones(2, 8, dtype=torch.long), torch.ones(2, 8, dtype=torch.long))
    # The exporter reports on every optional operator library it does not find (torchvision)
    # and on internals: noise in a worker's log, kept out of it.
    onnx_log = logging.getLogger("torch.onnx")
    level = onnx_log.level
    onnx_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(encoder.eval(), example, dynamo=True, verbose=False,
                                        dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq}))
    finally:
        onnx_log.setLevel(level)
    return program.model_proto


def ort_encoder(proto) -> EncodeFn:
    """An ONNX Runtime session of the encoder graph `proto` on the CPU, with as many threads as torch uses."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    # Threads that spin between operators take the cores from the broker and Redis beside the
    # worker (as OMP_WAIT_POLICY=ACTIVE did: 103 instead of ~160 utt/s): let them sleep.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]

    def run(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = session.run(None, {names[0]: ids.cpu().numpy(), names[1]: mask.cpu().numpy()})[0]
        return torch.from_numpy(out)

    return run


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
