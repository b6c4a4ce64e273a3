"""Benchmarks on tiny shapes (CPU): well-formed results, the batch search, the FLOP count, the plots.

Nothing here asserts a timing.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import Qwen2Config

from bahe_ray import bench
from bahe_ray.bench.train import optimizer_label
from bahe_ray.cli import main as cli_main
from bahe_ray.config import Config, TrainConfig, with_overrides
from bahe_ray.models.registry import load_backbone

TINY = Qwen2Config(
    hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    intermediate_size=128, vocab_size=300, max_position_embeddings=512,
)


def test_search_doubles_then_bisects_to_the_largest_fitting_batch() -> None:
    budget = 100
    tried: list[int] = []

    def measure(batch: int) -> dict:
        tried.append(batch)
        return {"batch": batch, "fits": 3 * batch + 10 <= budget, "samples_per_s": float(batch)}

    trials = bench.search_batch(measure, start=1, max_batch=1024, resolution=64)
    assert tried[:6] == [1, 2, 4, 8, 16, 32]  # doubling until the first misfit
    assert bench.best_trial(trials)["batch"] == 30  # (100 - 10) // 3
    assert len(set(tried)) == len(tried)


def test_search_stops_at_the_cap_and_reports_nothing_when_nothing_fits() -> None:
    fits_all = bench.search_batch(lambda b: {"batch": b, "fits": True, "samples_per_s": b}, 1, 8)
    assert [t["batch"] for t in fits_all] == [1, 2, 4, 8]
    none = bench.search_batch(lambda b: {"batch": b, "fits": False}, 1, 8)
    assert len(none) == 1 and bench.best_trial(none) is None


def test_measure_turns_out_of_memory_into_a_misfit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = bench.random_store(tmp_path / "store", TINY.hidden_size, 200)
    side = bench.TrainSide("bahe", TINY, 1, 1, 4, "cpu", TrainConfig(), store)
    forward = side.model.forward

    def fake_budget(tensors: dict[str, torch.Tensor], padded: bool | None = None) -> torch.Tensor:
        if tensors["hist_mask"].shape[0] > 4:  # larger batches "run out of memory"
            raise torch.cuda.OutOfMemoryError("simulated")
        return forward(tensors, padded)

    monkeypatch.setattr(side.model, "forward", fake_budget)
    oom = side.measure(8, 3, warmup=0, steps=1)
    assert oom["oom"] and not oom["fits"]
    trials = bench.search_batch(lambda b: side.measure(b, 3, warmup=0, steps=1), 1, 64, resolution=8)
    # which fitting batch is fastest depends on a noisy CPU's timing; which batches fit does not
    assert max(t["batch"] for t in trials if t["fits"]) == 4
    assert all(t["oom"] for t in trials if t["batch"] > 4)
    assert all(p.grad is None for p in side.model.parameters())  # nothing left over from the failed step


def test_flop_count_matches_a_hand_count() -> None:
    backbone = load_backbone(TINY, torch.float32, "cpu")
    # per layer: q 64x64+64, k and v 64x32+32 each, o 64x64, gate/up/down 3x64x128, two norms of 64
    per_layer = (64 * 64 + 64) + 2 * (64 * 32 + 32) + 64 * 64 + 3 * 64 * 128 + 2 * 64
    assert bench.layer_parameters(backbone) == 2 * per_layer
    assert bench.attention_width(TINY) == 64
    tokens, sequences = 8, 3
    by_hand = sequences * (2 * 2 * per_layer * tokens + 2 * 4 * tokens**2 * 64)
    assert bench.forward_flops(2 * per_layer, 2, 64, tokens, sequences) == by_hand


def test_bench_train_writes_json_and_png(tmp_path: Path) -> None:
    result = bench.bench_train(
        TINY, k=1, tokens=4, ns=[3, 5], equal_batch=2, best_ns=[3], max_batch=4, warmup=0, steps=1,
        atoms=200, device="cpu",
    )
    path = bench.write_result(result, tmp_path, "train", bench.plot_train)
    loaded = json.loads(path.read_text())
    assert (tmp_path / "train.png").stat().st_size > 0
    assert {"env", "model", "k", "tokens_per_behavior", "fields", "dtype", "lookup", "sides", "equal_batch",
            "best_batch"} <= loaded.keys()
    assert [r["n"] for r in loaded["equal_batch"]["rows"]] == [3, 5]
    row = loaded["equal_batch"]["rows"][0]
    assert {"bahe_ms", "token_ms", "speedup", "bahe_gb", "token_gb", "memory_ratio"} <= row.keys()
    for side in ("bahe", "token"):  # no budget on CPU: doubling up to the cap, best by samples/s
        search = loaded["sides"][side]["best"][0]
        assert [t["batch"] for t in search["trials"]] == [1, 2, 4]
        assert search["best"]["samples_per_s"] == max(t["samples_per_s"] for t in search["trials"])
    token = loaded["sides"]["token"]["equal"][1]
    assert token["tokens"] == 5 * 4 and token["step_ms"] > 0 and token["samples_per_s"] > 0
    assert loaded["sides"]["bahe"]["equal"][1]["tokens"] == 5


def test_step_options_reach_the_model_the_optimizer_and_the_lookup(tmp_path: Path) -> None:
    """The benchmark's TrainConfig is the product step's: layers compiled, weights dtype, AdamW, device table."""
    store = bench.random_store(tmp_path / "store", TINY.hidden_size, 100)
    train = TrainConfig(compile=True, weights_dtype="bfloat16", optimizer="for-loop", device_table_gb=1.0)
    side = bench.TrainSide("bahe", TINY, 1, 1, 4, "cpu", train, store)
    assert all(layer._compiled_call_impl is not None for layer in side.model.backbone.layers)
    assert side.model.backbone.dtype == torch.bfloat16 and side.model.head.mlp[0].weight.dtype == torch.float32
    assert side.optimizer.defaults["foreach"] is False and optimizer_label(side) == "AdamW for-loop"
    assert side.inputs.table is not None and side.inputs.table.vectors.dtype == torch.bfloat16
    batch, labels = side.batch(2, 3, seed=0)
    assert set(batch.tensors) == {"hist_rows", "hist_mask", "item_rows"} and not batch.padded and labels.shape == (2,)
    assert side.batch_ms(2, 3) > 0
    token = bench.TrainSide("token", TINY, 1, 1, 4, "cpu", TrainConfig())
    assert optimizer_label(token) == "AdamW for-loop" and token.batch_ms(2, 3) is None


def test_whole_step_cuda_graph_is_refused_without_cuda(tmp_path: Path) -> None:
    store = bench.random_store(tmp_path / "store", TINY.hidden_size, 100)
    with pytest.raises(ValueError, match=r"train.cuda_graph: the whole-step CUDA graph needs a CUDA device, not 'cpu'"):
        bench.TrainSide("bahe", TINY, 1, 1, 4, "cpu", TrainConfig(use_gpu=True, cuda_graph=True), store)


@pytest.mark.gpu
@pytest.mark.parametrize("side", ["bahe", "token"])
def test_graphed_step_trains_as_the_eager_step(side: str, tmp_path: Path) -> None:
    """The captured step (device-table lookup, both passes, backward, clipping, AdamW) updates the weights
    as eager steps on the same inputs do, through its warm-up, capture and replays; measure() reports it."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    store = bench.random_store(tmp_path / "store", TINY.hidden_size, 100)
    sides = []
    for graph in (False, True):
        torch.manual_seed(0)
        train = TrainConfig(use_gpu=True, cuda_graph=graph, precision="float32", device_table_gb=1.0)
        ts = bench.TrainSide(side, TINY, 1, 1, 4, "cuda", train, store)
        ts.model.eval()  # fp32 and no dropout: the two runs can be compared closely
        sides.append(ts)
    eager, graphed = sides
    sets = [eager.batch(2, 3, seed) for seed in range(2)]
    before = [p.detach().clone() for p in graphed.model.parameters()]
    for i in range(graphed.step.capture_calls + 3):
        eager.step(*sets[i % 2])
        graphed.step(*sets[i % 2])
    torch.cuda.synchronize()
    assert all(shape.graph is not None for shape in graphed.step.shapes.values())
    moved = max((p - b).abs().max().item() for p, b in zip(graphed.model.parameters(), before, strict=True))
    assert moved > 1e-5  # the replays trained
    for a, b in zip(graphed.model.parameters(), eager.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    row = graphed.measure(2, 3, warmup=1, steps=2)
    assert not row["oom"] and row["step_ms"] > 0 and row["peak_gb"] > 0


@pytest.mark.gpu
def test_graphs_of_new_shapes_leave_no_memory_behind(tmp_path: Path) -> None:
    """measure() captures a graph per shape; once it returns, its memory is all given back (a new
    side stream per graph used to keep cuBLAS's workspace for it, tens of MB each on an H200)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    store = bench.random_store(tmp_path / "store", TINY.hidden_size, 100)
    side = bench.TrainSide("bahe", TINY, 1, 1, 4, "cuda", TrainConfig(use_gpu=True, cuda_graph=True), store)
    held = []
    for n in (3, 5, 7, 9):
        assert not side.measure(2, n, warmup=1, steps=1)["oom"]
        bench.free_memory("cuda")
        held.append(torch.cuda.memory_allocated())
    assert held[1] == held[2] == held[3], held  # the first shape may create lasting state (optimizer moments)


def test_bench_encode_model_counts_flops_per_atom() -> None:
    result = bench.bench_encode_model(TINY, k=1, tokens=8, batch_atoms=[2, 4], device="cpu", warmup=0, steps=1)
    assert [r["atoms_per_batch"] for r in result["rows"]] == [2, 4]
    assert result["flops_per_atom"] == bench.forward_flops(result["layer_params"], 1, 64, 8, 1)
    assert result["best"]["atoms_per_s"] > 0 and result["matmul_peak_tflops"] > 0


def test_random_checkpoint_loads_in_the_encoder_with_one_token_per_character(tmp_path: Path) -> None:
    from bahe_ray.config import EncoderConfig
    from bahe_ray.encoders.hf import TransformersEncoder

    path = bench.random_checkpoint(TINY, 1, tmp_path / "ckpt")
    encoder = TransformersEncoder(EncoderConfig(model=str(path), k=1, max_tokens=12), device="cpu")
    result = bench.bench_encode_texts(encoder, bench.random_texts(10, 12), batch_size=4)
    assert result["tokens"] == 10 * 12 and result["atoms_per_s"] > 0


def test_cli_bench_train_and_encode(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--model", "minilm-shape", "--k", "5", "--n", "2", "--batch", "1", "--warmup", "0", "--steps", "1",
            "--sides", "bahe", "--atoms", "50", "--device", "cpu", "--out", str(tmp_path)]
    assert cli_main(["bench", "train", *args]) == 0
    assert (tmp_path / "train-minilm-shape-cpu.json").is_file() and (tmp_path / "train-minilm-shape-cpu.png").is_file()
    with pytest.raises(ValueError, match="vllm"):
        cli_main(["bench", "encode", "--backend", "vllm", "--model", "minilm-shape", "--out", str(tmp_path)])
    with pytest.raises(SystemExit) as refused:  # argparse's usage error, before any model is built
        cli_main(["bench", "train", *args, "--cuda-graph"])
    assert refused.value.code == 2 and "train.cuda_graph: the whole-step CUDA graph needs a GPU" in capsys.readouterr().err


@pytest.mark.usefixtures("ray_local")
def test_bench_loop_runs_the_training_loop_end_to_end_against_the_model_alone(tmp_path: Path) -> None:
    cfg = with_overrides(Config(), ["data.synthetic.n_events=3000", "data.synthetic.n_users=20",
                                    "data.synthetic.n_atoms=300", "data.synthetic.impressions_per_user=8",
                                    "data.synthetic.fields=[purchase]", "train.eval_batch_size=64",
                                    "train.materialize_splits=false"])  # the streamed path; train tests cover the other
    result = bench.bench_loop(cfg, TINY, k=1, n=12, batch=16, epochs=2, workdir=tmp_path, device="cpu",
                              use_ray=True, warmup=1, steps=2, workers=(1, 2))
    loaded = json.loads(bench.write_result(result, tmp_path, "loop").read_text())
    train = loaded["samples"]["train"]
    assert train > 32 and loaded["unique_atoms"] > 100
    model_rate = loaded["model_level"]["samples_per_s"]
    assert model_rate > 0 and len(loaded["model_level"]["step_ms_runs"]) == 2
    local, (one, two) = loaded["local"], loaded["ray"]
    assert [r["workers"] for r in (one, two)] == [1, 2] and [r["global_batch"] for r in (one, two)] == [16, 32]
    for run, workers in ((local, 1), (one, 1), (two, 2)):
        epochs = run["epochs"]
        # 2 workers: Ray Data's equal split drops at most one row, and no row is trained on twice
        assert len(epochs) == 2 and all(train - workers < e["train_samples"] <= train for e in epochs)
        assert run["samples_per_s"] == epochs[-1]["samples_per_s"] > 0
        assert run["of_model_level"] == pytest.approx(run["samples_per_s"] / workers / model_rate, abs=1e-3)
    # efficiency from the two measured rates (2 gloo workers on 2 shared cores: any value, not a constant)
    assert two["samples_per_s_per_worker"] == pytest.approx(two["samples_per_s"] / 2, abs=0.1)
    assert two["scaling_efficiency"] == pytest.approx(two["samples_per_s"] / (2 * one["samples_per_s"]), abs=1e-3)
    assert one["scaling_efficiency"] == 1.0 and two["samples_per_day"] == round(two["samples_per_s"] * 86_400)


def test_loop_scaling_efficiency_is_the_rate_over_n_times_the_one_worker_rate() -> None:
    rows = bench.loop_scaling([{"workers": w, "samples_per_s": r} for w, r in ((1, 100.0), (2, 180.0), (8, 640.0))])
    assert [r["scaling_efficiency"] for r in rows] == [1.0, 0.9, 0.8]
    assert [r["samples_per_s_per_worker"] for r in rows] == [100.0, 90.0, 80.0]
    assert rows[2]["samples_per_day"] == 640 * 86_400
    without_one = bench.loop_scaling([{"workers": 2, "samples_per_s": 180.0}])
    assert without_one[0]["scaling_efficiency"] is None and without_one[0]["samples_per_s_per_worker"] == 90.0


def test_bench_loop_refuses_a_cuda_graph_with_several_workers_before_any_work(tmp_path: Path) -> None:
    cfg = with_overrides(Config(), ["train.use_gpu=true", "train.cuda_graph=true"])
    with pytest.raises(ValueError, match="train.cuda_graph: one worker only"):
        bench.bench_loop(cfg, TINY, k=1, n=12, batch=16, epochs=1, workdir=tmp_path, device="cuda", use_ray=True,
                         warmup=0, steps=1, workers=(1, 2))
    assert not any(tmp_path.iterdir())  # no log, model or store was built
