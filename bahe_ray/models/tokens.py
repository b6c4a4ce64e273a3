"""Token ids for the two places text meets a tokenizer: atoms (shallow encoder, items) and the
token-level baseline's joined histories."""

from __future__ import annotations

import itertools
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from bahe_ray.runtime import to_device

BEHAVIOR_SEPARATOR = "; "  # joins a field's behaviour texts for the token-level baseline


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


def pad_token_ids(
    seqs: list[list[int]], device: str | torch.device = "cpu", width: int | None = None
) -> tuple[Tensor, Tensor]:
    """Right-pad token lists into (ids, mask) tensors, to `width` (default: the longest); the pad id is 0
    (masked, never read)."""
    ids, lengths = right_pad(seqs, width)
    return to_device(ids, device), to_device(np.arange(ids.shape[1])[None, :] < lengths[:, None], device)


def right_pad(seqs: list[list[int]], width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Token lists -> (ids (n, W) padded with 0 on the right, lengths (n,)); W = `width`, default the longest."""
    lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
    if width is None:
        width = int(lengths.max()) if len(seqs) else 0
    ids = np.zeros((len(seqs), width), dtype=np.int64)
    ids[np.arange(width)[None, :] < lengths[:, None]] = np.fromiter(
        itertools.chain.from_iterable(seqs), dtype=np.int64, count=int(lengths.sum())
    )
    return ids, lengths


def special_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """(prefix, suffix): the special tokens the tokenizer puts around one text ([CLS] .. [SEP], <s> .., none)."""
    plain = tokenizer("x", add_special_tokens=False)["input_ids"]
    full = tokenizer("x")["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start], full[start + len(plain) :]
    raise ValueError("the tokenizer's special tokens do not wrap the text's own tokens")


def join_behaviour_tokens(
    behaviours: list[list[int]], separator: list[int], specials: tuple[list[int], list[int]], max_length: int
) -> list[int]:
    """One field's token sequence from its behaviours' own tokens (oldest first, no special tokens).

    They are joined by the separator's tokens; beyond max_length the oldest tokens are cut so
    the most recent stay, then the special tokens wrap the rest. No behaviours: [] (all padding).
    """
    if not behaviours:
        return []
    prefix, suffix = specials
    body = list(behaviours[0])
    for tokens in behaviours[1:]:
        body += separator
        body += tokens
    keep = max(max_length - len(prefix) - len(suffix), 0)
    return prefix + body[len(body) - min(keep, len(body)) :] + suffix
