"""`bench pipeline`: the Ray Data encode job against the same job as a plain loop in this process,
on MovieLens-100K or synthetic events."""

from __future__ import annotations

from pathlib import Path

import torch

from bahe_ray.bench.harness import Result
from bahe_ray.config import Config
from bahe_ray.runtime import environment, init_ray


def bench_pipeline(cfg: Config, source: str, events: int, workdir: str | Path) -> Result:
    """The Ray Data encode job (`run_encode`, local Ray) against the same job in this process
    without Ray (`run_encode_local`: dedup, encode in calls of encoder.batch_size, write parts,
    commit), both on inputs prepared (read, validated) once before either is timed."""
    from bahe_ray.data.prepare import prepare_inputs
    from bahe_ray.encode import run_encode, run_encode_local

    work = Path(workdir)
    cfg = cfg.model_copy(deep=True)
    cfg.data.source = source  # type: ignore[assignment]
    cfg.data.synthetic.n_events = events
    cfg.data.prepared_path = str(work / "data")
    cfg.store.path, cfg.rejects_path = str(work / "ray-store"), str(work / "rejects")
    prepare_inputs(cfg, use_ray=False)
    init_ray(cfg)
    summary = run_encode(cfg)

    plain_cfg = cfg.model_copy(deep=True)
    plain_cfg.store.path = str(work / "plain-store")
    plain = run_encode_local(plain_cfg, device="cpu")
    return {
        "bench": "pipeline", "env": environment("cpu"), "source": source, "unique_atoms": summary.unique_atoms,
        "encoder": cfg.encoder.model_dump(mode="json"),
        "ray": {"seconds": summary.seconds, "encoded": summary.encoded,
                "atoms_per_s": round(summary.encoded / summary.seconds, 1)},
        "plain": {"seconds": plain.seconds, "encoded": plain.encoded,
                  "atoms_per_s": round(plain.encoded / plain.seconds, 1), "torch_threads": torch.get_num_threads()},
        "ray_over_plain_time": round(summary.seconds / plain.seconds, 2),
    }
