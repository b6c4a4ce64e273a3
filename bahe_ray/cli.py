"""`bahe ...`: one command line for every stage.

Every command takes `--config PROFILE.yaml` and any number of `--set section.key=value`
overrides (see `bahe_ray.config`). Jobs under `jobs/` call the same functions.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

from bahe_ray.config import MODEL_KINDS, Config, dump_config, load_config
from bahe_ray.logs import ray_logs_note, setup_logging
from bahe_ray.runtime import init_ray, use_serve_throughput_mode

log = logging.getLogger("bahe")


def write_json(path: str | None, payload: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2) + "\n")
        log.info("wrote %s", path)


def cmd_encode(cfg: Config, args: argparse.Namespace) -> int:
    from bahe_ray.encode import run_encode, run_encode_local

    if args.no_ray:
        summary = run_encode_local(cfg)
    else:
        init_ray(cfg)
        summary = run_encode(cfg)
    print(summary.format())
    write_json(args.summary_json, summary.to_dict())
    return 0


def cmd_data(cfg: Config, args: argparse.Namespace) -> int:
    """Prepare the inputs (read, validate, write) unless these inputs were prepared already."""
    from bahe_ray.data.prepare import prepare_inputs

    init_ray(cfg)
    prepared = prepare_inputs(cfg, use_ray=True)
    print(json.dumps(prepared.to_dict(), indent=2))
    return 0


def cmd_store(cfg: Config, args: argparse.Namespace) -> int:
    from bahe_ray.store import EmbeddingStore

    store = EmbeddingStore.read(args.path or cfg.store.path, storage=cfg.storage)
    if args.action == "info":
        print(json.dumps(store.info().to_dict(), indent=2))
        return 0
    if args.action == "verify":
        report = store.verify()
        print(json.dumps(report.to_dict(), indent=2, default=str))
        return 0 if report.ok else 1
    if args.action == "compact":
        result = store.compact(args.target_part_rows or cfg.store.compact_part_rows)
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    removed = store.gc(args.min_age_s)
    print(f"removed {len(removed)} unreferenced file(s)")
    return 0


def cmd_bench(cfg: Config, args: argparse.Namespace) -> int:
    from bahe_ray.bench import main as bench_main

    return bench_main(cfg, args.bench_args)


def invocation() -> str:
    """This process's command line, for reports (program name without its folder)."""
    return shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])


def ensure_samples(cfg: Config) -> None:
    """Build the sample table (with Ray) unless one as configured (fields, N, protocol) exists."""
    from bahe_ray.samples import build_configured_samples, read_summary

    try:
        summary = read_summary(cfg.samples.path, cfg.storage)
        if summary.matches(cfg.samples):
            return
    except FileNotFoundError:
        pass
    init_ray(cfg)
    build_configured_samples(cfg)


def cmd_samples(cfg: Config, args: argparse.Namespace) -> int:
    from bahe_ray.samples import build_configured_samples

    init_ray(cfg)
    summary = build_configured_samples(cfg)
    print(json.dumps(summary.to_dict(), indent=2))
    return 0


def cmd_train(cfg: Config, args: argparse.Namespace) -> int:
    from bahe_ray.train import train_local, train_ray

    ensure_samples(cfg)
    command = invocation()
    if args.no_ray:
        report = train_local(cfg, command)
    else:
        init_ray(cfg)
        report = train_ray(cfg, command)
    print(json.dumps({k: report[k] for k in ("run_dir", "best_checkpoint", "best_epoch", "test", "summary")}, indent=2))
    write_json(args.report_json, report)
    return 0


def cmd_evaluate(cfg: Config, args: argparse.Namespace) -> int:
    from bahe_ray.train import evaluate_checkpoint

    result = evaluate_checkpoint(args.checkpoint, args.split, cfg.storage, args.samples, args.store, args.device)
    print(json.dumps(result.metrics, indent=2))
    if args.scores:
        import pyarrow.parquet as pq

        Path(args.scores).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(result.scores, args.scores)
        log.info("wrote %d scores to %s", result.scores.num_rows, args.scores)
    return 0


def cmd_compare(cfg: Config, args: argparse.Namespace) -> int:
    from bahe_ray.train import compare

    ensure_samples(cfg)
    command = invocation()
    table = compare(args.config, args.overrides, cfg.train.output_dir, not args.no_ray, command, tuple(args.kinds),
                    tuple(args.seeds) if args.seeds else None, args.reuse, args.parallel)
    print((Path(cfg.train.output_dir) / "compare.md").read_text())
    return 0 if table["rows"] else 1


def cmd_serve(cfg: Config, args: argparse.Namespace) -> int:
    use_serve_throughput_mode()
    from bahe_ray.serve import serve_blocking

    init_ray(cfg)
    serve_blocking(cfg)
    return 0


