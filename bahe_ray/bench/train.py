"""`bench train`: training-step time (forward + backward + AdamW step), samples/s and peak memory of
BaheCTR and TokenCTR over N behaviours of T tokens in F fields.

Both sides run the product's step (`train.TrainStep`) with the same options (a `TrainConfig`: optimizer,
precision, weights dtype, compile, whole-step CUDA graph, BAHE's device table), at one batch size, then
each at its best batch within a memory budget. BAHE's batches carry ids of a real store, looked up as
training looks them up (`bench.step`); `batch_ms` is the host's time to build one.
"""

from __future__ import annotations

import functools
import tempfile
from collections.abc import Callable
from pathlib import Path

from transformers import PretrainedConfig

from bahe_ray.bench.harness import Result, best_trial, free_memory, search_batch
from bahe_ray.bench.step import Side, TrainSide, random_store
from bahe_ray.config import TrainConfig
from bahe_ray.models.registry import model_config, model_label, weights_kind
from bahe_ray.runtime import environment, resolve_device, setup_device


def optimizer_label(side: TrainSide) -> str:
    """"AdamW fused", "AdamW foreach" or "AdamW for-loop", "capturable" added. PyTorch's own choice (neither
    asked for) is foreach for CUDA parameters and a for-loop for CPU ones."""
    defaults, on_cuda = side.optimizer.defaults, next(side.model.parameters()).is_cuda
    foreach = defaults["foreach"] or (defaults["foreach"] is None and on_cuda)
    kind = "fused" if defaults["fused"] else "foreach" if foreach else "for-loop"
    return f"AdamW {kind}" + (" capturable" if defaults["capturable"] else "")


def bench_train(
    model: str | PretrainedConfig,
    *,
    k: int,
    tokens: int = 32,
    fields: int = 1,
    ns: list[int],
    equal_batch: int = 8,
    best_ns: list[int] | None = None,
    budget_gb: float = 80.0,
    max_batch: int = 4096,
    warmup: int = 3,
    steps: int = 10,
    train: TrainConfig | None = None,
    atoms: int = 100_000,
    sides: tuple[Side, ...] = ("bahe", "token"),
    device: str = "auto",
    progress: Callable[[Result], None] | None = None,
) -> Result:
    """Both sides at `equal_batch` for every N in `ns`, then each at its best batch within `budget_gb`
    for every N in `best_ns` (search trials use the same warm-up and step counts). `train`: the step's
    options (default: TrainConfig's). `progress` gets the partial result after every measurement (a
    killed run keeps what it measured)."""
    device = resolve_device(device)
    setup_device(device)
    train = train or TrainConfig()
    config = model_config(model)
    per_side: dict[str, Result] = {}
    result: Result = {
        "bench": "train",
        "env": environment(device),
        "model": model_label(model),
        "weights": weights_kind(model),
        "k": k,
        "tokens_per_behavior": tokens,
        "fields": fields,
        "dtype": train.weights_dtype,
        "precision": train.precision,
        "optimizer": None,
        "grad_clip": train.grad_clip,
        "compile": train.compile,
        "compile_mode": train.compile_mode,
        "cuda_graph": train.cuda_graph,
        "lookup": None,
        "device_table_gb": train.device_table_gb,
        "store_atoms": atoms,
        "budget_gb": budget_gb,
        "warmup": warmup,
        "steps": steps,
        "sides": per_side,
    }

    def update() -> None:
        result["equal_batch"] = {"batch": equal_batch, "rows": compare_equal(per_side)}
        result["best_batch"] = compare_best(per_side)
        if progress is not None:
            progress(result)

    with tempfile.TemporaryDirectory() as tmp:
        store = random_store(Path(tmp) / "store", config.hidden_size, atoms) if "bahe" in sides else None
        for side in sides:
            ts = TrainSide(side, model, k, fields, tokens, device, train, store)
            result["optimizer"] = optimizer_label(ts)
            if ts.inputs is not None:
                result["lookup"] = "device" if ts.inputs.table is not None else "host"
            data: Result = {"layer_params": ts.layer_params, "layers": ts.n_layers, "equal": [], "best": []}
            per_side[side] = data
            for n in ns:
                data["equal"].append(ts.measure(equal_batch, n, warmup, steps, budget_gb))
                update()
            for n in best_ns or []:
                trials = search_batch(
                    functools.partial(ts.measure, n=n, warmup=warmup, steps=steps, budget_gb=budget_gb), 1, max_batch
                )
                data["best"].append({"n": n, "best": best_trial(trials), "trials": trials})
                update()
            del ts
            free_memory(device)
    update()
    return result


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a and b else None


