"""Tiny random decoder checkpoints (Llama, Qwen2) for offline tests.

Each is saved like a real one: a *ForCausalLM safetensors checkpoint (`model.` prefixed names,
an lm_head) plus a tokenizer trained on the fly with `tokenizers` on synthetic behaviour
strings (Llama: word-level with BOS; Qwen2: byte-level BPE, no BOS), so AutoModel,
AutoTokenizer and vLLM load the folder with no network.
Shapes: hidden 128, 4 heads of 32 (vLLM's CPU backend needs head_dim >= 32), 2 KV heads,
4 layers, intermediate 256, weights drawn wide enough that masking mistakes show.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Literal

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    BertConfig,
    LlamaConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2Tokenizer,
)

BRANDS = ["starbucks", "nike", "apple", "ikea", "lego", "sony", "zara", "adidas"]
PRODUCTS = ["coffee", "shoes", "phone", "lamp", "bricks", "headphones", "jacket", "socks"]
TITLES = ["toy story", "heat", "casino", "jumanji", "babe", "clueless", "sabrina", "balto"]


def behaviour_texts(n: int = 400, seed: int = 0) -> list[str]:
    """Synthetic behaviour strings in a few templates (purchases, searches, ratings)."""
    rng = random.Random(seed)
    templates = [
        lambda: f"Purchase {rng.choice(BRANDS)} {rng.choice(PRODUCTS)} for {rng.randint(1, 99)} dollars",
        lambda: f"Search {rng.choice(PRODUCTS)} near {rng.choice(BRANDS)}",
        lambda: f"rated {rng.randint(1, 5)} : {rng.choice(TITLES)} ( {rng.randint(1990, 1999)} )",
    ]
    return [rng.choice(templates)() for _ in range(n)]


def llama_tokenizer() -> PreTrainedTokenizerFast:
    """A lower-casing word-level tokenizer that prepends <s>, like Llama's."""
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = ["[PAD]", "[UNK]", "<s>", "</s>"]
    tok.train_from_iterator(behaviour_texts(), trainers.WordLevelTrainer(special_tokens=specials))
    bos = ("<s>", tok.token_to_id("<s>"))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[bos])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="[PAD]", unk_token="[UNK]"
    )


def qwen2_tokenizer() -> Qwen2Tokenizer:
    """A byte-level BPE in Qwen2's own tokenizer class (no BOS; AutoTokenizer insists on that class)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(behaviour_texts(), trainer)
    bpe = json.loads(tok.to_str())["model"]
    return Qwen2Tokenizer(vocab=bpe["vocab"], merges=[tuple(pair) for pair in bpe["merges"]])


def build_tiny_model(out_dir: Path, family: Literal["llama", "qwen2"], seed: int = 0) -> Path:
    """Write a tiny random checkpoint with its tokenizer into out_dir and return it."""
    tokenizer = llama_tokenizer() if family == "llama" else qwen2_tokenizer()
    shape = dict(
        vocab_size=len(tokenizer), hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
        num_hidden_layers=4, intermediate_size=256, max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
        initializer_range=0.1,  # larger than real (0.02) so attention mixes tokens visibly in tests
    )
    config = LlamaConfig(**shape) if family == "llama" else Qwen2Config(**shape, use_sliding_window=False)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def build_minilm_shape(out_dir: Path, seed: int = 0) -> Path:
    """all-MiniLM-L6-v2's shape (BERT, 6 layers, hidden 384) with random weights and a WordPiece
    tokenizer trained on behaviour strings ([CLS] text [SEP], lower-cased), saved like the real one."""
    from bahe_ray.models.registry import MINILM_SHAPE

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(behaviour_texts(), trainers.WordPieceTrainer(vocab_size=800, special_tokens=special))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))]
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                        cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    torch.manual_seed(seed)
    AutoModel.from_config(BertConfig(**MINILM_SHAPE)).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
