"""Training on real MovieLens rows with the real MiniLM: batches, metrics, checkpoints, the plain loop,
Ray Train (2 gloo workers, S3 output, one injected worker failure) and evaluation."""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from ray import cloudpickle
from sklearn.metrics import roc_auc_score
from token_oracle import tokenize_histories
from transformers import AutoTokenizer

from bahe_ray.checkpoint import (
    META_FILE,
    MODEL_FILE,
    CheckpointCorruptError,
    CheckpointMeta,
    build_model,
    load_checkpoint,
    load_optimizer_state,
    save_checkpoint,
)
from bahe_ray.cli import main as cli_main
from bahe_ray.config import Config, dump_config, load_config, with_overrides
from bahe_ray.features import MissingVectorsError, TokenCache, bahe_batch, make_batch, sample_arrays, token_batch
from bahe_ray.samples import read_split_table
from bahe_ray.train import (
    EpochStats,
    Stopwatch,
    TableSource,
    TrainState,
    compare,
    evaluate_checkpoint,
    fit,
    gauc,
    initial_model,
    make_optimizer,
    prefetched,
    train_local,
    train_ray,
)
from bahe_ray.train.report import json_safe

REPO = Path(__file__).resolve().parents[1]
FIELDS = ["liked", "disliked"]
TIMING = {"train_seconds", "train_cpu_seconds", "data_wait_seconds", "epoch_seconds", "samples_per_s", "peak_memory_mb"}

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers run `fail_once`; they cannot import this module


# ---- batches and metrics -------------------------------------------------------------------


def history_table(histories: list[list[list[int]]], items: list[int]) -> pa.Table:
    columns = {
        "user_id": [f"u{i % 2}" for i in range(len(items))],
        "item_atom_id": pa.array(items, pa.int64()),
        "label": pa.array([i % 2 for i in range(len(items))], pa.int8()),
    }
    for f, name in enumerate(FIELDS):
        columns[f"hist_{name}"] = pa.array([h[f] for h in histories], pa.list_(pa.int64()))
    return pa.table(columns)


@pytest.mark.parametrize("model", ["minilm_path", "tiny_llama", "tiny_qwen2"])
def test_token_batch_equals_tokenize_histories(model: str, request: pytest.FixtureRequest) -> None:
    tokenizer = AutoTokenizer.from_pretrained(request.getfixturevalue(model))
    texts = {100 + i: t for i, t in enumerate([
        "rated 5/5: Toy Story (1995) | Animation, Children's, Comedy", "Purchase nike shoes for 12 dollars",
        "Search lamp near ikea", "rated 2/5: Heat (1995) | Action, Crime, Thriller", "rated 4 : casino ( 1995 )",
    ])}
    rng = np.random.default_rng(0)
    histories = [[rng.choice(list(texts), size=rng.integers(0, 8)).tolist() for _ in FIELDS] for _ in range(6)]
    histories[0][1] = []  # an empty field
    items = rng.choice(list(texts), size=6).tolist()
    arrays = sample_arrays(history_table(histories, items), FIELDS, max_behaviors=5)
    looked_up: list[int] = []

    def text_source(ids: np.ndarray) -> list[str]:
        looked_up.extend(ids.tolist())
        return [texts[int(i)] for i in ids]

    for max_length in (12, 128):
        cache = TokenCache(tokenizer, max_length, text_source)
        got = token_batch(arrays, cache).tensors
        recent = [[[texts[i] for i in field[-5:]] for field in h] for h in histories]
        want = tokenize_histories(tokenizer, recent, [texts[i] for i in items], max_length)
        assert got.keys() == want.keys()
        for key in want:
            assert torch.equal(got[key], want[key]), key
        calls = len(looked_up)
        token_batch(arrays, cache)
        assert len(looked_up) == calls, "each atom is tokenised once"
    assert len(looked_up) == 2 * len(set(looked_up))


