"""The training step (`bahe_ray.train.TrainStep`) and what feeds it, on CPU: the options and their checks,
the step against the plain one, AdamW implementations, bf16 weights, BAHE's device table against the
host path, fixed-shape batches and the padding hint. The captured CUDA graph: tests/test_bench.py (gpu)."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from transformers import AutoTokenizer, Qwen2Config

from bahe_ray.bench import random_store
from bahe_ray.checkpoint import CheckpointMeta, load_checkpoint, load_weights, save_checkpoint
from bahe_ray.config import Config, ModelConfig, TrainConfig, load_config, with_overrides
from bahe_ray.features import (
    MissingVectorsError,
    ModelBatch,
    SampleArrays,
    TokenCache,
    bahe_batch,
    bahe_row_batch,
    id_batch,
    token_batch,
)
from bahe_ray.models.backbone import backbone_from_config
from bahe_ray.models.ctr import BaheCTR, IdCTR, TokenCTR
from bahe_ray.samples import read_split_table
from bahe_ray.train import (
    BatchInputs,
    DeviceTable,
    TableSource,
    TrainStep,
    device_table,
    fit,
    initial_model,
    make_optimizer,
    training_inputs,
)
from bahe_ray.train.loop import full_batches

TINY = Qwen2Config(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=128, vocab_size=300, max_position_embeddings=512)


def tiny_bahe(seed: int = 0) -> BaheCTR:
    torch.manual_seed(seed)
    return BaheCTR(backbone_from_config(TINY), 1, 2, ModelConfig(head_hidden=[16]))


def vector_batch(b: int = 4, n: int = 5, d: int = 64, seed: int = 0) -> tuple[ModelBatch, torch.Tensor]:
    """BAHE tensors with padding (one row's field is empty) and labels."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(n) < torch.randint(1, n + 1, (b, 2, 1), generator=g)
    mask[0, 1] = False
    tensors = {"hist": torch.randn(b, 2, n, d, generator=g), "hist_mask": mask, "item": torch.randn(b, d, generator=g)}
    return ModelBatch(tensors, padded=True), torch.randint(0, 2, (b,), generator=g).float()


def plain_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor],
               labels: torch.Tensor, grad_clip: float) -> torch.Tensor:
    """The training step as it was before TrainStep (train_step: fp32 on CPU, the mask checked by the model)."""
    loss = F.binary_cross_entropy_with_logits(model(batch).float(), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], grad_clip)
    optimizer.step()
    return loss.detach()


def trained(tc: TrainConfig, steps: int = 3) -> tuple[list[float], BaheCTR]:
    model = tiny_bahe()
    step = TrainStep(model, make_optimizer(model, tc), tc, "cpu")
    torch.manual_seed(1)  # dropout
    losses = [step(*vector_batch(seed=i)).item() for i in range(steps)]
    return losses, model


# ---- options ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("sets", "message"), [
    (["train.cuda_graph=true"], r"train.cuda_graph: the whole-step CUDA graph needs a GPU \(train.use_gpu: true\)"),
    (["train.cuda_graph=true", "train.use_gpu=true", "train.num_workers=2"], r"train.cuda_graph: one worker only"),
    (["train.compile_mode=default"], r"train.compile_mode: applies with train.compile: true"),
    (["train.compile=true", "train.compile_mode=reduce-overhead"], r"train.compile_mode"),
    (["train.optimizer=adam"], r"train.optimizer"),
    (["train.weights_dtype=float16"], r"train.weights_dtype"),
    (["train.device_table_gb=-1"], r"train.device_table_gb"),
])
def test_step_options_are_checked_with_the_field_named(sets: list[str], message: str) -> None:
    with pytest.raises(ValidationError, match=message) as error:
        load_config(None, sets)
    assert "train" in str(error.value)


def test_defaults_leave_the_cpu_step_as_it_was() -> None:
    tc = TrainConfig()
    assert (tc.optimizer, tc.precision, tc.weights_dtype, tc.compile, tc.cuda_graph, tc.device_table_gb) == (
        "auto", "auto", "float32", False, False, 0.0)
    optimizer = make_optimizer(tiny_bahe(), tc)
    assert optimizer.defaults["fused"] is None and optimizer.defaults["foreach"] is None
    assert not optimizer.defaults["capturable"]
    gpu = load_config(Path(__file__).resolve().parents[1] / "configs" / "gpu_cluster.yaml").train
    assert gpu.optimizer == "fused" and gpu.compile and gpu.device_table_gb > 0


