"""`bahe bench WHAT ...` / `python -m bahe_ray.bench WHAT ...`: the benchmarks' options, and where
each result goes (OUT/NAME.json, and NAME.png for `train` and `scale`)."""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from pydantic import ValidationError

from bahe_ray.bench.encode import bench_encode
from bahe_ray.bench.harness import Result, write_result
from bahe_ray.bench.loop import bench_loop
from bahe_ray.bench.pipeline import bench_pipeline
from bahe_ray.bench.scale import bench_scale, format_scale, plot_scale
from bahe_ray.bench.serve import bench_serve, plot_serve
from bahe_ray.bench.serve_model import serving_setup
from bahe_ray.bench.store import bench_store, plot_store
from bahe_ray.bench.train import bench_train, format_train, plot_train
from bahe_ray.config import MINILM, Config, TrainConfig
from bahe_ray.models.registry import PRESETS
from bahe_ray.runtime import resolve_device


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bahe bench", description="benchmarks (see bahe_ray.bench)")
    sub = parser.add_subparsers(dest="what", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--device", default="auto", help="cuda, cpu or auto")
        p.add_argument("--out", default="outputs/bench", help="folder for NAME.json (and NAME.png)")
        p.add_argument("--name", default=None, help="output name (default: derived from the run)")

    t = sub.add_parser("train", help="training steps: BAHE against the token-level baseline")
    t.add_argument("--model", action="append", default=None,
                   help=f"preset ({', '.join(PRESETS)}), minilm-shape, {MINILM} or a folder (repeatable; "
                        "default qwen2.5-0.5b)")
    t.add_argument("--k", type=int, default=6, help="BAHE split layer")
    t.add_argument("--tokens", type=int, default=32, help="tokens per behaviour (token-level side)")
    t.add_argument("--fields", type=int, default=1, help="behaviour fields per sample, N behaviours each")
    t.add_argument("--n", type=int, nargs="+", default=[20, 50, 100, 200], help="behaviours per field")
    t.add_argument("--batch", type=int, default=8, help="the equal batch size")
    t.add_argument("--best-n", type=int, nargs="*", default=None,
                   help="N values for the best-batch search (default: --n on GPU, none on CPU)")
    t.add_argument("--budget-gb", type=float, default=80.0, help="memory budget of the best-batch search")
    t.add_argument("--max-batch", type=int, default=4096)
    t.add_argument("--warmup", type=int, default=3)
    t.add_argument("--steps", type=int, default=10)
    # The step's options: the profile's train.* (--config/--set before `train`), or these flags.
    t.add_argument("--lookup", choices=["device", "host"], default=None,
                   help="BAHE's embedding lookup: the store's table on the device (train.device_table_gb = "
                        "--budget-gb), or host store + copy (0) (default: device on GPU, host on CPU)")
    t.add_argument("--atoms", type=int, default=100_000, help="atoms in the benchmark's embedding store")
    t.add_argument("--optimizer", choices=["auto", "fused", "foreach", "for-loop"], default=None,
                   help="train.optimizer (default: the profile's)")
    t.add_argument("--precision", choices=["auto", "float32", "bfloat16"], default=None,
                   help="train.precision, the autocast dtype (default: the profile's)")
    t.add_argument("--weights-dtype", choices=["float32", "bfloat16"], default=None,
                   help="train.weights_dtype (default: the profile's)")
    t.add_argument("--compile", action="store_true", help="train.compile: torch.compile every transformer layer")
    t.add_argument("--compile-mode", choices=["default", "max-autotune-no-cudagraphs"], default=None,
                   help="train.compile_mode with --compile")
    t.add_argument("--cuda-graph", action="store_true",
                   help="train.cuda_graph: capture each side's whole training step as one CUDA graph (GPU)")
    t.add_argument("--sides", nargs="+", choices=["bahe", "token"], default=["bahe", "token"])
    common(t)

    e = sub.add_parser("encode", help="shallow encoder throughput")
    e.add_argument("--backend", choices=["transformers", "vllm"], default="transformers",
                   help="encoder backend of the --data runs (bench.encode.encode_throughput)")
    e.add_argument("--model", default=None, help="model-level run: preset, minilm-shape, MINILM or a folder")
    e.add_argument("--k", type=int, default=6)
    e.add_argument("--tokens", type=int, default=32, help="tokens per atom (model-level and random texts)")
    e.add_argument("--batch-atoms", type=int, nargs="+", default=[256, 1024, 4096, 16384],
                   help="micro-batch sizes (atoms) of the model-level run")
    e.add_argument("--texts", type=int, default=0,
                   help="also run TransformersEncoder.encode over this many random texts (random checkpoint)")
    e.add_argument("--max-batch-tokens", type=int, nargs="+", default=[16384],
                   help="TransformersEncoder max_batch_tokens values for --texts")
    e.add_argument("--data", nargs="*", choices=["movielens", "synthetic"], default=[],
                   help="also encode these sources' unique atoms with the configured encoder")
    e.add_argument("--events", type=int, default=1_000_000, help="synthetic events")
    e.add_argument("--warmup", type=int, default=3)
    e.add_argument("--steps", type=int, default=10)
    e.add_argument("--compile", action="store_true", help="torch.compile the k layers (model level and --texts)")
    common(e)

    v = sub.add_parser("serve", help="latency and throughput of POST /v1/score from concurrent clients")
    v.add_argument("--url", default=None,
                   help="a running scorer on loopback (default: start the profile's scorer, serve.checkpoint, on local Ray)")
    v.add_argument("--clients", type=int, nargs="+", default=[1, 4], help="concurrent clients, one run each")
    v.add_argument("--requests", type=int, default=10, help="timed requests per client")
    v.add_argument("--candidates", type=int, default=100)
    v.add_argument("--behaviors", type=int, default=50, help="behaviours per field")
    v.add_argument("--time-limit", type=float, default=300.0, help="seconds per run at most")
    v.add_argument("--modes", nargs="+", choices=["warm", "cold"], default=["warm", "cold"],
                   help="without --url: the scorer as configured (warm) and with its state caches off (cold)")
    v.add_argument("--model", default=None,
                   help=f"serve a new BAHE checkpoint of {MINILM}, a Qwen2 preset or folder (random weights when it "
                        "has none) and a store of random texts, written here (default: the profile's serve.checkpoint)")
    v.add_argument("--k", type=int, default=6, help="with --model: BAHE split layer")
    v.add_argument("--fields", type=int, default=2, help="with --model: behaviour fields")
    v.add_argument("--atoms", type=int, default=20_000, help="with --model: random texts in the store")
    common(v)

    lp = sub.add_parser("loop", help="BAHE's training loop end to end (local and Ray Train) against the model alone")
    lp.add_argument("--model", default="qwen2.5-0.5b", help="random-weight preset (a Qwen2 shape)")
    lp.add_argument("--k", type=int, default=6)
    lp.add_argument("--n", type=int, default=100, help="behaviours per field")
    lp.add_argument("--batch", type=int, default=256)
    lp.add_argument("--epochs", type=int, default=2)
    lp.add_argument("--no-ray", action="store_true", help="skip the Ray Train runs")
    lp.add_argument("--no-local", action="store_true", help="skip the run without Ray (train_local)")
    lp.add_argument("--workers", type=int, nargs="+", default=[1],
                    help="Ray Train worker counts, one run each (train.num_workers; one GPU per worker on GPU); "
                         "--batch is per worker; with 1 in the list each run reports its scaling efficiency")
    lp.add_argument("--warmup", type=int, default=3)
    lp.add_argument("--steps", type=int, default=10)
    common(lp)
    p = sub.add_parser("pipeline", help="the Ray Data encode job against a plain loop (local Ray)")
    p.add_argument("--data", choices=["movielens", "synthetic"], default="movielens")
    p.add_argument("--events", type=int, default=1_000_000, help="synthetic events")
    common(p)
    sc = sub.add_parser("scale", help="time and memory of data, encode, samples and one epoch against the log's size")
    sc.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 3_000_000, 10_000_000],
                    help="events in the synthetic log, one run of every stage per size")
    sc.add_argument("--events-per-atom", type=int, default=10,
                    help="the vocabulary grows by one behaviour per this many events")
    sc.add_argument("--events-per-user", type=int, default=100, help="one user per this many events")
    sc.add_argument("--n", type=int, default=50, help="samples.max_behaviors: behaviours per field")
    sc.add_argument("--workdir", default=None,
                    help="where the logs, store, samples and runs go (default: a temporary folder, deleted after)")
    sc.add_argument("--interval", type=float, default=0.25, help="seconds between memory samples")
    sc.add_argument("--add-to", default=None, metavar="JSON",
                    help="an earlier scale result (same settings): its sizes are kept next to these in the output")
    common(sc)
    st = sub.add_parser("store", help="a big store read at once by 2 Ray Train workers and 1 Serve replica")
    st.add_argument("--atoms", type=int, default=10_000_000, help="atoms in the random float16 store")
    st.add_argument("--dim", type=int, default=384)
    st.add_argument("--part-rows", type=int, default=250_000, help="atoms per part file")
    st.add_argument("--seconds", type=float, default=20.0, help="timed lookups per reader")
    st.add_argument("--workdir", default=None,
                    help="where the store and its node layout go (default: a temporary folder, deleted after)")
    common(st)
    return parser