def compare_equal(per_side: dict[str, Result]) -> list[Result]:
    """Per N at the equal batch: token/BAHE step time (speedup) and peak memory (memory_ratio)."""
    if len(per_side) < 2:
        return []
    rows = []
    for bahe, token in zip(per_side["bahe"]["equal"], per_side["token"]["equal"], strict=False):
        rows.append({
            "n": bahe["n"], "bahe_ms": bahe.get("step_ms"), "token_ms": token.get("step_ms"),
            "bahe_gb": bahe.get("peak_gb"), "token_gb": token.get("peak_gb"),
            "speedup": _ratio(token.get("step_ms"), bahe.get("step_ms")),
            "memory_ratio": _ratio(token.get("peak_gb"), bahe.get("peak_gb")),
        })
    return rows


def compare_best(per_side: dict[str, Result]) -> list[Result]:
    """Per N at each side's best batch: samples/s of both and their ratio."""
    if len(per_side) < 2:
        return []
    rows = []
    for bahe, token in zip(per_side["bahe"]["best"], per_side["token"]["best"], strict=False):
        b, t = bahe["best"] or {}, token["best"] or {}
        rows.append({
            "n": bahe["n"],
            "bahe_batch": b.get("batch"), "bahe_samples_per_s": b.get("samples_per_s"), "bahe_gb": b.get("reserved_gb"),
            "token_batch": t.get("batch"), "token_samples_per_s": t.get("samples_per_s"), "token_gb": t.get("reserved_gb"),
            "speedup": _ratio(b.get("samples_per_s"), t.get("samples_per_s")),
        })
    return rows


def plot_train(result: Result, path: str | Path) -> None:
    """Step time and peak memory against N at the equal batch, and best-batch samples/s against N."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sides = result["sides"]
    has_best = any(s["best"] for s in sides.values())
    fig, axes = plt.subplots(1, 3 if has_best else 2, figsize=(15 if has_best else 10, 4))
    batch = result["equal_batch"]["batch"]
    for side, data in sides.items():
        rows = [r for r in data["equal"] if not r["oom"]]
        ns = [r["n"] for r in rows]
        axes[0].plot(ns, [r["step_ms"] for r in rows], "o-", label=side)
        axes[1].plot(ns, [r["peak_gb"] for r in rows], "o-", label=side)
        if has_best:
            best = [r for r in data["best"] if r["best"]]
            axes[2].plot([r["n"] for r in best], [r["best"]["samples_per_s"] for r in best], "o-", label=side)
    axes[0].set(title=f"step time, batch {batch}", ylabel="ms per step (median)", yscale="log")
    axes[1].set(title=f"peak memory, batch {batch}", ylabel="GB", yscale="log")
    if has_best:
        axes[2].set(title=f"best batch within {result['budget_gb']:g} GB", ylabel="samples/s", yscale="log")
    for ax in axes:
        ax.set_xlabel("behaviours per sample N")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(
        f"{result['model']} ({result['weights']} weights), k={result['k']}, T={result['tokens_per_behavior']}, "
        f"F={result['fields']}, {result['dtype']} weights{', compiled' if result['compile'] else ''}"
        f"{', CUDA graph' if result['cuda_graph'] else ''}, "
        f"{result['env'].get('gpu') or '{cpu} CPU, {cpu_count} cores'.format(**result['env'])}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_train(result: Result) -> str:
    """The equal-batch and best-batch tables as text."""
    lines = [f"{result['model']} k={result['k']} T={result['tokens_per_behavior']} F={result['fields']} "
             f"weights={result['dtype']} precision={result['precision']} {result['optimizer']} lookup={result['lookup']} "
             f"compile={result['compile']} cuda_graph={result['cuda_graph']}"]
    if result["equal_batch"]["rows"]:
        lines.append(f"equal batch {result['equal_batch']['batch']}:  N  bahe_ms  token_ms  speedup  bahe_gb  token_gb  "
                     "mem_ratio")
    for r in result["equal_batch"]["rows"]:
        lines.append(f"  {r['n']:>5} {r['bahe_ms']} {r['token_ms']} {r['speedup']} {r['bahe_gb']} {r['token_gb']} {r['memory_ratio']}")
    if not result["equal_batch"]["rows"]:  # one side: its own rows
        for side, data in result["sides"].items():
            for r in data["equal"]:
                lines.append(f"  {side} batch {r['batch']} N {r['n']}: " + ("out of memory" if r["oom"] else
                             f"{r['step_ms']} ms, {r['samples_per_s']} samples/s, {r['peak_gb']} GB, "
                             f"batch built in {r['batch_ms']} ms"))
    if result["best_batch"]:
        lines.append("best batch:  N  bahe(batch, samples/s, GB)  token(batch, samples/s, GB)  speedup")
        for r in result["best_batch"]:
            lines.append(f"  {r['n']:>5} ({r['bahe_batch']}, {r['bahe_samples_per_s']}, {r['bahe_gb']}) "
                         f"({r['token_batch']}, {r['token_samples_per_s']}, {r['token_gb']}) {r['speedup']}")
    return "\n".join(lines)
