"""`bahe ...`: one command line for every stage.

Every command takes `--config PROFILE.yaml` and any number of `--set section.key=value`
overrides (see `bahe_ray.config`). Jobs under `jobs/` call the same functions.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from bahe_ray.config import Config, dump_config, load_config

log = logging.getLogger("bahe")


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def init_ray(cfg: Config) -> None:
    """Join the cluster a job was submitted to, or the configured address, or start a local instance."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if cfg.ray.address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=cfg.ray.address, log_to_driver=True)
    else:
        ray.init(address="local", num_cpus=cfg.ray.num_cpus, include_dashboard=False)


def write_json(path: str | None, payload: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2) + "\n")
        log.info("wrote %s", path)


def cmd_encode(cfg: Config, args: argparse.Namespace) -> int:
    from bahe_ray.encode import run_encode

    init_ray(cfg)
    summary = run_encode(cfg)
    print(summary.format())
    write_json(args.summary_json, summary.to_dict())
    return 0


def cmd_data(cfg: Config, args: argparse.Namespace) -> int:
    from bahe_ray.encode import prepare_inputs

    events, impressions, fmt = prepare_inputs(cfg)
    print(f"events: {events}\nimpressions: {impressions}\nformat: {fmt}")
    return 0


def cmd_store(cfg: Config, args: argparse.Namespace) -> int:
    from bahe_ray.store import EmbeddingStore

    store = EmbeddingStore.read(args.path or cfg.store.path, storage=cfg.storage)
    if args.action == "info":
        print(json.dumps(store.info(), indent=2, default=str))
        return 0
    if args.action == "verify":
        report = store.verify()
        print(json.dumps(report.to_dict(), indent=2, default=str))
        return 0 if report.ok else 1
    removed = store.gc()
    print(f"removed {len(removed)} orphan part(s)")
    return 0


def cmd_bench(cfg: Config, args: argparse.Namespace) -> int:
    from bahe_ray.bench import main as bench_main

    return bench_main(cfg, args.bench_args)


def cmd_serve(cfg: Config, args: argparse.Namespace) -> int:
    from bahe_ray.serve import serve_blocking

    init_ray(cfg)
    serve_blocking(cfg)
    return 0


def cmd_show_config(cfg: Config, args: argparse.Namespace) -> int:
    print(dump_config(cfg))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bahe", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true")
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
    command("data", cmd_data, "prepare the configured input tables (MovieLens / synthetic) as parquet")
    p = command("store", cmd_store, "inspect or check an embedding store")
    p.add_argument("action", choices=["info", "verify", "gc"])
    p.add_argument("path", nargs="?", default=None, help="store path (default: store.path of the config)")
    p = command("bench", cmd_bench, "benchmarks: BAHE vs token-level training, the shallow encoder, the encode job")
    p.add_argument("bench_args", nargs=argparse.REMAINDER, metavar="{train,encode,pipeline} ...",
                   help="what to run and its options (bahe bench train -h); --config/--set go before it")
    command("serve", cmd_serve, "serve CTR scores over HTTP (Ray Serve) on serve.host:serve.port until Ctrl-C")
    command("config", cmd_show_config, "print the resolved configuration")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        cfg = load_config(args.config, args.overrides)
    except (ValueError, OSError) as err:
        print(f"bahe: bad configuration: {err}", file=sys.stderr)
        return 2
    return args.fn(cfg, args)


if __name__ == "__main__":
    sys.exit(main())