def train_options(cfg: Config, args: argparse.Namespace, device: str) -> TrainConfig:
    """The step's options: the profile's train.* with the flags given on top (pydantic checks them)."""
    flags = {"optimizer": args.optimizer, "precision": args.precision, "weights_dtype": args.weights_dtype,
             "compile_mode": args.compile_mode}
    lookup = args.lookup or ("device" if device.startswith("cuda") else "host")
    options = cfg.train.model_dump() | {key: value for key, value in flags.items() if value is not None} | {
        "use_gpu": device.startswith("cuda"), "num_workers": 1,
        "compile": args.compile or cfg.train.compile, "cuda_graph": args.cuda_graph or cfg.train.cuda_graph,
        "device_table_gb": args.budget_gb if lookup == "device" else 0.0,
    }
    return TrainConfig.model_validate(options)


def run_train(args: argparse.Namespace, train: TrainConfig) -> list[Path]:
    device = resolve_device(args.device)
    best_n = args.best_n if args.best_n is not None else (args.n if device.startswith("cuda") else [])
    written = []
    for model in args.model or ["qwen2.5-0.5b"]:
        variant = ("-compiled" if train.compile else "") + ("-graph" if train.cuda_graph else "")
        name = args.name or f"train-{Path(model).name}-{device.split(':')[0]}{variant}"
        result = bench_train(
            model, k=args.k, tokens=args.tokens, fields=args.fields, ns=args.n, equal_batch=args.batch,
            best_ns=best_n, budget_gb=args.budget_gb, max_batch=args.max_batch, warmup=args.warmup,
            steps=args.steps, train=train, atoms=args.atoms, sides=tuple(args.sides), device=device,
            progress=lambda partial: write_result(partial, args.out, name),
        )
        written.append(write_result(result, args.out, name, plot_train))
        print(format_train(result))
    return written