# ---- the step --------------------------------------------------------------------------------


def test_eager_step_equals_the_plain_step() -> None:
    """Same loss and same weights after three steps as the step before TrainStep, on a tiny BAHE."""
    tc = TrainConfig()
    model, reference = tiny_bahe(), tiny_bahe()
    step = TrainStep(model, make_optimizer(model, tc), tc, "cpu")
    optimizer = make_optimizer(reference, tc)
    for i in range(3):
        batch, labels = vector_batch(seed=i)
        torch.manual_seed(i)
        got = step(batch, labels)
        torch.manual_seed(i)
        want = plain_step(reference, optimizer, batch.tensors, labels, tc.grad_clip)
        assert got.requires_grad is False and torch.equal(got, want)
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(a, b)
    assert all(p.grad is None for p in model.parameters())  # dropped after the step


@pytest.mark.parametrize("optimizer", ["foreach", "for-loop", "fused"])
def test_adamw_implementations_train_alike(optimizer: str) -> None:
    want_losses, want = trained(TrainConfig())
    got_losses, got = trained(TrainConfig(optimizer=optimizer))
    implementation = make_optimizer(got, TrainConfig(optimizer=optimizer)).defaults
    assert (implementation["fused"], implementation["foreach"]) == {
        "foreach": (None, True), "for-loop": (None, False), "fused": (True, None)}[optimizer]
    assert got_losses == pytest.approx(want_losses, abs=1e-6)
    for a, b in zip(got.parameters(), want.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_the_id_baseline_gets_no_padding_hint() -> None:
    tc = TrainConfig()
    model = IdCTR(2, ModelConfig(id_embedding_dim=8, head_hidden=[8]), 64)
    arrays = sample_ids(np.array([[[1, 2, 0], [3, 0, 0]], [[4, 5, 6], [7, 8, 9]]]), [10, 11])
    batch = id_batch(arrays)
    assert batch.padded and set(batch.tensors) == {"hist_ids", "hist_mask", "item_ids"}
    loss = TrainStep(model, make_optimizer(model, tc), tc, "cpu")(batch, torch.tensor([0.0, 1.0]))
    assert torch.isfinite(loss)


def test_bf16_weights_train_and_their_checkpoint_roundtrips(tiny_llama: Path, tmp_path: Path) -> None:
    cfg = load_config(None, [f"encoder.model={tiny_llama}", "encoder.k=2", "train.weights_dtype=bfloat16",
                             "model.head_hidden=[16]"])
    model = initial_model("bahe", cfg)
    assert {p.dtype for p in model.backbone.parameters()} == {torch.bfloat16}
    assert model.head.mlp[0].weight.dtype == torch.float32
    optimizer = make_optimizer(model, cfg.train)
    step = TrainStep(model, optimizer, cfg.train, "cpu")
    before = model.backbone.layers[0].mlp.up_proj.weight.detach().clone()
    losses = [step(*vector_batch(d=128, seed=i)).item() for i in range(3)]
    assert all(np.isfinite(losses)) and not torch.equal(before, model.backbone.layers[0].mlp.up_proj.weight)
    assert {s["exp_avg"].dtype for s in optimizer.state.values()} >= {torch.bfloat16}
    meta = CheckpointMeta(model_kind="bahe", config=cfg.model_dump(mode="json"), fields=list(cfg.samples.fields),
                          max_behaviors=5, dim=128)
    save_checkpoint(str(tmp_path / "ckpt"), model, meta, optimizer=optimizer)
    served, _ = load_checkpoint(str(tmp_path / "ckpt"))  # evaluation and serving: fp32 of the bf16 values
    resumed = initial_model("bahe", cfg)  # resuming: bf16 again, bit for bit
    load_weights(str(tmp_path / "ckpt"), resumed)
    for name, value in model.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name
        assert torch.equal(served.state_dict()[name], value.float()), name


@pytest.mark.slow  # compiling on two shared cores takes minutes
def test_compiled_layers_train_as_eager_ones() -> None:
    eager_losses, eager = trained(TrainConfig())
    compiled_losses, compiled = trained(TrainConfig(compile=True))
    assert all(layer._compiled_call_impl is not None for layer in compiled.backbone.layers)
    assert compiled_losses == pytest.approx(eager_losses, abs=1e-5)
    for a, b in zip(compiled.parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


# ---- batches: device table, fixed shapes, padding --------------------------------------------


def sample_ids(hist: np.ndarray, items: list[int]) -> SampleArrays:
    """SampleArrays of (B, F, N) ids, 0 = padding (right-aligned histories are fine too)."""
    return SampleArrays(hist_ids=hist.astype(np.int64), hist_mask=hist != 0, item_ids=np.array(items, np.int64),
                        labels=np.arange(len(items), dtype=np.float32) % 2, user_ids=[str(i) for i in range(len(items))])


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory):
    return random_store(tmp_path_factory.mktemp("store") / "store", 8, 50)


def store_arrays(store, fixed_rows: bool = False) -> SampleArrays:
    """Histories of the store's atoms: padded, two rows sharing a history, N = 6 with used width 4."""
    ids = store.ids()
    hist = np.zeros((4, 2, 6), np.int64)
    hist[0, 0, :3], hist[0, 1, :1] = ids[:3], ids[3:4]
    hist[1] = hist[0]
    hist[2, 0, :4], hist[2, 1, 2:4] = ids[5:9], ids[9:11]
    hist[3, 0, :2] = ids[11:13]
    if fixed_rows:
        hist[:, :, :] = ids[:48].reshape(4, 2, 6)
    return sample_ids(hist, list(ids[20:24]))


@pytest.mark.parametrize("fixed", [False, True])
def test_device_table_batches_equal_the_host_path(store, fixed: bool) -> None:
    arrays = store_arrays(store)
    host = bahe_batch(arrays, store, fixed=fixed)
    table = DeviceTable(store, "cpu", torch.float32)
    rows = bahe_row_batch(arrays, table, fixed=fixed)
    assert set(rows.tensors) == {"hist_rows", "hist_mask", "item_rows"} | (set() if fixed else {"user_index"})
    assert rows.padded == host.padded is True
    expanded = table.expand(rows.tensors)
    assert expanded.keys() == host.tensors.keys()
    for key, value in host.tensors.items():
        assert torch.equal(expanded[key], value), key
    width = 6 if fixed else 4
    assert host.tensors["hist"].shape == ((4 if fixed else 3), 2, width, 8)
    absent = sample_ids(arrays.hist_ids, [*store.ids()[:3], 12345])  # rows 0 and 1 share one history
    with pytest.raises(MissingVectorsError, match="0 of 12 behaviours and 1 of 4 items"):
        bahe_row_batch(absent, table)


def test_the_padding_hint_says_whether_a_mask_has_padding(store, tiny_llama: Path) -> None:
    full = store_arrays(store, fixed_rows=True)
    for arrays, padded in ((full, False), (store_arrays(store), True)):
        assert bahe_batch(arrays, store).padded is padded
        assert bahe_batch(arrays, store, fixed=True).padded is padded
        assert id_batch(arrays).padded is padded
    texts = {int(i): f"rated {int(i) % 5} : toy story" for i in store.ids()}
    cache = TokenCache(AutoTokenizer.from_pretrained(tiny_llama), 40, lambda ids: [texts[int(i)] for i in ids])
    one = sample_ids(np.array([[[store.ids()[0]]]]), [int(store.ids()[1])])
    assert token_batch(one, cache).padded is False  # one sequence of each kind: nothing to pad
    fixed = token_batch(full, cache, fixed=True)
    assert fixed.padded and fixed.tensors["hist_input_ids"].shape == (4, 2, 40)
    assert fixed.tensors["item_input_ids"].shape == (4, 40)
    loose = token_batch(full, cache).tensors
    width = loose["hist_input_ids"].shape[-1]
    assert torch.equal(fixed.tensors["hist_input_ids"][..., :width], loose["hist_input_ids"])


def test_fixed_shape_training_pads_to_n_and_drops_the_partial_batch(store) -> None:
    """Under train.cuda_graph every training batch has one shape (B, F, N): no trimming, no shared rows,
    and an epoch's last partial batch is dropped. Batching only: the capture itself needs CUDA."""
    tc = TrainConfig(use_gpu=True, cuda_graph=True, batch_size=4)
    inputs = BatchInputs("bahe", ["a", "b"], 6, 8, store=store)
    fixed = training_inputs(inputs, tc, "cpu")
    assert fixed.fixed_shape and fixed.table is None  # no device_table_gb: the host path
    batch = fixed.batch(store_arrays(store), "cpu")
    assert batch.tensors["hist"].shape == (4, 2, 6, 8) and "user_index" not in batch.tensors
    rows = pa.table({"n": np.arange(10)})
    kept = list(full_batches(TableSource(rows, tc.batch_size, seed=0).batches(1), tc.batch_size))
    assert [t.num_rows for t in kept] == [4, 4]
    assert not training_inputs(inputs, TrainConfig(), "cpu").fixed_shape


def test_the_device_table_is_used_when_it_fits_the_budget(store, caplog: pytest.LogCaptureFixture) -> None:
    size = DeviceTable.nbytes(store, torch.bfloat16)
    assert size == (store.num_atoms + 1) * 8 * 2
    caplog.set_level("INFO", logger="bahe_ray.train.device_table")
    assert device_table(store, "cpu", torch.bfloat16, 0.0) is None
    assert device_table(store, "cpu", torch.bfloat16, (size - 1) / 1e9) is None
    table = device_table(store, "cpu", torch.bfloat16, size / 1e9)
    assert table is not None and table.vectors.dtype == torch.bfloat16 and table.vectors.shape == (51, 8)
    assert not table.vectors[table.zero_row].any()
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 3 and all("looked up on the host per batch" in m for m in said[:2])
    assert "resident on cpu" in said[2]
    inputs = BatchInputs("bahe", ["a", "b"], 6, 8, store=store)
    tc = TrainConfig(device_table_gb=1.0, weights_dtype="bfloat16")
    assert training_inputs(inputs, tc, "cpu").table.vectors.dtype == torch.bfloat16


def test_a_bahe_step_on_device_table_rows_equals_one_on_host_vectors(store) -> None:
    """The gather inside the step gives the host path's training step (same loss, same weights)."""
    config = copy.deepcopy(TINY)
    config.hidden_size, config.intermediate_size = 8, 16
    config.num_attention_heads, config.num_key_value_heads = 2, 1
    models = []
    for table in (None, DeviceTable(store, "cpu", torch.float32)):
        torch.manual_seed(0)
        model = BaheCTR(backbone_from_config(config), 1, 2, ModelConfig(head_hidden=[4]))
        tc = TrainConfig()
        step = TrainStep(model, make_optimizer(model, tc), tc, "cpu", table)
        arrays = store_arrays(store)
        batch = bahe_row_batch(arrays, table) if table is not None else bahe_batch(arrays, store)
        torch.manual_seed(1)
        models.append((step(batch, torch.from_numpy(arrays.labels)), model))
    (loss_a, a), (loss_b, b) = models
    assert torch.equal(loss_a, loss_b)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)