class DictVectors:
    """A VectorSource over a dict, as the Serve scorer would pass (store + fresh encodings)."""

    def __init__(self, vectors: dict[int, np.ndarray], dim: int = 3) -> None:
        self.vectors = vectors
        self.dim = dim

    def lookup_with_mask(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        found = np.array([int(i) in self.vectors for i in ids.reshape(-1)], dtype=bool).reshape(ids.shape)
        out = np.stack([self.vectors.get(int(i), np.zeros(self.dim, np.float32)) for i in ids.reshape(-1)])
        return out.reshape(*ids.shape, self.dim), found


def test_bahe_batch_reads_vectors_of_real_behaviours_only() -> None:
    vectors = DictVectors({i: np.full(3, i, np.float32) for i in range(1, 8)})
    arrays = sample_arrays(history_table([[[1, 2], [3]], [[4], []]], [5, 6]), FIELDS, max_behaviors=10)
    batch = bahe_batch(arrays, vectors).tensors
    assert batch["hist"].shape == (2, 2, 2, 3), "cut after the longest history, not padded to N"
    assert batch["hist"][0, 0, :, 0].tolist() == [1, 2] and batch["hist"][1, 1].abs().sum() == 0
    assert batch["hist_mask"].tolist() == [[[True, True], [True, False]], [[True, False], [False, False]]]
    assert batch["item"][:, 0].tolist() == [5, 6]
    missing = sample_arrays(history_table([[[1, 99], [98]], [[4], []]], [5, 97]), FIELDS, max_behaviors=10)
    with pytest.raises(MissingVectorsError, match="2 of 4 behaviours and 1 of 2 items"):
        bahe_batch(missing, vectors)


def test_prefetched_keeps_order_raises_producer_errors_and_stops_when_closed() -> None:
    assert list(prefetched(iter(range(10)), 2)) == list(range(10)) == list(prefetched(iter(range(10)), 0))

    def failing() -> Iterator[int]:
        yield 1
        raise MissingVectorsError("3 of 9 behaviours have no stored vector")

    batches = prefetched(failing(), 2)
    assert next(batches) == 1
    with pytest.raises(MissingVectorsError, match="3 of 9"):
        next(batches)
    produced: list[int] = []

    def counting() -> Iterator[int]:
        for i in range(1000):
            produced.append(i)
            yield i

    with closing(prefetched(counting(), 2)) as batches:
        assert next(batches) == 0
    assert len(produced) <= 5, "closing stops the producer"


def test_stopwatch_counts_the_wait_for_items_not_the_loop_body() -> None:
    def slow() -> Iterator[int]:
        for i in range(3):
            time.sleep(0.05)
            yield i

    waited = Stopwatch()
    seen = []
    for item in waited.iterate(slow()):
        time.sleep(0.2)  # the "training step": not waiting for data
        seen.append(item)
    assert seen == [0, 1, 2]
    assert 0.15 <= waited.seconds < 0.6  # counting the body too would give >= 0.75; the rest is a busy box's slack


@pytest.mark.gpu
def test_batches_built_on_the_gpu_equal_the_cpu_ones() -> None:
    """On CUDA, BAHE's batch is gathered on the device from one row per distinct atom; same values as on CPU."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    vectors = DictVectors({i: np.full(3, i, np.float32) for i in range(1, 8)})
    arrays = sample_arrays(history_table([[[1, 2], [3]], [[4], []], [[1, 2], [3]]], [5, 6, 5]), FIELDS, max_behaviors=10)
    for kind in ("bahe", "id"):
        on_cpu, on_gpu = make_batch(kind, arrays, "cpu", vectors).tensors, make_batch(kind, arrays, "cuda", vectors).tensors
        assert on_cpu.keys() == on_gpu.keys()
        for key, value in on_gpu.items():
            assert value.device.type == "cuda"
            assert torch.equal(value.cpu(), on_cpu[key]), key


def test_shared_histories_run_once_with_identical_scores(minilm_path: Path) -> None:
    """A user's candidates share one history row (serving); the scores equal one row per sample."""
    from bahe_ray.config import ModelConfig
    from bahe_ray.models.backbone import Backbone
    from bahe_ray.models.ctr import BaheCTR

    torch.manual_seed(0)
    d = 384
    vectors = DictVectors({i: np.random.default_rng(i).normal(size=d).astype(np.float32) for i in range(1, 12)}, d)
    arrays = sample_arrays(history_table([[[1, 2], [3]], [[1, 2], [3]], [[4], [5]], [[1, 2], [3]]], [6, 7, 8, 9]),
                           FIELDS, max_behaviors=10)
    shared = bahe_batch(arrays, vectors).tensors
    assert shared["hist"].shape[0] == 2 and shared["user_index"].tolist() == [0, 0, 1, 0]
    model = BaheCTR(Backbone.load(minilm_path), 2, len(FIELDS), ModelConfig()).eval()
    expanded = {"hist": shared["hist"][shared["user_index"]], "hist_mask": shared["hist_mask"][shared["user_index"]],
                "item": shared["item"]}
    with torch.no_grad():
        torch.testing.assert_close(model(shared), model(expanded), rtol=1e-5, atol=1e-5)


def test_gauc_is_the_impression_weighted_per_user_auc() -> None:
    rng = np.random.default_rng(1)
    users = rng.choice([f"u{i}" for i in range(40)], size=600)
    labels = rng.integers(0, 2, size=600)
    scores = rng.choice(np.linspace(0, 1, 7), size=600)  # many ties
    labels[users == "u0"] = 1  # a user with one label only is left out
    per_user = [(roc_auc_score(labels[users == u], scores[users == u]), (users == u).sum())
                for u in np.unique(users) if len(np.unique(labels[users == u])) == 2]
    expected = sum(a * n for a, n in per_user) / sum(n for _, n in per_user)
    assert gauc(labels, scores, users) == pytest.approx(expected, abs=1e-12)
    assert math.isnan(gauc(np.ones(3), np.ones(3), ["a", "b", "c"]))


# ---- checkpoints ---------------------------------------------------------------------------


def small_id_checkpoint(folder: Path) -> tuple[torch.nn.Module, Config]:
    cfg = load_config(None, ["model.id_buckets=64", "model.id_embedding_dim=8", "model.head_hidden=[8]"])
    model = build_model("id", cfg)
    meta = CheckpointMeta(model_kind="id", config=cfg.model_dump(mode="json"), fields=FIELDS, max_behaviors=5, dim=8)
    save_checkpoint(str(folder), model, meta)
    return model, cfg


def test_checkpoint_roundtrip_and_corruption_is_refused(tmp_path: Path) -> None:
    model, cfg = small_id_checkpoint(tmp_path / "ok")
    loaded, meta = load_checkpoint(str(tmp_path / "ok"))
    assert meta.model_kind == "id" and meta.cfg == cfg and not loaded.training
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)

    def damaged(name: str, damage) -> Path:
        folder = tmp_path / name
        shutil.copytree(tmp_path / "ok", folder)
        path = folder / MODEL_FILE
        path.write_bytes(damage(path.read_bytes()))
        return folder

    flipped = damaged("flipped", lambda b: b[:-5] + bytes([b[-5] ^ 1]) + b[-4:])
    truncated = damaged("truncated", lambda b: b[: len(b) // 2])
    for folder in (flipped, truncated):
        with pytest.raises(CheckpointCorruptError, match=rf"{folder.name}/model.safetensors: sha256 differs"):
            load_checkpoint(str(folder))

    # A consistent record of weights that do not fit the model: a missing tensor.
    from safetensors.torch import load_file, save_file

    folder = damaged("missing-key", lambda b: b)
    tensors = load_file(folder / MODEL_FILE)
    tensors.pop("head.mlp.0.bias")
    save_file(tensors, folder / MODEL_FILE)
    record = json.loads((folder / META_FILE).read_text())
    import hashlib

    record["model_sha256"] = hashlib.sha256((folder / MODEL_FILE).read_bytes()).hexdigest()
    (folder / META_FILE).write_text(json.dumps(record))
    with pytest.raises(CheckpointCorruptError, match=r"missing-key/model.safetensors: .*head.mlp.0.bias"):
        load_checkpoint(str(folder))
    (folder / META_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="missing checkpoint.json"):
        load_checkpoint(str(folder))


def test_warm_start_takes_the_previous_weights(tmp_path: Path) -> None:
    previous, cfg = small_id_checkpoint(tmp_path / "yesterday")
    warm = initial_model("id", with_overrides(cfg, [f"train.resume_from={tmp_path / 'yesterday'}", "train.seed=5"]))
    for key, value in previous.state_dict().items():
        assert torch.equal(warm.state_dict()[key], value)
    with pytest.raises(ValueError, match="holds a 'id' model, not 'bahe'"):
        initial_model("bahe", with_overrides(cfg, [f"train.resume_from={tmp_path / 'yesterday'}"]))


def test_optimizer_state_roundtrips_through_safetensors_on_s3(s3_server) -> None:
    cfg = load_config(None, ["model.id_buckets=64", "model.id_embedding_dim=8", "model.head_hidden=[8]"])
    model = build_model("id", cfg)
    optimizer = make_optimizer(model, cfg.train)
    batch = {"hist_ids": torch.tensor([[[1, 2], [3, 0]]]), "hist_mask": torch.tensor([[[True, True], [True, False]]]),
             "item_ids": torch.tensor([4])}
    model(batch).sum().backward()
    optimizer.step()
    folder = f"{s3_server.new_bucket()}/ckpt"
    meta = CheckpointMeta(model_kind="id", config=cfg.model_dump(mode="json"), fields=FIELDS, max_behaviors=2, dim=8)
    save_checkpoint(folder, model, meta, s3_server.storage, optimizer=optimizer)
    fresh, _ = load_checkpoint(folder, s3_server.storage)
    restored = make_optimizer(fresh, cfg.train)
    load_optimizer_state(folder, restored, s3_server.storage)
    want, got = optimizer.state_dict(), restored.state_dict()
    assert got["param_groups"] == json.loads(json.dumps(want["param_groups"]))  # betas: list, not tuple
    for index, state in want["state"].items():
        for name, value in state.items():
            assert torch.equal(got["state"][index][name], value)


# ---- training ------------------------------------------------------------------------------


def test_plain_fit_same_seed_same_metrics(ml: Config) -> None:
    train_rows = read_split_table(ml.samples.path, "train", ml.storage)
    val_rows = read_split_table(ml.samples.path, "val", ml.storage)
    runs = []
    for _ in range(2):
        result = fit(ml, "bahe", TableSource(train_rows, 32, seed=7), TableSource(val_rows, 128))
        runs.append([{k: v for k, v in e.items() if k not in TIMING} for e in result.history])
    assert runs[0] == runs[1] and len(runs[0]) == 2
    assert runs[0][0]["train_samples"] == 128 and runs[0][0]["val_samples"] == len(val_rows)


def test_early_stopping_stops(ml: Config) -> None:
    # With negligible learning rates the validation AUC cannot improve: stop after `patience` epochs.
    cfg = with_overrides(ml, ["train.lr=1e-12", "train.head_lr=1e-12", "train.patience=2", "train.max_epochs=6",
                              "model.id_buckets=4096"])
    train_rows = read_split_table(cfg.samples.path, "train", cfg.storage)
    val_rows = read_split_table(cfg.samples.path, "val", cfg.storage)
    result = fit(cfg, "id", TableSource(train_rows, 32, seed=0), TableSource(val_rows, 128))
    assert [e["epoch"] for e in result.history] == [1, 2, 3]
    assert result.state.stopped_early and result.state.best_epoch == 1


@pytest.mark.parametrize("kind", ["bahe", "token", "id"])
def test_local_run_exports_best_and_evaluation_reproduces_it(ml: Config, kind: str, tiny_llama: Path,
                                                             tmp_path: Path) -> None:
    # The token baseline runs on the tiny Llama here (texts from the same store), to stay fast.
    sets = [f"train.output_dir={tmp_path / 'out'}", f"train.model_kind={kind}", "model.id_buckets=4096"]
    if kind == "token":
        sets += [f"encoder.model={tiny_llama}", "model.token_max_length=64", "train.max_epochs=1"]
    cfg = with_overrides(ml, sets)
    report = train_local(cfg, "pytest")
    run_dir = Path(report["run_dir"])
    assert json.loads((run_dir / "metrics.json").read_text())["test"] == report["test"]
    assert (run_dir / "training_curves.png").read_bytes()[:4] == b"\x89PNG"
    best = str(tmp_path / "out" / "best")
    val = evaluate_checkpoint(best, "val")
    for name in ("auc", "logloss", "gauc"):
        assert val.metrics[name] == pytest.approx(report["best_val"][f"val_{name}"], abs=1e-6)
    scores = tmp_path / "scores.parquet"
    assert cli_main(["evaluate", "--checkpoint", best, "--split", "test", "--scores", str(scores)]) == 0
    test = evaluate_checkpoint(best, "test")
    assert test.metrics == report["test"]
    assert pq.read_table(scores).equals(test.scores)


def fail_once(flag: str) -> Callable[[TrainState, EpochStats], None]:
    """An epoch callback for `train_ray`: rank 0 raises after its first reported checkpoint while `flag`
    exists, deleting it first (so the restarted group does not fail again)."""

    def callback(state: TrainState, stats: EpochStats) -> None:
        import ray.train

        if ray.train.get_context().get_world_rank() == 0 and os.path.exists(flag):
            os.remove(flag)
            raise RuntimeError(f"injected failure after epoch {stats.epoch}")

    return callback


def test_ray_train_resumes_after_a_worker_failure(ml: Config, s3_server, tmp_path: Path) -> None:
    """2 CPU workers (gloo), checkpoints and reports on S3; rank 0 fails once after epoch 1."""
    import s3fs

    out = f"{s3_server.new_bucket()}/train"
    cfg = with_overrides(ml, [f"train.output_dir={out}", f"storage.endpoint_url={s3_server.endpoint}",
                              "train.num_workers=2", "train.cpus_per_worker=1", "train.max_epochs=2", "train.patience=0"])
    flag = tmp_path / "fail-once"
    flag.touch()
    report = train_ray(cfg, "pytest", on_epoch=[fail_once(str(flag))])
    assert not flag.exists() and report["restarts"] == 1
    assert [e["epoch"] for e in report["epochs"]] == [1, 2]
    assert all(e["train_samples"] == 128 for e in report["epochs"])
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server.endpoint})
    run_dir = f"{out}/{report['run']}"[5:]
    names = {p.rsplit("/", 1)[-1] for p in fs.ls(run_dir)}
    assert {"epoch_001", "epoch_002", "metrics.json", "training_curves.png"} <= names
    assert {p.rsplit("/", 1)[-1] for p in fs.ls(f"{run_dir}/epoch_002")} >= {
        "model.safetensors", "optimizer.safetensors", "checkpoint.json"}
    model, meta = load_checkpoint(f"{out}/best", cfg.storage)
    assert meta.model_kind == "bahe" and meta.epoch == report["best_epoch"]
    assert meta.encoder_fingerprint_id and meta.fields == FIELDS and meta.max_behaviors == 10
    test = evaluate_checkpoint(f"{out}/best", "test", cfg.storage)
    assert test.metrics == report["test"]
    val = evaluate_checkpoint(f"{out}/best", "val", cfg.storage)  # in training: sharded over 2 ranks
    assert val.metrics["auc"] == pytest.approx(report["best_val"]["val_auc"], abs=1e-6)