def cmd_demo(cfg: Config, args: argparse.Namespace) -> int:
    from bahe_ray.workflow import run_demo

    init_ray(cfg)
    print(run_demo(cfg).format(cfg))
    return 0


def cmd_daily_update(cfg: Config, args: argparse.Namespace) -> int:
    from bahe_ray.workflow import daily_update

    init_ray(cfg)
    result = daily_update(cfg, args.day_events, args.day_impressions)
    print(json.dumps(result, indent=2, default=str))
    write_json(args.report_json, result)
    return 0


def cmd_show_config(cfg: Config, args: argparse.Namespace) -> int:
    print(dump_config(cfg))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bahe", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging, and Ray's own output on the terminal (default: its session log folder)")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, fn: Callable[[Config, argparse.Namespace], int], help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--config", default=None, help="YAML profile (default: built-in defaults)")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a setting, e.g. --set encoder.k=3 (repeatable)")
        p.set_defaults(fn=fn)
        return p

    p = command("encode", cmd_encode, "encode new atoms of the configured logs into the embedding store")
    p.add_argument("--summary-json", default=None, help="also write the run summary here")
    p.add_argument("--no-ray", action="store_true", help="run in this process without Ray (same results)")
    command("data", cmd_data, "prepare the configured input tables (MovieLens / synthetic) as parquet")
    p = command("store", cmd_store, "inspect, check, compact or clean an embedding store")
    p.add_argument("action", choices=["info", "verify", "compact", "gc"])
    p.add_argument("path", nargs="?", default=None, help="store path (default: store.path of the config)")
    p.add_argument("--target-part-rows", type=int, default=None,
                   help="compact: rows per merged part (default: store.compact_part_rows)")
    p.add_argument("--min-age-s", type=float, default=0.0,
                   help="gc: keep files younger than this, and the parts of versions replaced since (readers)")
    p = command("bench", cmd_bench,
                "benchmarks: BAHE vs token-level training, the shallow encoder, the training loop, the encode job, "
                "the scorer, the pipeline against the log's size")
    p.add_argument("bench_args", nargs=argparse.REMAINDER, metavar="{train,encode,loop,pipeline,serve,scale} ...",
                   help="what to run and its options (bahe bench train -h); --config/--set go before it")
    command("samples", cmd_samples, "build the point-in-time sample table from the configured inputs")
    p = command("train", cmd_train, "train train.model_kind (builds the sample table if missing)")
    p.add_argument("--no-ray", action="store_true", help="train in this process without Ray (e.g. the GPU machine)")
    p.add_argument("--report-json", default=None, help="also write the run report (metrics.json content) here")
    p = command("evaluate", cmd_evaluate, "score one split of the sample table with a checkpoint")
    p.add_argument("--checkpoint", required=True, help="checkpoint folder (local or s3://)")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--samples", default=None, help="sample table path (default: the one the checkpoint recorded)")
    p.add_argument("--store", default=None, help="embedding store path (default: the one the checkpoint recorded)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--scores", default=None, help="write per-sample scores to this parquet file")
    p = command("compare", cmd_compare, "train model kinds on the same split; table of AUC per slice, time, memory")
    p.add_argument("--no-ray", action="store_true", help="train without Ray (the sample table must exist)")
    p.add_argument("--kinds", nargs="+", default=list(MODEL_KINDS), choices=MODEL_KINDS, help="model kinds to train")
    p.add_argument("--seeds", nargs="+", type=int, default=None,
                   help="train every kind once per seed (train.seed); default: once with the configured seed")
    p.add_argument("--reuse", action="store_true",
                   help="keep a run whose report (<kind>[-seed<s>].json in train.output_dir) came from the same command")
    p.add_argument("--parallel", type=int, default=1,
                   help="train up to this many seeds of a kind at once (their times are then shared)")
    command("serve", cmd_serve, "serve CTR scores over HTTP (Ray Serve) on serve.host:serve.port until Ctrl-C")
    command("demo", cmd_demo, "the local default end to end: encode, samples, train, evaluate, serve a request")
    p = command("daily-update", cmd_daily_update,
                "encode a new day's logs, rebuild samples over all logs, warm-start training from the last best")
    p.add_argument("--day-events", required=True, help="the new day's behaviour events (file or folder)")
    p.add_argument("--day-impressions", default=None, help="the new day's impressions (file or folder)")
    p.add_argument("--report-json", default=None, help="also write the result here")
    command("config", cmd_show_config, "print the resolved configuration")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)  # the terminal gets our lines; Ray's own output its session log folder
    try:
        cfg = load_config(args.config, args.overrides)
    except (ValueError, OSError) as err:
        print(f"bahe: bad configuration: {err}", file=sys.stderr)
        return 2
    try:
        return args.fn(cfg, args)
    finally:
        note = ray_logs_note()  # the last line: where Ray's own logs went (also after a failure)
        if note:
            print(note, flush=True)


if __name__ == "__main__":
    sys.exit(main())
