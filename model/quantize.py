"""The int8 encoder of the `onnx-int8` backend, and the calibration it reads from the artifact.

The recipe (docs/performance.md, "int8 that does not depend on the batch"), applied to the float
graph that `model.backends.export_onnx` exports:

1. SmoothQuant (Xiao et al. 2023), alpha 0.85, on the query/key/value projections (one group: they
   read the same input), the FFN input and the FFN output: per input channel j, x_j / s_j (one Mul
   inserted in front of the group) and W_j,: * s_j, with s_j = max|x_j|^a / max|W_j,:|^(1-a), clipped
   to [1e-2, 1e2]. Exact in float; it moves MiniLM's activation outlier channels (LayerNorm outputs
   ~15x the median channel) into the weights, which are quantised per channel.
2. Every weight MatMul x @ W in int8 (`MatMulInteger`): W per output column (symmetric, stored in
   the graph), x per row, i.e. per token, with the row's own minimum and maximum (asymmetric, 8
   bits, computed by the graph at run time). y = s_x (x_q @ W_q - z_x * colsum(W_q)) s_W.

Why one scale per row: ONNX Runtime's dynamic quantisation (`quantize_dynamic`) picks one activation
scale per call, over every token of every utterance in the batch, so an utterance's vector depended
on which utterances shared its batch (up to 0.12 in a vector coordinate, on every utterance):
the live worker, which batches whatever arrives, then scored differently from `evaluate` and from
itself under other traffic. With a scale per token, a token's arithmetic is the same in any batch
(vectors equal to float32 rounding; tested), so streaming equals offline in int8 as in float.

Step 1 needs the maximum |x| per input channel of every Linear layer of the encoder, over training
text. They are computed once per artifact (`emotion-monitor calibrate`, from the train split) and
stored beside the weights as `encoder_act_max.safetensors` with the SHA-256 of the artifact's
`model.safetensors`, so a retrained artifact never uses stale maxima.

The graph's weight MatMuls are matched to the encoder's Linear modules in order and each weight
is checked to equal `module.weight.T`; if the graph is not as expected, the float graph is served
and a warning logged.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from model.encoders import file_sha256

log = logging.getLogger("emotion_monitor.quantize")

ACT_MAX_FILE = "encoder_act_max.safetensors"
FORMAT = "emotion-monitor-act-max/1"
ALPHA = 0.85
# Position of each Linear within a transformer layer (BERT and MPNet register them in this order).
ROLES = ("q", "k", "v", "o", "f1", "f2")
SMOOTHED = (("q", "k", "v"), ("f1",), ("f2",))  # groups that share one input


class CalibrationError(RuntimeError):
    """The artifact's stored activation maxima are missing or do not belong to its weights."""


def calibrate_command(artifact: str | Path) -> str:
    return f"emotion-monitor calibrate --model {artifact} --data-dir DIR"


def linear_modules(encoder: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """The encoder transformer's Linear layers by name (relative to `encoder.bert`), in module order."""
    return {name: m for name, m in encoder.bert.named_modules() if isinstance(m, torch.nn.Linear)}


def calibration_texts(dialogues, n: int = 1024, seed: int = 0) -> list[str]:
    """`n` utterance texts drawn at random (fixed seed) from the given (training) dialogues."""
    texts = [u.text for d in dialogues for u in d.utterances]
    random.Random(seed).shuffle(texts)
    return texts[:n]


@torch.inference_mode()
def activation_maxima(model, tokenizer, texts: Sequence[str], batch_size: int = 32) -> dict[str, torch.Tensor]:
    """max |x| per input channel of every Linear of the encoder over `texts` (eager, float32), encoded
    the way the scorer encodes them (normalised, length-sorted groups of `batch_size`)."""
    from model.encoding import encode_texts

    if not texts:
        raise ValueError("calibration needs at least one text")
    stats: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(module, inputs):
            x = inputs[0].detach().abs().reshape(-1, inputs[0].shape[-1]).amax(0).float().cpu()
            stats[name] = torch.maximum(stats[name], x) if name in stats else x
        return record

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in linear_modules(model.encoder).items()]
    try:
        encode_texts(model, tokenizer, list(texts), batch_size, model.encode)
    finally:
        for h in handles:
            h.remove()
    return stats