def test_two_ray_workers_train_as_one_with_the_same_global_batch(ml: Config, tmp_path: Path) -> None:
    """DDP over 2 gloo workers of batch 16 against 1 worker of batch 32 (`train.batch_size` is per worker), the
    whole train split each epoch (no cap), no dropout.

    The rows of a global batch differ between the two runs (Ray Data's streaming split hands blocks to the ranks
    as they ask, and each rank shuffles its own shard), so the curves can agree only as far as the order of the
    rows does not matter. With learning rates 10x under the defaults an epoch moves the weights little: the
    order changes the epoch's loss by about the square of that move, the run's dynamics (how far an epoch goes
    down) to first order. So: per-epoch mean training loss within 1% and validation logloss within 2% (measured
    in two runs: at most 0.4% and 0.65%), the loss drop from epoch 1 to 2 within half the 1-worker drop
    (measured: 18% and 29% apart; two 1-worker runs alone differ by 0.3% in loss, the shard's read order is not
    fixed). Not the validation AUC: this close to the start the model is near chance on 81 validation rows,
    where AUC reorders on the smallest score change (0.436 against 0.471 for loglosses 0.5% apart). At the
    default rates the order alone moved the loss by 4.5% on these 639 rows. Exact: each epoch the ranks
    together train on the split once (the equal split drops at most world_size - 1 rows; a rank reading every
    row would double it), and validation covers every row once."""
    base = ["train.max_train_samples=null", "train.max_epochs=2", "train.patience=0", "model.dropout=0",
            "train.cpus_per_worker=1", "train.lr=1e-5", "train.head_lr=1e-4"]
    runs = {}
    for workers, batch in ((1, 32), (2, 16)):
        cfg = with_overrides(ml, [*base, f"train.num_workers={workers}", f"train.batch_size={batch}",
                                  f"train.output_dir={tmp_path / f'w{workers}'}"])
        runs[workers] = train_ray(cfg, "pytest")
    train_rows, val_rows = runs[1]["samples"]["train"], runs[1]["samples"]["val"]
    assert runs[2]["workers"] == 2 and runs[1]["workers"] == 1
    for one, two in zip(runs[1]["epochs"], runs[2]["epochs"], strict=True):
        assert one["train_samples"] == train_rows
        assert two["train_samples"] == train_rows - train_rows % 2  # not 2 x train_rows: no row trained twice
        assert one["val_samples"] == two["val_samples"] == val_rows
        assert two["train_loss"] == pytest.approx(one["train_loss"], rel=0.01)
        assert two["val_logloss"] == pytest.approx(one["val_logloss"], rel=0.02)
    drops = {w: r["epochs"][0]["train_loss"] - r["epochs"][1]["train_loss"] for w, r in runs.items()}
    assert drops[1] > 0  # it trained: the comparison is between curves that move
    assert drops[2] == pytest.approx(drops[1], rel=0.5)


