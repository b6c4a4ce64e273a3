"""CTR models: BAHE (text only, or hybrid with ID features), the token-level LLM-CTR baseline, and a plain
ID-embedding baseline.

Each maps a batch dict of tensors to logits (B,) and ends in the same `CTRHead`, an MLP over
concat(F user-field vectors, item vector). B samples, F behaviour fields:

  BaheCTR   hist (B, F, N, d) float     stored vectors of each field's last N behaviours, oldest
                                        first; padding may sit on either side (positions are
                                        counted over real behaviours, so alignment is free)
            hist_mask (B, F, N) bool    True at real behaviours (a field may have none)
            item (B, d) float           stored vector of the candidate item's text
            user_index (B,) long        optional: sample b uses history row user_index[b] (then
                                        hist has U <= B rows; a user's candidates share one)
  TokenCTR  hist_input_ids (B, F, T) long, hist_attention_mask (B, F, T)   see features.token_batch
            item_input_ids (B, Ti) long, item_attention_mask (B, Ti)
  IdCTR     hist_ids (B, F, N) int64 atom ids, hist_mask (B, F, N) bool, item_ids (B,) int64
  BaheHybridCTR  BaheCTR's tensors plus IdCTR's prefixed id_ (id_hist_ids, id_hist_mask, id_item_ids)
  (DinCTR, the DIN baseline in `bahe_ray.models.din`, takes IdCTR's tensors.)

Per field, a masked mean over real positions; a field without behaviours gives a zero vector.
ModelConfig.trainable applies to the transformer layers a model runs (BAHE: k..L-1 and the
final norm; token baseline: all L and the final norm): "full" trains them, "lora" trains only
LoRA adapters on their linear layers, "frozen" trains none. The head and field embedding
always train. Input embeddings stay frozen (BAHE's stored vectors are frozen too); BERT's
position rows in BaheCTR train in "full" mode only.
"""

from __future__ import annotations

import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import Tensor, nn

from bahe_ray.config import ModelConfig
from bahe_ray.models.backbone import Backbone, pool_hidden, positions_from_mask


class CTRHead(nn.Module):
    """MLP over concat(user field vectors, item vector) -> one logit per sample."""

    def __init__(self, in_dim: int, hidden: list[int], dropout: float) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for width in hidden:
            layers += [nn.Linear(in_dim, width), nn.ReLU(), nn.Dropout(dropout)]
            in_dim = width
        layers.append(nn.Linear(in_dim, 1))
        self.mlp = nn.Sequential(*layers)

    def forward(self, *parts: Tensor) -> Tensor:
        """users (B, F, d), item (B, d) (and for the hybrid the ID features) -> logits (B,)."""
        x = torch.cat([part.flatten(1).to(self.mlp[0].weight.dtype) for part in parts], dim=1)
        return self.mlp(x).squeeze(-1)


def configure_trainable(backbone: Backbone, cfg: ModelConfig) -> None:
    """Set requires_grad on the backbone per cfg.trainable; "lora" first injects LoRA (peft) into every linear layer."""
    if cfg.trainable == "lora":
        linear = [name for name, m in backbone.layers.named_modules() if isinstance(m, nn.Linear)]
        targets = sorted({name.rsplit(".", 1)[-1] for name in linear})
        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, target_modules=targets)
        inject_adapter_in_model(lora, backbone.layers)
    for name, param in backbone.named_parameters():
        param.requires_grad = cfg.trainable == "full" or (cfg.trainable == "lora" and "lora_" in name)


class _BackboneCTR(nn.Module):
    """What BaheCTR and TokenCTR share: layers [start, L) + final norm, field embedding, head.

    Both run the item's short pass through the layers before the users' long pass: autograd
    runs the later pass's backward first, and were that the item's, it would create every
    layer's weight gradient while all the user pass's activations are still held (+0.54 GB at
    BAHE's peak, Qwen2.5-0.5B shape, k=6, batch 8, N=200, on an H200). In this order the user
    pass's activations are freed layer by layer as the gradients appear.
    """

    def __init__(self, backbone: Backbone, start: int, n_fields: int, cfg: ModelConfig) -> None:
        super().__init__()
        configure_trainable(backbone, cfg)
        self.backbone = backbone
        self.start = start
        d = backbone.hidden_size
        # Zero-initialised: the model starts as the pretrained path and learns field offsets.
        self.field_embedding = nn.Parameter(torch.zeros(n_fields, d)) if cfg.field_embedding else None
        self.head = CTRHead((n_fields + 1) * d, cfg.head_hidden, cfg.dropout)

    def deep(
        self, hidden: Tensor, mask: Tensor, position_ids: Tensor | None = None, padded: bool | None = None
    ) -> Tensor:
        """Layers [start, L) then the final norm over (S, T, d): exactly the full model's top."""
        hidden = self.backbone.run_layers(hidden, mask, self.start, self.backbone.num_layers, position_ids, padded)
        return self.backbone.final_norm(hidden)

    def field_rows(self, batch_size: int, dtype: torch.dtype) -> Tensor | None:
        """The field embedding laid out for (B*F, T, d) sequences (row b*F + f gets field f): (B*F, 1, d)."""
        if self.field_embedding is None:
            return None
        return self.field_embedding.to(dtype).repeat(batch_size, 1)[:, None, :]