def weights_sha256(artifact: str | Path) -> str:
    return file_sha256(Path(artifact) / "model.safetensors")


def calibrate(artifact: str | Path, dialogues, n: int = 1024, seed: int = 0, source: str = "",
              out: str | Path | None = None) -> Path:
    """Compute the activation maxima of the artifact's encoder on `n` random utterances of
    `dialogues` (the training split) and write them to `<artifact>/encoder_act_max.safetensors`."""
    from safetensors.torch import save_file

    from model.artifact import load_artifact
    from model.encoders import load_tokenizer

    model, config = load_artifact(artifact)
    texts = calibration_texts(dialogues, n, seed)
    stats = activation_maxima(model, load_tokenizer(model.cfg), texts)
    meta = {"format": FORMAT, "model_sha256": weights_sha256(artifact), "model": f"{config['name']}@{config['version']}",
            "n_texts": str(len(texts)), "seed": str(seed), "source": source}
    path = Path(out) if out is not None else Path(artifact) / ACT_MAX_FILE
    save_file({k: v.contiguous() for k, v in stats.items()}, str(path), metadata=meta)
    log.info("wrote %s: %d layers, %d texts", path, len(stats), len(texts))
    return path


def ships_calibration(artifact: str | Path) -> bool:
    """Whether `artifact` carries activation maxima of its own weights: what makes backend `auto`
    choose onnx-int8 on the CPU. A stale file (weights changed since) is warned about and ignored."""
    if not (Path(artifact) / ACT_MAX_FILE).exists():
        return False
    try:
        load_act_max(artifact)
    except CalibrationError as exc:
        log.warning("backend auto serves the float encoder: %s", exc)
        return False
    return True


def load_act_max(artifact: str | Path, encoder: torch.nn.Module | None = None) -> dict[str, np.ndarray]:
    """The stored maxima of `artifact`, checked against its weights (and `encoder`'s Linear layers)."""
    from safetensors import safe_open

    path = Path(artifact) / ACT_MAX_FILE
    if not path.exists():
        raise CalibrationError(
            f"backend 'onnx-int8' needs the encoder's activation maxima ({path}), which this artifact lacks: run "
            f"`{calibrate_command(artifact)}` once (it reads the train split), or use the float backend 'onnx'")
    with safe_open(str(path), framework="np") as fh:
        meta = fh.metadata() or {}
        stats = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (a safetensors file, not a dict)
    if meta.get("format") != FORMAT:
        raise CalibrationError(f"{path}: unknown format {meta.get('format')!r} (expected {FORMAT}); "
                               f"run `{calibrate_command(artifact)}` again")
    if meta.get("model_sha256") != weights_sha256(artifact):
        raise CalibrationError(f"{path} was computed for other weights than {Path(artifact) / 'model.safetensors'}; "
                               f"run `{calibrate_command(artifact)}` again")
    if encoder is not None:
        want = {name: m.in_features for name, m in linear_modules(encoder).items()}
        got = {name: int(v.shape[-1]) for name, v in stats.items()}
        if want != got:
            raise CalibrationError(f"{path} does not match this artifact's encoder; run `{calibrate_command(artifact)}` again")
    return stats


