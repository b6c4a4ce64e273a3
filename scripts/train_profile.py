"""Where each side's compiled training step spends its GPU time at N = 100, Qwen2.5-0.5B shape, k = 6.

Prints the whole-step CUDA-graph step time (as `bench train --compile --cuda-graph --weights-dtype bfloat16
--precision float32` measures it), then a profile of the same step run eagerly: kernel time by kind (GEMM, attention, inductor's fused
kernels, optimizer, other) and the top kernels. `gemm` instead times the layers' projections
forward and backward, one GEMM per projection against q/k/v and gate/up fused into one each;
`attention` times causal attention forward and backward per sdpa backend, GQA in the kernel
(as Hugging Face calls it without a mask) or with the KV heads repeated first.

On a GPU: PYTHONPATH=. python3 scripts/train_profile.py SIDE BATCH [COMPILE_MODE]  (train.compile_mode)
          PYTHONPATH=. python3 scripts/train_profile.py gemm ROWS...
          PYTHONPATH=. python3 scripts/train_profile.py attention SEQUENCES:LENGTH...
"""
import collections
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from bahe_ray.bench import TrainSide, random_store, time_calls
from bahe_ray.config import TrainConfig
from bahe_ray.models.registry import model_config
from bahe_ray.runtime import setup_device

N, MODEL = 100, "qwen2.5-0.5b"


def kind(name: str) -> str:
    n = name.lower()
    if "flash" in n or "fmha" in n or "attention" in n:
        return "attention"
    if "triton_tem" in n or any(s in n for s in ("gemm", "nvjet", "cutlass", "xmma", "sm90", "splitk")):
        return "gemm"
    if "adam" in n or "multi_tensor" in n:
        return "optimizer"
    return "triton fused" if "triton" in n else "other"


def profile_step(ts: TrainSide, batch: int) -> None:
    inputs = ts.batch(batch, N, 0)
    for _ in range(3):
        ts.step(*inputs)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            ts.step(*inputs)
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.device_type == DeviceType.CUDA]
    total = sum(e.self_device_time_total for e in kernels)
    by_kind = collections.Counter()
    for e in kernels:
        by_kind[kind(e.key)] += e.self_device_time_total
    print(f"kernel time per step {total / 2e3:.1f} ms:",
          {k: f"{v / 2e3:.1f} ms ({v / total:.0%})" for k, v in by_kind.most_common()})
    for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:25]:
        print(f"  {e.self_device_time_total / 2e3:8.2f} ms {e.count // 2:5d}x {kind(e.key):12s} {e.key[:110]}")


def gemm(rows: int) -> None:
    """Forward + backward (dX and dW) of x (rows, d) through each projection, alone and fused."""
    cfg = model_config(MODEL)
    d, heads, kv, inter = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size
    hd = d // heads
    x = torch.randn(rows, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def ms(outs: list[int], ins: int = d) -> float:
        xs = x if ins == d else torch.randn(rows, ins, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        ws = [torch.randn(o, ins, device="cuda", dtype=torch.bfloat16, requires_grad=True) for o in outs]
        gs = [torch.randn(rows, o, device="cuda", dtype=torch.bfloat16) for o in outs]

        def step(_: int) -> None:
            ys = [torch.nn.functional.linear(xs, w) for w in ws]
            torch.autograd.backward(ys, gs)

        return statistics.median(time_calls(step, "cuda", 3, 20))

    shapes = {"q,k,v": [d, kv * hd, kv * hd], "o": [d], "gate,up": [inter, inter]}
    for name, outs in shapes.items():
        flops = 6 * rows * d * sum(outs)
        alone, fused = ms(outs), ms([sum(outs)])
        print(f"rows {rows} {name:8s} alone {alone:7.2f} ms ({flops / alone / 1e9:4.0f} TFLOP/s)"
              f"  fused {fused:7.2f} ms ({flops / fused / 1e9:4.0f} TFLOP/s)")
    down = ms([d], inter)
    print(f"rows {rows} down     {down:7.2f} ms ({6 * rows * d * inter / down / 1e9:4.0f} TFLOP/s)")


def attention(sequences: int, length: int) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    cfg = model_config(MODEL)
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = cfg.hidden_size // heads

    def laid_out(h: int) -> torch.Tensor:  # (S, H, T, hd) as a view of (S, T, H, hd), as the layers make it
        x = torch.randn(sequences, length, h, hd, device="cuda", dtype=torch.bfloat16)
        return x.transpose(1, 2).requires_grad_()

    q, k, v, grad = laid_out(heads), laid_out(kv), laid_out(kv), laid_out(heads).detach()
    for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                    SDPBackend.MATH):
        for gqa in (True, False):
            def step(_: int) -> None:
                kk, vv = (k, v) if gqa else (k.repeat_interleave(heads // kv, 1), v.repeat_interleave(heads // kv, 1))
                with sdpa_kernel(backend):
                    out = torch.nn.functional.scaled_dot_product_attention(
                        q, kk, vv, is_causal=length > 1, enable_gqa=gqa)
                out.backward(grad)

            try:
                ms = f"{statistics.median(time_calls(step, 'cuda', 3, 10)):8.3f} ms"
            except RuntimeError as e:
                ms = f"unsupported ({str(e).splitlines()[0][:60]})"
            print(f"{sequences} x {length} {backend.name:20s} {'gqa' if gqa else 'repeat':6s} {ms}")


setup_device("cuda")
if sys.argv[1] in ("gemm", "attention"):
    for arg in sys.argv[2:]:
        gemm(int(arg)) if sys.argv[1] == "gemm" else attention(*map(int, arg.split(":")))
    sys.exit()
side, batch = sys.argv[1], int(sys.argv[2])
mode = sys.argv[3] if len(sys.argv) > 3 else None
with tempfile.TemporaryDirectory() as tmp:
    store = random_store(Path(tmp) / "store", model_config(MODEL).hidden_size, 100_000) if side == "bahe" else None
    options = dict(use_gpu=True, weights_dtype="bfloat16", precision="float32", compile=True, compile_mode=mode,
                   device_table_gb=80.0)
    ts = TrainSide(side, MODEL, 6, 1, 32, "cuda", TrainConfig(**options, cuda_graph=True), store)
    r = ts.measure(batch, N, 3, 10)
    print(f"{side} batch {batch} mode {mode}: graphed step {r.get('step_ms')} ms, {r.get('samples_per_s')} samples/s,"
          f" {r.get('tflops')} TFLOP/s, peak {r.get('peak_gb')} GB")
    del ts
    profile_step(TrainSide(side, MODEL, 6, 1, 32, "cuda", TrainConfig(**options), store), batch)  # eager, same layers
