"""The token-level baseline's batch built straight from texts: the oracle that
`bahe_ray.features.token_batch` (cached token lists per atom) must equal."""

from __future__ import annotations

from torch import Tensor

from bahe_ray.models.tokens import BEHAVIOR_SEPARATOR, join_behaviour_tokens, pad_token_ids, special_tokens, token_ids


def tokenize_histories(
    tokenizer, histories: list[list[list[str]]], items: list[str], max_length: int
) -> dict[str, Tensor]:
    """TokenCTR's batch from texts.

    histories[b][f] lists sample b's field-f behaviour texts oldest first. Each behaviour is
    tokenised on its own (so it has the same tokens wherever it occurs, and a token cache per
    atom gives identical batches: `bahe_ray.features.token_batch`), then `join_behaviour_tokens`
    joins them with BEHAVIOR_SEPARATOR's tokens, keeps the most recent tokens within max_length
    and adds the special tokens. Items keep their first max_length tokens. Use TokenCTR.max_length.
    """
    n_fields = len(histories[0])
    texts = sorted({text for sample in histories for field in sample for text in field})
    own = dict(zip(texts, tokenizer(texts, add_special_tokens=False)["input_ids"])) if texts else {}
    separator = tokenizer(BEHAVIOR_SEPARATOR, add_special_tokens=False)["input_ids"]
    specials = special_tokens(tokenizer)
    seqs = [
        join_behaviour_tokens([own[text] for text in field], separator, specials, max_length)
        for sample in histories
        for field in sample
    ]
    hist_ids, hist_mask = pad_token_ids(seqs)
    item_ids, item_mask = pad_token_ids(token_ids(tokenizer, items, max_length))
    return {
        "hist_input_ids": hist_ids.view(len(histories), n_fields, -1),
        "hist_attention_mask": hist_mask.view(len(histories), n_fields, -1),
        "item_input_ids": item_ids,
        "item_attention_mask": item_mask,
    }