class BaheCTR(_BackboneCTR):
    """BAHE: the upper layers k..L-1 aggregate stored behaviour vectors, one sequence per field.

    The stored vectors are the shallow encoder's pooled outputs (for decoders pooled
    final_norm(h_k), as vLLM returns them), one position per behaviour.

    All B*F field sequences run through the upper layers in one batched call (feature
    parallel). Decoders get rotary positions over real behaviours; BERT gets its pretrained
    position rows added. The item vector passes the same layers as a length-1 sequence.
    The backbone's embeddings and layers below k are freed.
    """

    def __init__(self, backbone: Backbone, k: int, n_fields: int, cfg: ModelConfig) -> None:
        if not 1 <= k < backbone.num_layers:
            raise ValueError(f"k={k}: BAHE needs 1 <= k < {backbone.num_layers} (the model's layers)")
        table = backbone.position_table()
        backbone.keep_layers(k, backbone.num_layers)
        super().__init__(backbone, k, n_fields, cfg)
        self.positions = None if table is None else nn.Embedding.from_pretrained(table, freeze=cfg.trainable != "full")

    def aggregate(self, x: Tensor, mask: Tensor, padded: bool | None = None) -> Tensor:
        """Sequences of behaviour vectors (S, N, d) -> one pooled vector each (S, d) float32."""
        x = torch.where(mask[..., None], x, 0.0)  # padding content never matters, even NaN
        positions = positions_from_mask(mask)
        if self.positions is not None:
            x = x + self.positions(positions).to(x.dtype)
        return pool_hidden(self.deep(x, mask, positions, padded), mask, "mean")

    def item_states(self, items: Tensor) -> Tensor:
        """Item vectors (B, d) -> what the head reads of each item (B, d) float32: the vector through
        the upper layers as a length-1 sequence. Depends on the item's vector only (the scorer caches it)."""
        mask = torch.ones(items.shape[0], 1, dtype=torch.bool, device=items.device)
        return self.aggregate(items.to(self.backbone.dtype)[:, None, :], mask)

    def user_states(self, hist: Tensor, mask: Tensor, fields: Tensor, padded: bool | None = None) -> Tensor:
        """Histories (S, N, d) with masks (S, N), sequence s of field `fields[s]` -> what the head reads of
        each (S, d) float32. Depends on the field and the history only (the scorer caches it)."""
        x = hist.to(self.backbone.dtype)
        if self.field_embedding is not None:
            x = x + self.field_embedding.to(x.dtype)[fields][:, None, :]
        return self.aggregate(x, mask, padded)

    def forward(self, batch: dict[str, Tensor], padded: bool | None = None) -> Tensor:
        """Logits (B,). `padded`: whether hist_mask has padding, if the caller knows (True is always
        correct, False a promise); None checks the mask, which waits for the GPU."""
        return self.head(*self.features(batch, padded))

    def features(self, batch: dict[str, Tensor], padded: bool | None = None) -> tuple[Tensor, Tensor]:
        """(users (B, F, d), item (B, d)): the aggregated field vectors and the item vector."""
        hist, mask = batch["hist"], batch["hist_mask"].bool()
        b, f, n, d = hist.shape
        item = self.item_states(batch["item"])  # first: see _BackboneCTR
        fields = torch.arange(f, device=hist.device).repeat(b)  # row b*F + f is field f
        users = self.user_states(hist.reshape(b * f, n, d), mask.reshape(b * f, n), fields, padded).view(b, f, d)
        if "user_index" in batch:  # several samples share one history row
            users = users[batch["user_index"]]
        return users, item