def _weight_matmul_plan(proto, encoder: torch.nn.Module) -> list[dict] | None:
    """One entry per Linear (layer, role, module name, MatMul node) when the graph's weight MatMuls
    are the encoder's Linear layers in order, each weight equal to `module.weight.T`; else None."""
    from onnx import numpy_helper

    inits = {i.name: i for i in proto.graph.initializer}
    matmuls = [(i, nd) for i, nd in enumerate(proto.graph.node) if nd.op_type == "MatMul" and nd.input[1] in inits]
    modules = list(linear_modules(encoder).items())
    layers = encoder.bert.encoder.layer
    per_layer = [[n for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)] for layer in layers]
    if any(len(names) != len(ROLES) for names in per_layer) or len(modules) != len(ROLES) * len(layers):
        log.warning("onnx-int8: the encoder's layers are not 6 Linear layers each; serving the float graph")
        return None
    if len(matmuls) != len(modules):
        log.warning("onnx-int8: the exported graph has %d weight MatMuls for %d Linear layers; serving the float graph",
                    len(matmuls), len(modules))
        return None
    plan = []
    for i, ((name, module), (index, node)) in enumerate(zip(modules, matmuls)):
        w = numpy_helper.to_array(inits[node.input[1]])
        ref = module.weight.detach().float().cpu().numpy().T
        if w.shape != ref.shape or not np.allclose(w, ref, atol=1e-6):
            log.warning("onnx-int8: weight MatMul %d of the graph is not %s; serving the float graph", i, name)
            return None
        plan.append({"layer": i // len(ROLES), "role": ROLES[i % len(ROLES)], "module": name, "index": index, "node": node})
    for layer in range(len(layers)):
        qkv = [p["node"].input[0] for p in plan if p["layer"] == layer and p["role"] in ("q", "k", "v")]
        if len(set(qkv)) != 1:
            log.warning("onnx-int8: the q, k, v projections of layer %d do not share one input; serving the float graph", layer)
            return None
    return plan


def _smooth(proto, plan: list[dict], act_max: dict[str, np.ndarray], alpha: float) -> None:
    """SmoothQuant in place: a Mul by 1/s in front of each group, the group's weight rows times s."""
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in proto.graph.initializer}
    inserts = []  # (first MatMul of the group, Mul node)
    for layer in sorted({p["layer"] for p in plan}):
        for roles in SMOOTHED:
            group = [p for p in plan if p["layer"] == layer and p["role"] in roles]
            x = group[0]["node"].input[0]
            amax = np.maximum(np.max([act_max[p["module"]] for p in group], axis=0), 1e-5)
            weights = [numpy_helper.to_array(inits[p["node"].input[1]]) for p in group]
            wmax = np.maximum(np.max([np.abs(w).max(1) for w in weights], axis=0), 1e-5)
            s = np.clip(amax ** alpha / wmax ** (1 - alpha), 1e-2, 1e2).astype(np.float32)
            tag = f"{layer}_{roles[0]}"
            proto.graph.initializer.append(numpy_helper.from_array((1.0 / s).astype(np.float32), f"smoothquant_inv_{tag}"))
            smoothed = f"{x}_smoothquant_{tag}"
            inserts.append((group[0]["node"], helper.make_node("Mul", [x, f"smoothquant_inv_{tag}"], [smoothed],
                                                               name=f"smoothquant_mul_{tag}")))
            for p, w in zip(group, weights):
                inits[p["node"].input[1]].CopyFrom(numpy_helper.from_array((w * s[:, None]).astype(np.float32), p["node"].input[1]))
                p["node"].input[0] = smoothed
    nodes = list(proto.graph.node)
    for first, mul in inserts:  # right before the group's first MatMul: keeps the topological order
        nodes.insert(nodes.index(first), mul)
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)


def smoothed_graph(proto, encoder: torch.nn.Module, act_max: dict[str, np.ndarray], alpha: float = ALPHA):
    """SmoothQuant applied to a copy of the float graph `proto` (still float32, equal to it up to
    rounding), with the plan of its weight MatMuls; None when the graph does not map onto `encoder`."""
    import onnx

    plan = _weight_matmul_plan(proto, encoder)
    if plan is None:
        return None
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    plan = [dict(p, node=model.graph.node[p["index"]]) for p in plan]  # the copy's nodes
    _smooth(model, plan, act_max, alpha)
    return model, plan


def int8_encoder_graph(proto, encoder: torch.nn.Module, act_max: dict[str, np.ndarray], alpha: float = ALPHA):
    """The int8 graph (SmoothQuant, then every weight MatMul in int8 with per-row activation scales)
    of the float encoder graph `proto` (left unchanged), or None when the graph does not map onto `encoder`."""
    smoothed = smoothed_graph(proto, encoder, act_max, alpha)
    if smoothed is None:
        return None
    model, plan = smoothed
    _row_int8(model, plan)
    return model