def test_compare_trains_each_kind_in_a_child_process(ml: Config, tmp_path: Path) -> None:
    """`bahe compare` without Ray, one kind: the child's report, the row taken from it, and the table."""
    profile = tmp_path / "profile.yaml"
    profile.write_text(dump_config(ml))
    out = tmp_path / "compare"
    table = compare(str(profile), ["model.id_buckets=4096"], str(out), use_ray=False, command="pytest", kinds=("id",))
    report = json.loads((out / "id.json").read_text())
    assert report["model_kind"] == "id" and report["mode"] == "local" and report["run_dir"].startswith(str(out / "id"))
    assert report["command"] == (f"bahe train --config {profile} --set model.id_buckets=4096 --set train.model_kind=id "
                                 f"--set train.output_dir={out / 'id'} --report-json {out / 'id.json'} --no-ray")
    [row] = table["rows"]
    assert row["model"] == "id" and row["test_auc"] == report["test"]["auc"] and row["speedup_vs_token"] is None
    assert row["peak_memory_mb"] == report["summary"]["peak_memory_mb"] > 0
    # the file holds the table as strict JSON (intervals as lists, an empty slice's NaN as null)
    assert json.loads((out / "compare.json").read_text())["rows"] == json.loads(json.dumps(json_safe(table)))["rows"]
    assert (out / "compare.md").read_text().startswith("| model | test AUC |")
