"""CTR models: the split is exact, masks are respected, trainable modes do what they say."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from token_oracle import tokenize_histories
from transformers import AutoModel, AutoTokenizer, Qwen2Config

from bahe_ray.config import ModelConfig
from bahe_ray.models.backbone import Backbone, backbone_from_config, positions_from_mask
from bahe_ray.models.ctr import BaheCTR, IdCTR, TokenCTR
from bahe_ray.models.registry import preset_config
from bahe_ray.models.tokens import BEHAVIOR_SEPARATOR, pad_token_ids, token_ids

TEXTS = [
    "Purchase nike shoes for 12 dollars",
    "Search lamp",
    "rated 4 : toy story ( 1995 ) and then apple ikea lego sony zara",
]


def padded(tokenizer, texts: list[str], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    ids, mask = pad_token_ids(token_ids(tokenizer, texts, 64))
    if side == "left":  # move every row's padding to the front
        order = torch.argsort(mask.int(), dim=1, stable=True)
        ids, mask = ids.gather(1, order), mask.gather(1, order)
    return ids, mask


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("model", ["tiny_llama", "minilm_path"])
def test_upper_layers_reproduce_the_full_model(model: str, side: str, request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue(model)
    k = 2
    full = AutoModel.from_pretrained(path).eval()
    ids, mask = padded(AutoTokenizer.from_pretrained(path), TEXTS, side)
    with torch.no_grad():
        positions = positions_from_mask(mask)
        out = full(input_ids=ids, attention_mask=mask.long(), position_ids=positions, output_hidden_states=True)
        bahe = BaheCTR(Backbone.load(path), k, n_fields=1, cfg=ModelConfig()).eval()
        top = bahe.deep(out.hidden_states[k], mask)
    assert mask.sum() < mask.numel()  # the batch really is padded
    torch.testing.assert_close(top[mask], out.last_hidden_state[mask], atol=1e-5, rtol=0)


def bahe_batch(b: int, f: int, n: int, d: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random stored vectors; lengths vary, rows alternate left/right alignment, one field is empty."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, n + 1, (b, f), generator=g)
    lengths[0, -1] = 0
    steps = torch.arange(n)
    right_aligned = (torch.arange(b) % 2 == 1)[:, None, None]
    mask = torch.where(right_aligned, steps >= n - lengths[..., None], steps < lengths[..., None])
    return {"hist": torch.randn(b, f, n, d, generator=g), "hist_mask": mask, "item": torch.randn(b, d, generator=g)}


def scramble_padding(
    batch: dict[str, torch.Tensor], key: str, mask_key: str, values: torch.Tensor
) -> dict[str, torch.Tensor]:
    """A copy of the batch whose padded positions of `key` hold other values."""
    changed = dict(batch)
    mask = batch[mask_key].bool()
    while mask.dim() < batch[key].dim():
        mask = mask[..., None]
    changed[key] = torch.where(mask, batch[key], values)
    return changed


def check_trains(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """One forward/backward: logits (B,) finite, every trainable parameter gets a finite gradient."""
    model.train()
    logits = model(batch)
    b = next(iter(batch.values())).shape[0]
    assert logits.shape == (b,) and torch.isfinite(logits).all()
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.ones(b))
    loss.backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and torch.isfinite(param.grad).all(), name
    return logits


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_qwen2", "minilm_path"])
def test_bahe_trains_and_respects_masks(model: str, request: pytest.FixtureRequest) -> None:
    backbone = Backbone.load(request.getfixturevalue(model))
    d = backbone.hidden_size
    bahe = BaheCTR(backbone, k=2, n_fields=3, cfg=ModelConfig())
    batch = bahe_batch(b=4, f=3, n=6, d=d)
    check_trains(bahe, batch)

    bahe.eval()
    with torch.no_grad():
        bahe.field_embedding.normal_()
        logits = bahe(batch)
        noisy = scramble_padding(batch, "hist", "hist_mask", torch.randn_like(batch["hist"]) * 100)
        torch.testing.assert_close(bahe(noisy), logits, atol=1e-5, rtol=0)
        # feature parallel = one pass per field
        hist, mask = batch["hist"], batch["hist_mask"]
        users = torch.stack([bahe.aggregate(hist[:, f] + bahe.field_embedding[f], mask[:, f]) for f in range(3)], dim=1)
        item = bahe.aggregate(batch["item"][:, None], torch.ones(4, 1, dtype=torch.bool))
        torch.testing.assert_close(bahe.head(users, item), logits, atol=1e-5, rtol=0)
        assert (users[0, -1] == 0).all()  # the empty field pools to zeros


@pytest.mark.parametrize("model", ["tiny_qwen2", "minilm_path"])
def test_length_one_sequences_skip_the_attention_kernel(
    model: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A length-1 sequence (BAHE's item pass) attends to itself only: its attention is its values,
    so the layers give sdpa's outputs and gradients without calling it (GQA included: tiny_qwen2)."""
    backbone = Backbone.load(request.getfixturevalue(model)).eval()  # eval: BERT's attention dropout off
    x = torch.randn(3, 1, backbone.hidden_size, generator=torch.Generator().manual_seed(0))
    mask = torch.ones(3, 1, dtype=torch.bool)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    calls = []

    def counted(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append(1)
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counted)

    def run() -> tuple[torch.Tensor, list[torch.Tensor]]:
        backbone.zero_grad()
        inputs = x.clone().requires_grad_()
        out = backbone.run_layers(inputs, mask, 0, backbone.num_layers)
        (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        # the query and key get no gradient (None) where sdpa's backward gives rounding noise
        params = [torch.zeros_like(p) if p.grad is None else p.grad for p in backbone.layers.parameters()]
        return out, [inputs.grad, *params]

    out, grads = run()
    assert calls == []
    backbone.config._attn_implementation = "sdpa"
    expected, expected_grads = run()
    assert len(calls) == len(backbone.layers)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)
    noise = 1e-4 * max(float(want.abs().max()) for want in expected_grads)  # sdpa's query and key gradients
    for grad, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, want, atol=noise, rtol=0)