class BaheHybridCTR(BaheCTR):
    """BAHE plus collaborative features: ID embeddings of the item and of the history (masked mean per field,
    as `IdCTR`) beside the text vectors into the head. Batches carry IdCTR's tensors with an `id_` prefix
    (`features.hybrid_batch`)."""

    def __init__(self, backbone: Backbone, k: int, n_fields: int, cfg: ModelConfig) -> None:
        super().__init__(backbone, k, n_fields, cfg)
        e = cfg.id_embedding_dim
        self.ids = IdFeatures(cfg.id_buckets, e)
        self.head = CTRHead((n_fields + 1) * (backbone.hidden_size + e), cfg.head_hidden, cfg.dropout)

    def forward(self, batch: dict[str, Tensor], padded: bool | None = None) -> Tensor:
        users, item = self.features(batch, padded)
        id_users, id_item = self.ids(batch["id_hist_ids"], batch["id_hist_mask"], batch["id_item_ids"])
        return self.head(users, item, id_users, id_item)


class TokenCTR(_BackboneCTR):
    """Token-level LLM-CTR baseline: all L layers read each field's behaviour tokens.

    Same sdpa kernel, dtype, batching (B*F sequences in one call), pooling, trainable set and
    head as BaheCTR; the token embeddings stay frozen.
    """

    def __init__(self, backbone: Backbone, n_fields: int, cfg: ModelConfig) -> None:
        super().__init__(backbone, 0, n_fields, cfg)
        backbone.embeddings.requires_grad_(False)
        self.max_length = min(cfg.token_max_length, backbone.max_positions)  # token_batch truncates to this

    def read(self, input_ids: Tensor, mask: Tensor, fields: Tensor | None = None, padded: bool | None = None) -> Tensor:
        """Token sequences (S, T) -> embeddings (+ field rows) -> all layers -> masked mean (S, d) float32."""
        positions = positions_from_mask(mask)
        hidden = self.backbone.embed(input_ids, positions)
        if fields is not None:
            hidden = hidden + fields
        return pool_hidden(self.deep(hidden, mask, positions, padded), mask, "mean")

    def forward(self, batch: dict[str, Tensor], padded: bool | None = None) -> Tensor:
        """Logits (B,). `padded`: whether either attention mask has padding, as in BaheCTR.forward."""
        item = self.read(batch["item_input_ids"], batch["item_attention_mask"].bool(), None, padded)  # first: see _BackboneCTR
        ids, mask = batch["hist_input_ids"], batch["hist_attention_mask"].bool()
        b, f, t = ids.shape
        fields = self.field_rows(b, self.backbone.dtype)
        users = self.read(ids.reshape(b * f, t), mask.reshape(b * f, t), fields, padded).view(b, f, -1)
        return self.head(users, item)


class IdFeatures(nn.Module):
    """Hashed atom ids -> embeddings; `forward` pools each field's history by a masked mean."""

    def __init__(self, num_buckets: int, dim: int) -> None:
        super().__init__()
        self.num_buckets = num_buckets
        self.embedding = nn.Embedding(num_buckets, dim)
        nn.init.normal_(self.embedding.weight, std=0.02)

    def embed(self, hist_ids: Tensor, item_ids: Tensor) -> tuple[Tensor, Tensor]:
        """(history embeddings (B, F, N, e), item embeddings (B, e))."""
        return self.embedding(hist_ids.remainder(self.num_buckets)), self.embedding(item_ids.remainder(self.num_buckets))

    def forward(self, hist_ids: Tensor, hist_mask: Tensor, item_ids: Tensor) -> tuple[Tensor, Tensor]:
        """(users (B, F, e): masked mean per field, item (B, e))."""
        hist, item = self.embed(hist_ids, item_ids)
        b, f, n, e = hist.shape
        users = pool_hidden(hist.view(b * f, n, e), hist_mask.bool().reshape(b * f, n), "mean").view(b, f, e)
        return users, item


class IdCTR(nn.Module):
    """Plain ID-embedding baseline: hashed atom ids -> embeddings, masked mean per field, same head."""

    def __init__(self, n_fields: int, cfg: ModelConfig, num_buckets: int = 1 << 18) -> None:
        super().__init__()
        self.ids = IdFeatures(num_buckets, cfg.id_embedding_dim)
        self.head = CTRHead((n_fields + 1) * cfg.id_embedding_dim, cfg.head_hidden, cfg.dropout)

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        return self.head(*self.ids(batch["hist_ids"], batch["hist_mask"], batch["item_ids"]))
