"""A checkpoint cut to its first k layers: what vLLM loads as the shallow encoder."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

# Files a truncated checkpoint needs besides weights and config (whichever the source has).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja",
)

_LAYER_KEY = re.compile(r"(?:^|\.)layers?\.(\d+)\.")  # decoders: layers.N. ; BERT: encoder.layer.N.


def write_truncated_checkpoint(model_path: str | Path, k: int, out_dir: str | Path) -> Path:
    """Write a checkpoint of the first k layers (+ embeddings, + final norm) with its tokenizer.

    Tensors keep their names (e.g. `model.` prefixes) and the config its architecture, with
    num_hidden_layers=k; layers >= k and any `lm_head` are dropped. AutoModel and vLLM load the
    result; for decoders vLLM's pooled output is then final_norm(h_k), as the encoder computes.
    `out_dir` acts as a cache: if it exists it is returned as is, and it appears atomically
    (written beside it, then renamed), so concurrent writers are safe.
    """
    src, out = Path(model_path), Path(out_dir)
    if out.exists():
        return out
    config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    if not 1 <= k <= config["num_hidden_layers"]:
        raise ValueError(f"k={k}: the checkpoint has {config['num_hidden_layers']} layers")
    weight_files = sorted(src.glob("*.safetensors"))
    if not weight_files:
        raise FileNotFoundError(f"{src}: no *.safetensors weights")

    tensors: dict[str, Tensor] = {}
    for file in weight_files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                layer = _LAYER_KEY.search(name)
                if name.startswith("lm_head.") or (layer and int(layer.group(1)) >= k):
                    continue
                tensors[name] = f.get_tensor(name)

    config["num_hidden_layers"] = k
    if isinstance(config.get("layer_types"), list):
        config["layer_types"] = config["layer_types"][:k]

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, tmp / name)
        os.replace(tmp, out)
    except OSError:
        if not out.exists():  # a concurrent writer may have won the rename: its copy is identical
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
