"""Where a Kino training step spends its GPU time: a profiler table of one model step, and each attention
kernel timed alone at the step's shape.

  python3 benchmarks/profile_step.py --model 1B --tokens 16384            # GPU, bf16, eager
  python3 benchmarks/profile_step.py --model tiny --tokens 1024 --dtype fp32 # CPU smoke

Prints (1) the top operators by device time over `--steps` profiled steps (after warm-up), grouped the way the
hot-path work in issue 12 is planned (matmul, attention, norm/modulation, elementwise, optimizer), and
(2) forward+backward time of self-attention at (tokens, heads, head_dim) for every backend this machine runs.
"""
from __future__ import annotations

import argparse
import json
import time
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `python3 benchmarks/profile_step.py` from anywhere
from model_step import one_clip_step  # noqa: E402


def group_of(name: str) -> str:
    lowered = name.lower()
    if any(k in lowered for k in ("gemm", "matmul", "mm", "linear", "cutlass", "sm90_xmma", "nvjet")):
        return "matmul"
    if any(k in lowered for k in ("flash", "attention", "fmha", "varlen", "sdpa", "cudnn")):
        return "attention"
    if any(k in lowered for k in ("norm", "layer_norm", "rms")):
        return "norm"
    if any(k in lowered for k in ("adam", "multi_tensor", "foreach")):
        return "optimizer"
    if any(k in lowered for k in ("copy", "cat", "index", "gather", "scatter", "repeat")):
        return "copy/index"
    return "elementwise/other"


def time_attention(tokens: int, heads: int, head_dim: int, dtype, device, repeats: int = 5) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (torch.randn(tokens, heads, head_dim, device=device, dtype=dtype, requires_grad=True)
               for _ in range(3))
    cu = torch.tensor([0, tokens], device=device, dtype=torch.int32)
    candidates = {}
    try:
        from torch.nn.attention.varlen import varlen_attn

        candidates["torch_varlen"] = lambda: varlen_attn(q, k, v, cu, cu, tokens, tokens)
    except ImportError:
        pass
    for name, backend in (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION),
                          ("sdpa_efficient", SDPBackend.EFFICIENT_ATTENTION)):
        def run(backend=backend):
            with sdpa_kernel(backend):
                out = torch.nn.functional.scaled_dot_product_attention(
                    q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None])
            return out[0].transpose(0, 1)
        candidates[name] = run
    results = {}
    flops = 4 * tokens * tokens * heads * head_dim * 3.5  # fwd (2 matmuls) + bwd (2.5x fwd)
    for name, fn in candidates.items():
        try:
            for _ in range(2):
                fn().sum().backward()
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(repeats):
                fn().sum().backward()
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = (time.perf_counter() - start) / repeats
            results[name] = {"ms": 1000 * seconds, "tflops": flops / seconds / 1e12}
        except Exception as error:  # a backend this build or device lacks
            results[name] = {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()

    cfg, kino, latent, text, tokens = one_clip_step(args.model, args.tokens, args.dtype, 128, checkpointing=False)
    device, dtype = latent.device, latent.dtype
    optimizer = torch.optim.AdamW(kino.parameters(), lr=1e-4, fused=device.type == "cuda")
    timestep = torch.rand(1, device=device)

    def step():
        optimizer.zero_grad(set_to_none=True)
        kino([latent], timestep, text).float().pow(2).mean().backward()
        optimizer.step()

    for _ in range(3):
        step()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        torch.cuda.synchronize()
    with torch.profiler.profile(activities=activities) as profiler:
        for _ in range(args.steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    events = profiler.key_averages()
    self_time = (lambda e: e.self_device_time_total) if device.type == "cuda" else (lambda e: e.self_cpu_time_total)
    kernels = [e for e in events if self_time(e) > 0]
    total = sum(self_time(e) for e in kernels) or 1
    groups = defaultdict(float)
    for e in kernels:
        groups[group_of(e.key)] += self_time(e)
    print(f"## Profile: {args.model} x {tokens} tokens, {args.dtype}, eager, no checkpointing, "
          f"{args.steps} steps, {total / 1e3 / args.steps:.1f} ms device time per step\n")
    print("| group | share |\n|---|---|")
    for name, t in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"| {name} | {100 * t / total:.1f}% |")
    print(f"\n| top {args.top} by self device time | calls/step | ms/step | share |\n|---|---|---|---|")
    for e in sorted(kernels, key=self_time, reverse=True)[:args.top]:
        print(f"| `{e.key[:90]}` | {e.count // args.steps} | {self_time(e) / 1e3 / args.steps:.2f} | "
              f"{100 * self_time(e) / total:.1f}% |")
    if device.type == "cuda":
        heads, head_dim = cfg.heads, cfg.dim // cfg.heads
        timed = time_attention(tokens, heads, head_dim, dtype, device)
        print(f"\n## Self-attention alone, fwd+bwd, {tokens} tokens x {heads} heads x {head_dim}, {args.dtype}\n")
        print(json.dumps(timed, indent=1))


if __name__ == "__main__":
    main()
