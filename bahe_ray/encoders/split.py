"""The shallow/deep split of a Hugging Face checkpoint.

BAHE cuts one pretrained transformer at layer k: layers [0, k) encode behaviour texts offline,
layers [k, L) aggregate the stored vectors during training. `Backbone` holds the pieces both
sides need (input embeddings, the layer list, final norm, rotary embedding) and runs any range
of layers with a padding mask, so the shallow encoder, the CTR models and the tests all walk
the same code path. Two families are supported:

- decoders (Llama, Mistral, Qwen2, Qwen3): `embed_tokens`, `layers`, `norm`, `rotary_emb`;
  causal attention, rotary positions;
- BERT-like encoders: `embeddings` (word + position + token-type, LayerNorm), `encoder.layer`;
  bidirectional attention, no final norm.

Positions are always counted over real tokens (`positions_from_mask`), so a sequence gives the
same hidden states alone or padded on either side in a batch: that is what vLLM computes for
each prompt, and what makes the two encoder backends agree.

Sliding-window attention is not modelled: the masks built here are full (causal) attention.
"""

from __future__ import annotations

import itertools

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from transformers import AttentionInterface, AutoModel, PretrainedConfig, PreTrainedModel, Qwen2Config
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

Family = Literal["decoder", "bert"]
Pooling = Literal["mean", "last"]

DECODER_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})
BERT_TYPES = frozenset({"bert"})

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

# Files a truncated checkpoint needs besides weights and config (whichever the source has).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja",
)

ATTENTION = "bahe_sdpa"  # every Backbone's attention: sdpa, with length-1 sequences short-circuited


def sdpa_or_single(
    module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
    dropout: float = 0.0, **kwargs: Any,
) -> tuple[Tensor, None]:
    """Hugging Face's sdpa attention, except that a length-1 sequence attending to itself returns
    its values (the softmax of one score is 1), with no attention kernel.

    BAHE's item pass runs one stored vector per sample through the upper layers. SDPA's kernels
    spend a full tile per sequence and head on it: on an H200 (Qwen2.5-0.5B shape, batch 960)
    those kernels took 22 ms of a 357-ms training step. Gradients are the same: the output does
    not depend on the query or key. With attention dropout (BERT in training) sdpa runs as usual.
    """
    if query.shape[2] == 1 and key.shape[2] == 1 and attention_mask is None and dropout == 0.0:
        groups = query.shape[1] // value.shape[1]
        return repeat_kv(value, groups).transpose(1, 2).contiguous(), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, **kwargs)


AttentionInterface.register(ATTENTION, sdpa_or_single)

_LAYER_KEY = re.compile(r"(?:^|\.)layers?\.(\d+)\.")  # decoders: layers.N. ; BERT: encoder.layer.N.


def model_family(config: PretrainedConfig) -> Family:
    """Which of the supported layouts a config describes; anything else is refused."""
    if config.model_type in DECODER_TYPES:
        layer_types = getattr(config, "layer_types", None) or []
        if any(t != "full_attention" for t in layer_types):
            raise NotImplementedError(f"{config.model_type}: sliding-window layers are not supported")
        return "decoder"
    if config.model_type in BERT_TYPES:
        return "bert"
    supported = sorted(DECODER_TYPES | BERT_TYPES)
    raise NotImplementedError(f"model_type {config.model_type!r} is not supported (supported: {supported})")