def test_training_on_the_device_table_gives_the_host_paths_metrics(ml: Config) -> None:
    """The whole loop (training and validation batches) with the store's table resident (here on the CPU):
    the epoch's loss and validation metrics of the host path."""
    train_rows = read_split_table(ml.samples.path, "train", ml.storage)
    val_rows = read_split_table(ml.samples.path, "val", ml.storage)
    runs = []
    for budget in (0.0, 1.0):
        cfg = with_overrides(ml, [f"train.device_table_gb={budget}", "train.max_epochs=1"])
        [epoch] = fit(cfg, "bahe", TableSource(train_rows, 32, seed=7), TableSource(val_rows, 128)).history
        runs.append({key: epoch[key] for key in ("train_loss", "train_samples", "val_auc", "val_logloss", "val_gauc")})
    assert runs[1] == pytest.approx(runs[0], abs=1e-6)


@pytest.mark.gpu
def test_device_table_on_cuda_gives_the_host_batch(store) -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    arrays = store_arrays(store)
    host = bahe_batch(arrays, store)
    table = DeviceTable(store, "cuda", torch.float32)
    rows = bahe_row_batch(arrays, table, "cuda")
    assert table.vectors.is_cuda and all(value.is_cuda for value in rows.tensors.values())
    for key, value in table.expand(rows.tensors).items():
        assert torch.equal(value.cpu(), host.tensors[key]), key


def test_token_model_takes_the_hint() -> None:
    """TokenCTR and BaheCTR take `padded`; the step passes it (a wrong False would change the logits)."""
    model = TokenCTR(backbone_from_config(TINY), 1, ModelConfig(head_hidden=[8]))
    ids = torch.randint(0, 300, (2, 1, 6))
    mask = torch.tensor([[[True] * 6], [[True] * 3 + [False] * 3]])
    batch = ModelBatch({"hist_input_ids": ids, "hist_attention_mask": mask, "item_input_ids": ids[:, 0, :2],
                        "item_attention_mask": torch.ones(2, 2, dtype=torch.bool)}, padded=True)
    tc = TrainConfig()
    assert torch.isfinite(TrainStep(model, make_optimizer(model, tc), tc, "cpu")(batch, torch.tensor([1.0, 0.0])))
