"""The transformers backend of the shallow encoder: first k layers of a checkpoint, pooled.

Per text: tokens (the tokenizer's special tokens included, truncated on the right to
max_tokens) -> embeddings -> layers [0, k) -> final norm (decoders) -> mean over tokens or
the last token. Each text is computed as if alone (positions counted over its own tokens,
padding masked), which is what vLLM does per prompt, so the vLLM backend must tokenise with
`split.token_ids` and pool the same way (MEAN / LAST, no normalisation).
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import AutoTokenizer

from bahe_ray.config import EncoderConfig
from bahe_ray.encoders import default_device, encoder_fingerprint, resolve_model_path
from bahe_ray.encoders.split import Backbone, pad_token_ids, pool_hidden, positions_from_mask, token_ids


def length_batches(lengths: list[int], max_batch_tokens: int) -> list[list[int]]:
    """Indices grouped into micro-batches of similar length, each at most max_batch_tokens padded tokens.

    Sorting by length first keeps padding (wasted compute) small.
    """
    batches: list[list[int]] = []
    current: list[int] = []
    for index in sorted(range(len(lengths)), key=lengths.__getitem__):
        if current and (len(current) + 1) * lengths[index] > max_batch_tokens:
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches


class TransformersEncoder:
    """ShallowEncoder on plain transformers (CPU or GPU): fp32 on CPU, bf16 on GPU under dtype="auto"."""

    def __init__(self, cfg: EncoderConfig, device: str | None = None, max_batch_tokens: int = 16384) -> None:
        self.device = device or default_device()
        self.fingerprint = encoder_fingerprint(cfg, self.device)
        path = resolve_model_path(cfg.model)
        backbone = Backbone.load(path, getattr(torch, self.fingerprint.dtype), cfg.trust_remote_code)
        if cfg.k > backbone.num_layers:
            raise ValueError(f"encoder.k={cfg.k}: {cfg.model} has only {backbone.num_layers} layers")
        backbone.keep_layers(0, cfg.k)
        self.backbone = backbone.to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=cfg.trust_remote_code)
        self.cfg = cfg
        self.dim: int = backbone.hidden_size
        self.max_batch_tokens = max_batch_tokens

    @torch.inference_mode()
    def encode(self, texts: list[str]) -> np.ndarray:
        """Pooled layer-k vectors, (n, dim) float32, in input order."""
        ids = token_ids(self.tokenizer, list(texts), self.cfg.max_tokens) if texts else []
        empty = [i for i, seq in enumerate(ids) if not seq]
        if empty:
            raise ValueError(f"texts at {empty[:5]} have no tokens")
        out = np.empty((len(ids), self.dim), dtype=np.float32)
        for batch in length_batches([len(seq) for seq in ids], self.max_batch_tokens):
            out[batch] = self._encode_batch([ids[i] for i in batch])
        return out

    def _encode_batch(self, seqs: list[list[int]]) -> np.ndarray:
        input_ids, mask = pad_token_ids(seqs, self.device)
        positions = positions_from_mask(mask)
        hidden = self.backbone.embed(input_ids, positions)
        hidden = self.backbone.run_layers(hidden, mask, 0, self.cfg.k, positions)
        pooled = pool_hidden(self.backbone.final_norm(hidden), mask, self.cfg.pooling)
        return pooled.cpu().numpy()