def positions_from_mask(mask: Tensor) -> Tensor:
    """Position ids counted over real tokens: 0..n-1 whatever side the padding is on."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def pool_hidden(hidden: Tensor, mask: Tensor, pooling: Pooling) -> Tensor:
    """(S, T, d) -> (S, d) float32: masked mean over real tokens, or the last real token.

    Works for left and right padding; a row without real tokens pools to zeros.
    """
    mask = mask.bool()
    hidden = hidden.float()
    if pooling == "mean":
        summed = torch.where(mask[..., None], hidden, 0.0).sum(dim=1)
        return summed / mask.sum(dim=1, keepdim=True).clamp(min=1)
    steps = torch.arange(mask.shape[1], device=mask.device)
    last = (mask * steps).argmax(dim=1)
    picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    return torch.where(mask.any(dim=1, keepdim=True), picked, 0.0)


def token_ids(
    tokenizer: Any, texts: list[str], max_length: int, side: Literal["left", "right"] = "right"
) -> list[list[int]]:
    """Tokenise with the tokenizer's special tokens, truncating to `max_length` tokens.

    side="right" keeps the first tokens (atoms, items); side="left" keeps the most recent
    (token-level histories). Special tokens survive truncation either way.
    """
    previous = tokenizer.truncation_side
    tokenizer.truncation_side = side
    try:
        return tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    finally:
        tokenizer.truncation_side = previous


class AtomTokenizer:
    """`token_ids(tokenizer, texts, max_length)` (right truncation), from the tokenizer's Rust backend.

    A private copy of the backend truncates on the right and `encode_batch_fast` skips offsets,
    so no Python object is built per text besides its id list: about 3x faster than calling the
    transformers tokenizer (2 cores), which matters once the layers run on a GPU. The copy also
    makes it safe on a helper thread while the tokenizer is used elsewhere.
    """

    def __init__(self, tokenizer: Any, max_length: int) -> None:
        from tokenizers import Tokenizer

        self.backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        self.backend.enable_truncation(max_length, direction="right")
        self.backend.no_padding()

    def ids(self, texts: list[str]) -> list[list[int]]:
        return [encoding.ids for encoding in self.backend.encode_batch_fast(texts)]

    def matrix(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Right-padded (ids (n, W), lengths (n,))."""
        return right_pad(self.ids(texts))


def to_device(array: np.ndarray, device: str | torch.device) -> Tensor:
    """A host array on `device`; pinned and asynchronous on CUDA, so it overlaps queued GPU work."""
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if torch.device(device).type != "cuda":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)


def pad_token_ids(seqs: list[list[int]], device: str | torch.device = "cpu") -> tuple[Tensor, Tensor]:
    """Right-pad token lists into (ids, mask) tensors; the pad id is 0 (masked, never read)."""
    ids, lengths = right_pad(seqs)
    return to_device(ids, device), to_device(np.arange(ids.shape[1])[None, :] < lengths[:, None], device)