def run_encode(cfg: Config, args: argparse.Namespace) -> Path:
    device = resolve_device(args.device)
    result = bench_encode(
        cfg, backend=args.backend, model=args.model, k=args.k, tokens=args.tokens, batch_atoms=args.batch_atoms,
        texts=args.texts, max_batch_tokens=args.max_batch_tokens, data=args.data, events=args.events,
        warmup=args.warmup, steps=args.steps, compile=args.compile, device=device,
    )
    path = write_result(result, args.out, args.name or f"encode-{device.split(':')[0]}")
    print(json.dumps({k: v for k, v in result.items() if k != "env"}, indent=1))
    return path


def run_serve(cfg: Config, args: argparse.Namespace) -> Path:
    """One load run per --clients value (and mode) against --url, or against the profile's scorer started here."""
    keys = ("mode", "clients", "requests", "p50_ms", "p99_ms", "requests_per_s", "scores_per_s", "breakdown_ms")
    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            cfg = serving_setup(cfg, args.model, args.k, args.fields, args.behaviors, args.atoms, tmp,
                                 resolve_device(args.device))
        result = bench_serve(cfg, args.url, args.clients, args.requests, args.candidates, args.behaviors,
                             args.time_limit, args.modes,
                             progress=lambda row: print(json.dumps({k: row[k] for k in keys})))
    if args.model:
        result["model"] = {"model": args.model, "k": args.k, "fields": args.fields, "atoms": args.atoms}
    device = "gpu" if cfg.serve.use_gpu else "cpu"
    return write_result(result, args.out, args.name or f"serve-{device}", plot_serve)


