"""The layers of a Hugging Face checkpoint, split at layer k and run range by range.

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

from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from transformers import AttentionInterface, AutoModel, PretrainedConfig, PreTrainedModel
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

Family = Literal["decoder", "bert"]
Pooling = Literal["mean", "last"]

DECODER_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})
BERT_TYPES = frozenset({"bert"})

ATTENTION = "bahe_sdpa"  # every Backbone's attention: sdpa, with length-1 sequences short-circuited


def sdpa_or_single(
    module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
    dropout: float = 0.0, **kwargs: Any,
) -> tuple[Tensor, None]:
    """Hugging Face's sdpa attention, except that a length-1 sequence attending to itself returns
    its values (the softmax of one score is 1), with no attention kernel.

    BAHE's item pass runs one stored vector per sample through the upper layers, and sdpa's
    kernels would spend a full tile per sequence and head on it (docs/benchmarks.md). Gradients
    are the same: the output does not depend on the query or key. With attention dropout (BERT in training) sdpa runs as usual.
    """
    if query.shape[2] == 1 and key.shape[2] == 1 and attention_mask is None and dropout == 0.0:
        groups = query.shape[1] // value.shape[1]
        return repeat_kv(value, groups).transpose(1, 2).contiguous(), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, **kwargs)


AttentionInterface.register(ATTENTION, sdpa_or_single)



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



def backbone_from_config(config: PretrainedConfig, dtype: torch.dtype = torch.float32) -> Backbone:
    """A randomly initialised Backbone of a given shape: benchmarks without a checkpoint."""
    return Backbone(AutoModel.from_config(config, attn_implementation=ATTENTION, dtype=dtype))