def _row_int8(model, plan: list[dict]) -> None:
    """In place: each planned MatMul x @ W becomes integer arithmetic, x quantised per row to uint8
    with its own scale and zero point (one group of nodes per distinct x: q, k and v share theirs),
    W per output column to int8; the output keeps the MatMul's name, so the bias Add that reads it
    is unchanged."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    consts = {"rowq_axes": np.array([-1], dtype=np.int64), "rowq_zero": np.array(0.0, dtype=np.float32),
              "rowq_255": np.array(255.0, dtype=np.float32), "rowq_inv255": np.array(1.0 / 255, dtype=np.float32),
              "rowq_eps": np.array(1e-12, dtype=np.float32)}
    graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in consts.items())
    planned = {p["node"].name for p in plan}
    quantised: dict[str, tuple[str, str, str]] = {}  # x -> (x_q, scale, zero point), each (rows, 1)
    nodes = []

    def op(kind: str, inputs: list[str], out: str, **attrs) -> str:
        nodes.append(helper.make_node(kind, inputs, [out], name=out, **attrs))
        return out

    for node in list(graph.node):
        if node.name not in planned:
            nodes.append(node)
            continue
        x = node.input[0]
        if x not in quantised:
            t = f"rowq{len(quantised)}"
            # the row's range always includes 0, so that 0 (padding, ReLU-like zeros) is exact
            hi = op("Max", [op("ReduceMax", [x, "rowq_axes"], f"{t}_max", keepdims=1), "rowq_zero"], f"{t}_hi")
            lo = op("Min", [op("ReduceMin", [x, "rowq_axes"], f"{t}_min", keepdims=1), "rowq_zero"], f"{t}_lo")
            scale = op("Max", [op("Mul", [op("Sub", [hi, lo], f"{t}_range"), "rowq_inv255"], f"{t}_s"), "rowq_eps"], f"{t}_scale")
            inv = op("Reciprocal", [scale], f"{t}_inv")
            zero = op("Round", [op("Neg", [op("Mul", [lo, inv], f"{t}_lo_q")], f"{t}_zp_f")], f"{t}_zp")
            q = op("Round", [op("Mul", [x, inv], f"{t}_x_s")], f"{t}_x_r")
            q = op("Clip", [op("Add", [q, zero], f"{t}_x_z"), "rowq_zero", "rowq_255"], f"{t}_x_c")
            quantised[x] = (op("Cast", [q], f"{t}_x_q", to=TensorProto.UINT8), scale, zero)
        x_q, scale, zero = quantised[x]
        w = numpy_helper.to_array(inits[node.input[1]])
        w_scale = (np.maximum(np.abs(w).max(0), 1e-12) / 127.0).astype(np.float32)
        w_q = np.clip(np.round(w / w_scale), -127, 127).astype(np.int8)
        name = node.name
        graph.initializer.extend([numpy_helper.from_array(w_q, f"{name}_w_q"), numpy_helper.from_array(w_scale, f"{name}_w_scale"),
                                  numpy_helper.from_array(w_q.sum(0, dtype=np.int64).astype(np.float32), f"{name}_w_colsum")])
        acc = op("Cast", [op("MatMulInteger", [x_q, f"{name}_w_q"], f"{name}_i32")], f"{name}_acc", to=TensorProto.FLOAT)
        acc = op("Sub", [acc, op("Mul", [zero, f"{name}_w_colsum"], f"{name}_zp_corr")], f"{name}_acc0")
        nodes.append(helper.make_node("Mul", [op("Mul", [acc, f"{name}_w_scale"], f"{name}_y_w"), scale], [node.output[0]],
                                      name=f"{name}_y"))
    del graph.node[:]
    graph.node.extend(nodes)
    used = {i for nd in graph.node for i in nd.input}
    keep = [i for i in graph.initializer if i.name in used]  # the float weights go
    del graph.initializer[:]
    graph.initializer.extend(keep)
