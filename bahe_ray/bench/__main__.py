"""`python -m bahe_ray.bench [--config PROFILE] [--set KEY=VALUE ...] WHAT ...`: the same as `bahe bench`."""

from __future__ import annotations

import argparse
import sys

from bahe_ray.bench.cli import main
from bahe_ray.config import load_config
from bahe_ray.logs import setup_logging


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bahe_ray.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="YAML profile (default: built-in defaults)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting, e.g. --set encoder.k=3 (repeatable)")
    parser.add_argument("bench_args", nargs=argparse.REMAINDER, metavar="{train,encode,loop,pipeline,serve} ...",
                        help="what to run and its options (train -h); --config/--set go before it")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        cfg = load_config(args.config, args.overrides)
    except (ValueError, OSError) as err:
        print(f"bahe: bad configuration: {err}", file=sys.stderr)
        return 2
    return main(cfg, args.bench_args)


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