def right_pad(seqs: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Token lists -> (ids (n, W) padded with 0 on the right, lengths (n,))."""
    lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
    width = int(lengths.max()) if len(seqs) else 0
    ids = np.zeros((len(seqs), width), dtype=np.int64)
    ids[np.arange(width)[None, :] < lengths[:, None]] = np.fromiter(
        itertools.chain.from_iterable(seqs), dtype=np.int64, count=int(lengths.sum())
    )
    return ids, lengths


class Backbone(nn.Module):
    """The parts of a pretrained transformer that BAHE splits, runnable range by range.

    `layers[i]` is the model's layer `first_layer + i`; `keep_layers` frees what a stage does
    not need (the encoder keeps [0, k), BaheCTR keeps [k, L)). `num_layers` stays the full
    model's L.
    """

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.config = model.config
        self.family: Family = model_family(model.config)
        self.num_layers: int = model.config.num_hidden_layers
        self.hidden_size: int = model.config.hidden_size
        self.max_positions: int = model.config.max_position_embeddings
        self.first_layer = 0
        if self.family == "decoder":
            self.embeddings: nn.Module | None = model.embed_tokens
            self.layers = model.layers
            self.norm: nn.Module = model.norm
            self.rotary_emb: nn.Module | None = model.rotary_emb
        else:
            self.embeddings = model.embeddings
            self.layers = model.encoder.layer
            self.norm = nn.Identity()
            self.rotary_emb = None

    @classmethod
    def load(cls, path: str | Path, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False) -> Backbone:
        """Load a local checkpoint (safetensors only: weights never go through pickle)."""
        model = AutoModel.from_pretrained(
            str(path), dtype=dtype, attn_implementation=ATTENTION,
            trust_remote_code=trust_remote_code, use_safetensors=True,
        )
        return cls(model)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def keep_layers(self, start: int, end: int) -> None:
        """Free every layer outside [start, end); the input embeddings go unless start == 0."""
        self._check_range(start, end)
        kept = list(self.layers)[start - self.first_layer : end - self.first_layer]
        self.layers = nn.ModuleList(kept)
        self.first_layer = start
        if start > 0:
            self.embeddings = None

    def position_table(self) -> Tensor | None:
        """BERT's learned absolute position embeddings (max_positions, d); None for rotary decoders."""
        if self.family == "bert" and self.embeddings is not None:
            return self.embeddings.position_embeddings.weight.detach().clone()
        return None

    def embed(self, input_ids: Tensor, position_ids: Tensor | None = None) -> Tensor:
        """Token ids (B, T) -> the first layer's input h0 (B, T, d).

        BERT adds position (default 0..T-1) and token-type-0 embeddings and its LayerNorm;
        decoders look up tokens only (their positions are rotary, applied in `run_layers`).
        """
        if self.embeddings is None:
            raise RuntimeError("the input embeddings were freed by keep_layers()")
        if self.family == "decoder":
            return self.embeddings(input_ids)
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None].expand_as(input_ids)
        return self.embeddings(
            input_ids=input_ids, position_ids=position_ids, token_type_ids=torch.zeros_like(input_ids)
        )

    def run_layers(
        self, hidden: Tensor, attention_mask: Tensor, start: int, end: int, position_ids: Tensor | None = None,
        padded: bool | None = None,
    ) -> Tensor:
        """Hidden states (B, T, d) after layers [start, end).

        attention_mask (B, T) marks real tokens (bool or 0/1). position_ids (rotary, decoders
        only) default to positions counted over real tokens. `padded` says whether the mask has
        padding, if the caller knows; None checks the mask, which waits for the GPU.
        """
        self._check_range(start, end)
        mask_4d = self._attention_mask(attention_mask, padded)
        kwargs: dict[str, Any] = {"attention_mask": mask_4d}
        if self.family == "decoder":
            if position_ids is None:
                position_ids = positions_from_mask(attention_mask)
            kwargs["position_ids"] = position_ids
            kwargs["position_embeddings"] = self.rotary_emb(hidden, position_ids)
        for layer in self.layers[start - self.first_layer : end - self.first_layer]:
            hidden = layer(hidden, **kwargs)
        return hidden

    def compile_layers(self, mode: str | None = None, backend: str = "inductor") -> None:
        """torch.compile each held layer (regional: identical layers share one compiled graph).

        Variants (inputs with and without grad, padded or not, length-1 items, new shapes until
        dynamo marks them dynamic) each compile once, hence the raised (process-wide) recompile limit.
        mode="reduce-overhead" replays each layer as a CUDA graph (fewer launches for small batches);
        backend="cudagraphs" does that with the eager kernels (no inductor fusion).
        """
        torch._dynamo.config.recompile_limit = 64
        for layer in self.layers:
            layer.compile(mode=mode, backend=backend)

    def final_norm(self, hidden: Tensor) -> Tensor:
        """The decoder's final norm (what its last_hidden_state and vLLM's pooled output carry); identity for BERT."""
        return self.norm(hidden)

    def _attention_mask(self, mask: Tensor, padded: bool | None = None) -> Tensor | None:
        """The 4-D boolean mask (B, 1, T, T) that sdpa takes (True = attend), or None without padding.

        None lets sdpa pick its fastest kernel (is_causal for decoders). A padded query row
        attends to itself only, so no row is fully masked (which would give NaN); real rows
        never see padding, and padded rows are never read. Length-1 sequences (BAHE's items)
        need no mask; otherwise, unless `padded` tells, the mask is checked, which waits for the GPU.
        """
        mask = mask.bool()
        if padded is None:
            padded = mask.shape[1] > 1 and not bool(mask.all())
        if not padded:
            return None
        n = mask.shape[1]
        allowed = mask[:, None, None, :].expand(-1, 1, n, n)
        if self.family == "decoder":
            allowed = allowed & torch.ones(n, n, dtype=torch.bool, device=mask.device).tril()
        return allowed | torch.eye(n, dtype=torch.bool, device=mask.device)

    def _check_range(self, start: int, end: int) -> None:
        held = (self.first_layer, self.first_layer + len(self.layers))
        if not held[0] <= start <= end <= held[1]:
            raise ValueError(f"layers [{start}, {end}) are outside the held layers [{held[0]}, {held[1]})")


def preset_config(name: str) -> Qwen2Config:
    """The config of a named random-weight preset (see PRESETS)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r} (known: {sorted(PRESETS)})")
    return Qwen2Config(**PRESETS[name])


def backbone_from_config(config: PretrainedConfig, dtype: torch.dtype = torch.float32) -> Backbone:
    """A randomly initialised Backbone of a given shape: benchmarks without a checkpoint."""
    return Backbone(AutoModel.from_config(config, attn_implementation=ATTENTION, dtype=dtype))


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
