"""The trained artifact: a folder with config.json, labels.json, model.safetensors, MODEL_CARD.md.

Only what differs from the packaged base encoder is stored (the fine-tuned top layers and the
heads, in float16 to fit two models in the 50 MB budget; with `int8=True` the fine-tuned encoder
matrices are stored as int8 with a float16 scale per row, for an MPNet artifact to fit one artifact's
50 MB); loading rebuilds the network from
config.json alone, takes the rest of the encoder from the base encoder named in config.json
(`model.encoders`: minilm or mpnet, from their PyPI packages) and computes in float32.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from model.config import ModelConfig
from model.encoders import build_model
from model.modeling import EmotionSIModel

FORMAT = "emotion-monitor-artifact/1"


SCALE = ".int8_scale"  # suffix of the per-row scale stored beside an int8 matrix


def stored_state(model: EmotionSIModel, int8: bool = False) -> dict[str, torch.Tensor]:
    """Parameters that differ from the packaged base: everything but the frozen encoder part.
    int8: the encoder's trained matrices as symmetric int8 per row (scale = max |row| / 127, float16)."""
    tiny = model.cfg.tiny_encoder is not None
    out = {}
    for name, t in model.state_dict().items():
        if name.startswith("encoder.bert.") and not tiny:
            if not model.encoder.is_trainable(name[len("encoder.bert.") :]):
                continue
        t = t.detach().to("cpu")
        if int8 and name.startswith("encoder.") and t.is_floating_point() and t.dim() == 2:
            scale = (t.float().abs().amax(dim=1, keepdim=True) / 127.0).clamp_min(1e-12).to(torch.float16)
            out[name] = torch.round(t.float() / scale.float()).clamp(-127, 127).to(torch.int8).contiguous()
            out[name + SCALE] = scale.contiguous()
        else:
            out[name] = t.to(torch.float16 if t.is_floating_point() else t.dtype).contiguous()
    return out


def _dequantized(stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Undo `stored_state(int8=True)`: int8 rows times their scale, as float32."""
    out = {k: v for k, v in stored.items() if not k.endswith(SCALE)}
    for key, scale in stored.items():
        if key.endswith(SCALE):
            base = key[: -len(SCALE)]
            out[base] = stored[base].float() * scale.float()
    return out


def save_artifact(model: EmotionSIModel, out_dir: str | Path, name: str, version: str, meta: dict[str, Any] | None = None,
                  int8: bool = False) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = {"format": FORMAT, "name": name, "version": version, "model": model.cfg.to_dict(), "meta": meta or {}}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    labels = {"emotion": list(model.cfg.emotion_labels), "speaker": list(model.cfg.speaker_labels)}
    (out / "labels.json").write_text(json.dumps(labels, indent=2) + "\n")
    save_file(stored_state(model, int8), str(out / "model.safetensors"), metadata={"format": FORMAT})
    return out


def read_config(path: str | Path) -> dict[str, Any]:
    p = Path(path) / "config.json"
    if not p.exists():
        raise FileNotFoundError(f"{p} not found: --model must be a folder written by `emotion-monitor train`.")
    config = json.loads(p.read_text())
    if config.get("format") != FORMAT:
        raise ValueError(f"{p}: unknown artifact format {config.get('format')!r} (expected {FORMAT})")
    return config


def load_artifact(path: str | Path, device: str | torch.device = "cpu") -> tuple[EmotionSIModel, dict[str, Any]]:
    """Rebuild the model from the artifact alone; returns (model in eval mode, config.json)."""
    config = read_config(path)
    cfg = ModelConfig.from_dict(config["model"])
    model = build_model(cfg, pretrained=True)
    stored = _dequantized(load_file(str(Path(path) / "model.safetensors")))
    expected = stored_state(model).keys()
    missing, unexpected = set(expected) - set(stored), set(stored) - set(expected)
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match config.json (missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})")
    model.load_state_dict(stored, strict=False)  # the rest of the encoder comes from the package
    return model.to(device).float().eval(), config