def trainable(model: torch.nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def test_trainable_modes(minilm_path: Path, tiny_llama: Path) -> None:
    full = BaheCTR(Backbone.load(minilm_path), 4, 2, ModelConfig(trainable="full"))
    assert all(p.requires_grad for p in full.parameters())  # upper layers, position rows, head, fields
    assert len(full.backbone.layers) == 2 and full.backbone.embeddings is None  # lower layers freed

    lora = BaheCTR(Backbone.load(minilm_path), 4, 2, ModelConfig(trainable="lora", lora_r=4))
    names = trainable(lora)
    assert any("lora_" in n for n in names)
    assert all("lora_" in n or n.startswith("head.") or n == "field_embedding" for n in names)
    check_trains(lora, bahe_batch(2, 2, 3, 384))

    frozen = BaheCTR(Backbone.load(tiny_llama), 2, 2, ModelConfig(trainable="frozen", field_embedding=False))
    assert trainable(frozen) == {n for n, _ in frozen.head.named_parameters(prefix="head")}

    token = TokenCTR(Backbone.load(tiny_llama), 2, ModelConfig(trainable="full"))
    names = trainable(token)
    assert not any(n.startswith("backbone.embeddings") for n in names)
    assert all(p.requires_grad for p in token.backbone.layers.parameters())


def test_left_truncation_keeps_most_recent_tokens(tiny_llama: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    history = [["Purchase nike shoes", "Search lamp", "rated 5 : heat ( 1995 )"], []]
    batch = tokenize_histories(tokenizer, [history], ["Purchase lego bricks"], max_length=6)
    content = tokenizer(BEHAVIOR_SEPARATOR.join(history[0]), add_special_tokens=False)["input_ids"]
    assert batch["hist_input_ids"][0, 0].tolist() == [tokenizer.bos_token_id] + content[-5:]
    assert batch["hist_attention_mask"][0, 0].all() and not batch["hist_attention_mask"][0, 1].any()
    assert batch["item_input_ids"][0].tolist() == tokenizer("Purchase lego bricks")["input_ids"]


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_qwen2"])
def test_token_ctr_trains_and_respects_masks(model: str, request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue(model)
    token = TokenCTR(Backbone.load(path), 2, ModelConfig(token_max_length=12))
    histories = [
        [TEXTS[:2], TEXTS],
        [[TEXTS[2]], []],  # an empty field
        [TEXTS[1:], TEXTS[:1]],
    ]
    batch = tokenize_histories(AutoTokenizer.from_pretrained(path), histories, TEXTS, token.max_length)
    check_trains(token, batch)
    token.eval()
    with torch.no_grad():
        logits = token(batch)
        for side in ("hist", "item"):
            ids = batch[f"{side}_input_ids"]
            noisy = scramble_padding(batch, f"{side}_input_ids", f"{side}_attention_mask", torch.full_like(ids, 7))
            torch.testing.assert_close(token(noisy), logits, atol=1e-5, rtol=0)


def test_id_ctr_trains_and_respects_masks() -> None:
    model = IdCTR(n_fields=2, cfg=ModelConfig(id_embedding_dim=8), num_buckets=1000)
    g = torch.Generator().manual_seed(0)
    batch = {
        "hist_ids": torch.randint(-(2**62), 2**62, (3, 2, 5), generator=g),
        "hist_mask": torch.rand(3, 2, 5, generator=g) > 0.4,
        "item_ids": torch.randint(-(2**62), 2**62, (3,), generator=g),
    }
    batch["hist_mask"][1, 0] = False
    check_trains(model, batch)
    model.eval()
    with torch.no_grad():
        noisy = scramble_padding(batch, "hist_ids", "hist_mask", torch.zeros_like(batch["hist_ids"]))
        torch.testing.assert_close(model(noisy), model(batch))


def test_random_weight_presets_build_both_models() -> None:
    assert preset_config("qwen2.5-0.5b").hidden_size == 896
    config = Qwen2Config(
        hidden_size=64, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=128, vocab_size=100,
    )
    bahe = BaheCTR(backbone_from_config(config), 1, 2, ModelConfig())
    check_trains(bahe, bahe_batch(2, 2, 4, 64))
    token = TokenCTR(backbone_from_config(config), 2, ModelConfig())
    ids = torch.randint(0, 100, (2, 2, 8))
    batch = {
        "hist_input_ids": ids, "hist_attention_mask": torch.ones_like(ids, dtype=torch.bool),
        "item_input_ids": ids[:, 0, :3], "item_attention_mask": torch.ones(2, 3, dtype=torch.bool),
    }
    check_trains(token, batch)


def test_user_pass_backward_runs_before_the_item_pass() -> None:
    """The order that keeps the peak low (see _BackboneCTR): the bottom layer's backward sees the
    user sequences (length N or T) before the item's (length 1 or Ti)."""
    config = Qwen2Config(
        hidden_size=64, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=128, vocab_size=100,
    )
    ids = torch.randint(0, 100, (2, 1, 8))
    batches = {
        "bahe": bahe_batch(2, 1, 6, 64),
        "token": {"hist_input_ids": ids, "hist_attention_mask": torch.ones_like(ids, dtype=torch.bool),
                  "item_input_ids": ids[:, 0, :3], "item_attention_mask": torch.ones(2, 3, dtype=torch.bool)},
    }
    for side, batch in batches.items():
        model = BaheCTR(backbone_from_config(config), 1, 1, ModelConfig()) if side == "bahe" else \
            TokenCTR(backbone_from_config(config), 1, ModelConfig())
        lengths: list[int] = []
        model.backbone.layers[0].register_full_backward_pre_hook(lambda _, grad: lengths.append(grad[0].shape[1]))
        model(batch).sum().backward()
        assert lengths == ([6, 1] if side == "bahe" else [8, 3]), side


def test_padding_told_by_the_caller_reads_no_mask_on_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """forward(batch, padded=...) gives the checked path's logits and never turns a tensor into a
    Python value (on a GPU, that read waits for every queued kernel, and CUDA graphs cannot capture it)."""
    config = Qwen2Config(
        hidden_size=64, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=128, vocab_size=100,
    )
    torch.manual_seed(0)
    bahe = BaheCTR(backbone_from_config(config), 1, 2, ModelConfig()).eval()
    token = TokenCTR(backbone_from_config(config), 2, ModelConfig()).eval()
    full = bahe_batch(3, 2, 5, 64) | {"hist_mask": torch.ones(3, 2, 5, dtype=torch.bool)}
    ids = torch.randint(0, 100, (3, 2, 8))
    token_full = {"hist_input_ids": ids, "hist_attention_mask": torch.ones_like(ids, dtype=torch.bool),
                  "item_input_ids": ids[:, 0, :3], "item_attention_mask": torch.ones(3, 3, dtype=torch.bool)}
    token_padded = token_full | {"hist_attention_mask": torch.arange(8) < torch.tensor([[8, 5], [2, 8], [6, 1]])[..., None]}
    cases = [(bahe, full, False), (bahe, bahe_batch(3, 2, 5, 64), True),
             (token, token_full, False), (token, token_padded, True)]
    with torch.no_grad():
        checked = [model(batch) for model, batch, _ in cases]
        unpadded_as_padded = bahe(full, padded=True)  # True is always correct, only slower

        def no_host_read(*_: object) -> None:
            raise AssertionError("a tensor was read on the host")

        with monkeypatch.context() as patch:
            patch.setattr(torch.Tensor, "__bool__", no_host_read)
            patch.setattr(torch.Tensor, "item", no_host_read)
            told = [model(batch, padded=padded) for model, batch, padded in cases]
            with pytest.raises(AssertionError, match="read on the host"):
                bahe(full)
    for a, b in zip(told, checked, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    torch.testing.assert_close(unpadded_as_padded, checked[0], atol=1e-5, rtol=0)
