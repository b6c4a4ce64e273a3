"""Benchmarks: BAHE against the token-level baseline, the shallow encoder, the training loop, the Ray
encode job, the scorer (`bahe bench WHAT ...`, or `python -m bahe_ray.bench WHAT ...`).

  train     training-step time, samples/s and peak memory of BaheCTR and TokenCTR (`bench.train`,
            on the product's step, `train.TrainStep`, set up in `bench.step`)
  encode    the shallow encoder's atoms/s and TFLOP/s; through `encode()`; on real atoms (`bench.encode`)
  loop      BAHE's training loop end to end, locally and on Ray Train, against the step alone (`bench.loop`)
  pipeline  the Ray Data encode job against a plain loop over the same encoder (`bench.pipeline`)
  scale     time and memory of data, encode, samples and one epoch against the log's size (`bench.scale`)
  serve     latency and requests/s of POST /v1/score from concurrent clients on loopback (`bench.serve`)
  store     one big store read at once by 2 Ray Train workers and 1 Serve replica: node memory, lookups/s,
            version pickup (`bench.store`)

Models are random-weight presets of real shapes (`models.registry.preset_config`), "minilm-shape" (a
random BERT of all-MiniLM-L6-v2's shape) or real checkpoints (MINILM, a local folder); speed does not
depend on the weights. Timing, FLOP counts and the batch search are shared (`bench.harness`); the
options and output names are in `bench.cli`. Only public APIs of the other packages are used.
"""

from bahe_ray.bench.cli import main
from bahe_ray.bench.encode import (
    bench_encode,
    bench_encode_model,
    bench_encode_source,
    bench_encode_texts,
    encode_throughput,
    random_checkpoint,
    random_texts,
)
from bahe_ray.bench.harness import (
    attention_width,
    best_trial,
    forward_flops,
    free_memory,
    layer_parameters,
    matmul_peak_tflops,
    search_batch,
    time_calls,
    write_result,
)
from bahe_ray.bench.loop import bench_loop, loop_scaling
from bahe_ray.bench.pipeline import bench_pipeline
from bahe_ray.bench.scale import bench_scale, plot_scale
from bahe_ray.bench.serve import bench_serve, run_serve_benchmark
from bahe_ray.bench.step import TrainSide, random_store
from bahe_ray.bench.train import bench_train, format_train, plot_train

__all__ = [
    "TrainSide", "attention_width", "bench_encode", "bench_encode_model",
    "bench_encode_source", "bench_encode_texts", "bench_loop", "bench_pipeline", "bench_scale", "bench_serve",
    "bench_train",
    "best_trial", "encode_throughput", "format_train", "forward_flops", "free_memory", "layer_parameters", "loop_scaling",
    "main",
    "matmul_peak_tflops", "plot_scale", "plot_train", "random_checkpoint", "random_store", "random_texts",
    "run_serve_benchmark",
    "search_batch", "time_calls", "write_result",
]