def run_loop(cfg: Config, args: argparse.Namespace) -> Path:
    device = resolve_device(args.device)
    workers = "" if args.workers == [1] else "-workers-" + "-".join(map(str, args.workers))
    name = args.name or f"loop-{Path(args.model).name}-{device.split(':')[0]}{workers}"
    with tempfile.TemporaryDirectory() as tmp:
        result = bench_loop(cfg, args.model, args.k, args.n, args.batch, args.epochs, tmp, device,
                            not args.no_ray, args.warmup, args.steps, args.workers, not args.no_local,
                            progress=lambda partial: write_result(partial, args.out, name))
    path = write_result(result, args.out, name)
    print(json.dumps({k: v for k, v in result.items() if k != "env"}, indent=1))
    return path


def run_pipeline(cfg: Config, args: argparse.Namespace) -> Path:
    with tempfile.TemporaryDirectory() as tmp:
        result = bench_pipeline(cfg, args.data, args.events, tmp)
    path = write_result(result, args.out, args.name or f"pipeline-{args.data}")
    print(json.dumps({k: v for k, v in result.items() if k not in ("env", "encoder")}, indent=1))
    return path


def run_scale(cfg: Config, args: argparse.Namespace) -> Path:
    """Every stage at every --sizes value, next to the sizes of an --add-to result; OUT/NAME.json after each size."""
    name = args.name or "scale"
    earlier = json.loads(Path(args.add_to).read_text())["sizes"] if args.add_to else None

    def run(workdir: str) -> Result:
        return bench_scale(cfg, args.sizes, workdir, args.events_per_atom, args.events_per_user, args.n, args.interval,
                           earlier, progress=lambda partial: write_result(partial, args.out, name, plot_scale))

    if args.workdir:
        result = run(args.workdir)
    else:
        with tempfile.TemporaryDirectory(prefix="bahe-scale-") as tmp:
            result = run(tmp)
    path = write_result(result, args.out, name, plot_scale)
    print(format_scale(result))
    return path


def run_store(cfg: Config, args: argparse.Namespace) -> Path:
    def run(workdir: str) -> Path:
        result = bench_store(cfg, args.atoms, args.dim, args.part_rows, args.seconds, workdir)
        print(json.dumps({k: v for k, v in result.items() if k != "env"}, indent=1))
        return write_result(result, args.out, args.name or f"store-{args.atoms}", plot_store)

    if args.workdir:
        return run(args.workdir)
    with tempfile.TemporaryDirectory(prefix="bahe-store-") as tmp:
        return run(tmp)


def main(cfg: Config, argv: list[str]) -> int:
    """`bahe bench WHAT ...` (cfg from bahe's --config/--set)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.what == "train":
        try:
            train = train_options(cfg, args, resolve_device(args.device))
        except ValidationError as error:  # e.g. --cuda-graph on CPU: a usage error, before any model is built
            parser.error("; ".join(e["msg"].removeprefix("Value error, ") for e in error.errors()))
        run_train(args, train)
    elif args.what == "store":
        run_store(cfg, args)
    else:
        runs = {"encode": run_encode, "serve": run_serve, "loop": run_loop, "pipeline": run_pipeline,
                "scale": run_scale}
        runs[args.what](cfg, args)
    return 0
