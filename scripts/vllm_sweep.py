"""The vLLM encoder on one GPU (issue 20), one measurement per process: scripts/h200_vllm.sh runs it.

  checkpoint DIR               a random-weight Qwen2.5-0.5B-shape checkpoint cut to K layers
  transformers CKPT NAME       TransformersEncoder.encode on TEXTS random texts (the reference vectors too)
  vllm CKPT NAME [options]     VLLMEncoder.encode with --set encoder.vllm_* options; --text-prompts sends
                               texts instead of our token ids, --embed-lists LLM.embed's lists of floats;
                               --profile: cProfile of one call, by vLLM part
  job BACKEND EVENTS TAG       the encode job through Ray on a synthetic log (run_encode, the product)
  table OUT                    every JSON of the parts folder as one sweep.json, and a table on stdout

  best                         the --set options of the fastest vLLM configuration measured (token prompts)
Each measurement writes SWEEP_DIR/NAME.json (default /tmp/vllm-sweep). Atoms/s are of one
call of all TEXTS texts (about 33 tokens each) after a warm-up call, the median of up to 3 calls.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bahe_ray.bench.encode import random_checkpoint, random_texts
from bahe_ray.config import EncoderConfig, load_config
from bahe_ray.runtime import environment

K = int(os.environ.get("K", "6"))
TEXTS = int(os.environ.get("TEXTS", "50000"))
CHARS = int(os.environ.get("CHARS", "33"))  # one token per character (the byte-level tokenizer has no merges)
DEVICE = os.environ.get("DEVICE", "cuda")
RESULTS = Path(os.environ.get("SWEEP_DIR", "/tmp/vllm-sweep"))
REFERENCE = 2000  # texts whose transformers vectors the vLLM runs compare against
CALL_BUDGET_S = 60.0  # stop repeating calls after this long
# Where a call's host time goes, by the file of the function (first match wins).
PROFILE_PARTS = [
    ("scheduling", ("vllm/v1/core/",)),
    ("input processing", ("vllm/v1/engine/processor", "vllm/v1/engine/input_processor", "vllm/inputs/",
                          "vllm/renderers/", "vllm/entrypoints/")),
    ("pooling", ("vllm/model_executor/layers/pooler", "vllm/v1/pool/", "vllm/pooling_params")),
    ("model and runner", ("vllm/v1/worker/", "vllm/model_executor/", "vllm/attention/", "vllm/v1/attention/",
                          "vllm/compilation/", "torch/", "vllm/forward_context", "vllm/ir/", "~:0(<built-in method torch",
                          "~:0(<method 'synchronize'", "~:0(<method 'cpu'", "~:0(<method 'to'")),
    ("output objects", ("vllm/v1/engine/output_processor", "vllm/outputs", "vllm/v1/outputs")),
    ("engine loop", ("vllm/v1/engine/", "vllm/v1/executor/", "vllm/executor/", "msgspec")),
    ("our tokenizer", ("bahe_ray/", "tokenizers", "transformers/")),
    ("copies of request parameters", ("copy.py",)),
]


def write(name: str, result: dict[str, Any]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=1, default=str))
    print(json.dumps({k: v for k, v in result.items() if k not in ("profile", "env")}, default=str), flush=True)


def timed_calls(fn: Any, texts: list[str]) -> list[float]:
    """Seconds of up to 3 calls of fn(texts) after one warm-up call on a tenth of them."""
    fn(texts[: max(1, len(texts) // 10)])
    times: list[float] = []
    while len(times) < 3 and sum(times) < CALL_BUDGET_S:
        start = time.perf_counter()
        fn(texts)
        times.append(time.perf_counter() - start)
    return times


def encoder_config(ckpt: str, sets: list[str]) -> EncoderConfig:
    base = load_config(None, [f"encoder.model={ckpt}", f"encoder.k={K}", "encoder.max_tokens=64", *sets])
    return base.encoder


def cosine_to_reference(vectors: np.ndarray) -> dict[str, float]:
    ref = np.load(RESULTS / "reference.npy")
    got = vectors[: len(ref)]
    cos = (got * ref).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1))
    return {"cosine_min": round(float(cos.min()), 6), "cosine_mean": round(float(cos.mean()), 6)}


def run_transformers(ckpt: str, name: str, sets: list[str]) -> None:
    from bahe_ray.encoders.hf import TransformersEncoder

    cfg = encoder_config(ckpt, sets)
    texts = random_texts(TEXTS, CHARS)
    start = time.perf_counter()
    encoder = TransformersEncoder(cfg, device=DEVICE)
    load_s = time.perf_counter() - start
    times = timed_calls(encoder.encode, texts)
    RESULTS.mkdir(parents=True, exist_ok=True)
    np.save(RESULTS / "reference.npy", encoder.encode(texts[:REFERENCE]))
    write(name, {"name": name, "backend": "transformers", "sets": sets, "load_s": round(load_s, 2),
                 **rates(times), "env": environment(DEVICE)})


def rates(times: list[float]) -> dict[str, Any]:
    median = statistics.median(times)
    return {"texts": TEXTS, "calls_s": [round(t, 3) for t in times], "atoms_per_s": round(TEXTS / median, 1)}


def run_vllm(ckpt: str, name: str, sets: list[str], text_prompts: bool, embed_lists: bool, profile: bool) -> None:
    import torch
    from vllm.inputs import TokensPrompt

    from bahe_ray.encoders.vllm import VLLMEncoder

    cfg = encoder_config(ckpt, ["encoder.backend=vllm", f"encoder.cache_dir={tempfile.mkdtemp()}", *sets])
    texts = random_texts(TEXTS, CHARS)
    start = time.perf_counter()
    encoder = VLLMEncoder(cfg, device=DEVICE)
    load_s = time.perf_counter() - start
    if text_prompts:  # vLLM tokenises (its own special tokens and truncation: a speed figure only)
        def call(batch: list[str]) -> np.ndarray:
            outputs = encoder.llm.encode(batch, pooling_task="embed", use_tqdm=False)
            return torch.stack([o.outputs.data for o in outputs]).float().cpu().numpy()
    elif embed_lists:  # LLM.embed: each vector a list of floats (what VLLMEncoder did before issue 20)
        def call(batch: list[str]) -> np.ndarray:
            outputs = encoder.llm.embed([TokensPrompt(prompt_token_ids=ids) for ids in encoder.atoms.ids(batch)],
                                        use_tqdm=False)
            return np.array([o.outputs.embedding for o in outputs], dtype=np.float32)
    else:
        call = encoder.encode
    times = timed_calls(call, texts)
    result: dict[str, Any] = {"name": name, "backend": "vllm", "sets": sets, "text_prompts": text_prompts,
                              "embed_lists": embed_lists,
                              "load_s": round(load_s, 2), **rates(times)}
    start = time.perf_counter()
    encoder.atoms.ids(texts)
    result["tokenize_s"] = round(time.perf_counter() - start, 3)
    if (RESULTS / "reference.npy").exists():
        result.update(cosine_to_reference(call(texts[:REFERENCE])))
    if profile:
        result["profile"] = profiled(call, texts)
    write(name, {**result, "env": environment(DEVICE)})


def profiled(call: Any, texts: list[str]) -> dict[str, Any]:
    """cProfile of one call: own time by part of vLLM (PROFILE_PARTS), and the top functions by own time.
    GPU work shows as host time waiting in the runner (torch's synchronize and copies)."""
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.runcall(call, texts)
    wall = time.perf_counter() - start
    stats = pstats.Stats(profiler).stats  # {(file, line, func): (cc, nc, tottime, cumtime, callers)}
    by_part: dict[str, float] = {}
    rows = []
    for (file, line, func), (_, calls, own, cumulative, _) in stats.items():
        where = f"{file.split('site-packages/')[-1]}:{line}({func})"
        part = next((p for p, keys in PROFILE_PARTS if any(k in where for k in keys)), "other")
        by_part[part] = by_part.get(part, 0.0) + own
        rows.append((own, cumulative, calls, where))

    def top(rows: list[tuple[float, float, int, str]]) -> list[dict[str, Any]]:
        return [{"own_s": round(o, 3), "cum_s": round(c, 3), "calls": n, "where": w} for o, c, n, w in rows[:30]]

    return {
        "wall_s_profiled": round(wall, 3),
        "own_s_by_part": {p: round(s, 3) for p, s in sorted(by_part.items(), key=lambda x: -x[1])},
        "top_own": top(sorted(rows, reverse=True)),
        "top_cumulative": top(sorted((r for r in rows if "vllm/" in r[3]), key=lambda r: -r[1])),
    }


def run_job(backend: str, events: int, tag: str, ckpt: str, sets: list[str]) -> None:
    """The encode job (Ray Data, one actor on the GPU) on a synthetic log of `events` behaviour events."""
    import ray

    from bahe_ray.encode import run_encode

    work = Path(tempfile.mkdtemp(prefix=f"job-{tag}-"))
    shared = RESULTS.parent / "vllm-job"  # the prepared log, reused by the next job; auto's table
    cfg = load_config(None, [
        "data.source=synthetic", f"data.synthetic.n_events={events}", "data.synthetic.n_atoms=100000",
        "data.synthetic.n_users=5000", f"data.prepared_path={shared / 'data'}", f"store.path={work / 'store'}",
        f"rejects_path={work / 'rejects'}", f"encoder.model={ckpt}", f"encoder.k={K}", "encoder.max_tokens=64",
        f"encoder.backend={backend}", f"encoder.num_gpus_per_actor={int(DEVICE == 'cuda')}",
        f"encoder.num_cpus_per_actor={os.environ.get('JOB_CPUS', '4')}",
        f"encoder.batch_size={os.environ.get('JOB_BATCH', '16384')}", f"encoder.cache_dir={shared / 'cache'}", *sets,
    ])
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False)
    summary = run_encode(cfg)
    ray.shutdown()
    result = summary.to_dict()
    result["atoms_per_s_end_to_end"] = round(summary.encoded / summary.seconds, 1) if summary.seconds else None
    write(f"job-{tag}", {"name": f"job-{tag}", "backend": backend, "sets": sets, "summary": result})


def table(out: Path) -> None:
    results = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))]
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(results, indent=1, default=str))
    for r in results:
        if "summary" in r:
            s = r["summary"]
            print(f"{r['name']:28s} events {s['events_read']:,} unique {s['unique_atoms']:,} encoded {s['encoded']:,} "
                  f"in {s['seconds']} s: {s['atoms_per_s_end_to_end']} atoms/s; {s['backends']}")
        else:
            print(f"{r['name']:28s} {r['atoms_per_s']:>10,.0f} atoms/s  calls {r['calls_s']}  load {r['load_s']} s"
                  f"  cos {r.get('cosine_min', '-')}  {' '.join(r['sets'])}")


def best() -> None:
    runs = [json.loads(p.read_text()) for p in RESULTS.glob("v*.json")]
    runs = [r for r in runs if not r.get("text_prompts") and not r.get("embed_lists")]
    if runs:
        print(" ".join(f"--set {s}" for s in max(runs, key=lambda r: r["atoms_per_s"])["sets"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["checkpoint", "transformers", "vllm", "job", "table", "best"])
    parser.add_argument("args", nargs="*")
    parser.add_argument("--set", action="append", default=[], dest="sets")
    parser.add_argument("--text-prompts", action="store_true")
    parser.add_argument("--embed-lists", action="store_true")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--ckpt", default="")
    a = parser.parse_args()
    if a.what == "checkpoint":
        print(random_checkpoint(os.environ.get("MODEL", "qwen2.5-0.5b"), K, a.args[0]))
    elif a.what == "transformers":
        run_transformers(a.args[0], a.args[1], a.sets)
    elif a.what == "vllm":
        run_vllm(a.args[0], a.args[1], a.sets, a.text_prompts, a.embed_lists, a.profile)
    elif a.what == "job":
        run_job(a.args[0], int(a.args[1]), a.args[2], a.ckpt, a.sets)
    elif a.what == "best":
        best()
    else:
        table(Path(a.args[0]))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
