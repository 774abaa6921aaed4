"""Training-step throughput of a Kino DiT against diffusers' WanTransformer3DModel of the same size.

One training step = forward + backward + AdamW step on one clip of `--tokens` video tokens with a
`--text-tokens` caption. Both models are built from the same width/depth/heads/MLP/patch/channels and
measured in the same process, alternating, after warm-up. MFU uses docs/architecture.md's formula
(models/flops.py) with Kino's FLOP count for both (same-size models doing the same work).

  python benchmarks/model_step.py --model 1B --tokens 16384 --dtype bf16        # GPU
  python benchmarks/model_step.py --model 1B --tokens 16384 --dtype bf16 --compile  # both compiled
  python benchmarks/model_step.py --model tiny --tokens 1024 --dtype fp32 --steps 3  # CPU smoke

With a `model.arch=wan` config (wan_1.3B, wan_14B) Kino's Wan and diffusers' Wan run on identical weights (diffusers'
random init, copied into Kino), so only the speed differs; the report gives the largest output difference too:

  python benchmarks/model_step.py --model wan_1.3B --tokens 16384 --dtype bf16 --compile          # GPU
  python benchmarks/model_step.py --model wan_1.3B --set model.depth=2 model.dim=384 model.heads=4 \
      model.ffn_dim=1024 --tokens 1024 --dtype fp32 --steps 3                                     # CPU
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import time

import torch


def latent_grid(tokens: int, patch) -> tuple:
    """A (T, H, W) latent whose patch grid holds ~`tokens` tokens, 16:9-ish."""
    t = 8 if tokens >= 2048 else 2
    per_frame = tokens // t
    gh = max(1, int(round(math.sqrt(per_frame * 9 / 16))))
    gw = max(1, per_frame // gh)
    return t * patch[0], gh * patch[1], gw * patch[2]


def build_wan(cfg, context_dim: int):
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(patch_size=tuple(cfg.patch_size), num_attention_heads=cfg.heads,
                                 attention_head_dim=cfg.dim // cfg.heads, in_channels=cfg.autoencoder.latent_channels,
                                 out_channels=cfg.autoencoder.latent_channels, text_dim=context_dim,
                                 ffn_dim=int(cfg.dim * cfg.mlp_ratio), num_layers=cfg.depth)


def one_clip_step(model: str, tokens: int, dtype: str, text_tokens: int, checkpointing=None):
    """(model config, Kino model, one latent clip of ~`tokens` tokens, its caption batch, exact token count),
    on the GPU when there is one. checkpointing None keeps the model config's setting."""
    from models.dit import TextToVideoModel, text_conditioner
    from conf.schema import load_config
    from train.parallelize import apply_activation_checkpointing

    cfg = load_config([f"model={model}"], check=False).model
    if checkpointing is not None:
        cfg.activation_checkpointing = checkpointing
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    torch.manual_seed(0)
    kino = TextToVideoModel(cfg).to(device=device, dtype=torch_dtype)
    if cfg.activation_checkpointing:  # as training applies it (train/parallelize.py)
        apply_activation_checkpointing(kino)
    shape = (cfg.autoencoder.latent_channels, *latent_grid(tokens, cfg.patch_size))
    latent = torch.randn(shape, device=device, dtype=torch_dtype)
    caption = "x" * (text_tokens - 1)
    text = text_conditioner(cfg).batch([caption], device)  # the model casts frozen embeddings to its dtype
    return cfg, kino, latent, text, math.prod(kino.dit.grid(shape))


def wan_pair(cfg, dtype: torch.dtype, device, text_dim: int = 4096):
    """diffusers' WanTransformer3DModel with `cfg`'s dims (its own random init) and Kino's WanDiT holding the same
    weights."""
    from diffusers import WanTransformer3DModel

    from models.wan import WanDiT
    from models.wan_weights import diffusers_config, to_kino

    torch.manual_seed(0)
    settings = {k: v for k, v in diffusers_config(cfg, text_dim).items() if not k.startswith("_")}
    settings["patch_size"] = tuple(settings["patch_size"])
    wan = WanTransformer3DModel(**settings)
    kino = WanDiT(cfg, text_dim)
    kino.load_state_dict(to_kino(wan.state_dict(), cfg))
    return kino.to(device=device, dtype=dtype), wan.to(device=device, dtype=dtype)


def compare_wan(args) -> dict:
    """Kino's Wan against diffusers' Wan on identical weights: the largest output difference, then each one's
    training step (forward, backward, AdamW) timed alternately."""
    from conf.schema import load_config
    from models.attention import resolve_backend
    from models.flops import flops_per_sample, peak_flops
    from models.layers import cu_seqlens_from_lengths
    from models.text_encoder import TextBatch
    from train.parallelize import apply_activation_checkpointing, apply_compile

    cfg = load_config([f"model={args.model}", *args.set], check=False).model
    checkpointing = cfg.activation_checkpointing if args.checkpointing == "config" else args.checkpointing == "on"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    kino, wan = wan_pair(cfg, dtype, device)
    shape = (cfg.autoencoder.latent_channels, *latent_grid(args.tokens, cfg.patch_size))
    latent = torch.randn(shape, device=device, dtype=dtype)
    timestep = torch.rand(1, device=device)
    context = torch.randn(args.text_tokens, 4096, device=device, dtype=dtype)
    text = TextBatch(None, None, cu_seqlens_from_lengths([args.text_tokens], device), args.text_tokens,
                     [args.text_tokens], embeddings=context)
    tokens = math.prod(kino.grid(shape))

    def kino_forward():
        return kino.unpatchify(kino([latent], timestep, context, text), [shape])[0]

    def wan_forward():
        return wan(hidden_states=latent[None], timestep=timestep * 1000, encoder_hidden_states=context[None],
                   return_dict=False)[0][0]

    with torch.no_grad():
        reference = wan_forward().float()
        difference = (kino_forward().float() - reference).abs().max().item()
        magnitude = reference.abs().max().item()
    if checkpointing:
        apply_activation_checkpointing(kino)
        wan.enable_gradient_checkpointing()
    if args.compile:
        apply_compile(kino)
        for block in wan.blocks:
            block.compile()
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=1e-5, fused=device.type == "cuda")
                  for name, m in (("kino", kino), ("diffusers_wan", wan))}

    def step(name, forward):
        def run():
            optimizers[name].zero_grad(set_to_none=True)
            forward().float().pow(2).mean().backward()
            optimizers[name].step()
        return run

    times = {"kino": [], "diffusers_wan": []}
    for _ in range(2):  # alternate, so neither gets the quieter half of the run
        times["kino"].append(timed_steps(step("kino", kino_forward), args.steps, args.warmup, device))
        times["diffusers_wan"].append(timed_steps(step("diffusers_wan", wan_forward), args.steps, args.warmup,
                                                  device))
    wrapper = torch.nn.Module()
    wrapper.cfg, wrapper.text_encoder = cfg, None
    for name, module in (("dit", kino),):
        wrapper.add_module(name, module)
    flops = flops_per_sample(wrapper, tokens, args.text_tokens)
    peak = args.peak_flops or (peak_flops(torch.cuda.get_device_name()) if device.type == "cuda" else None)
    report = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name() if device.type == "cuda"
              else platform.processor() or "cpu", "torch": torch.__version__, "model": args.model,
              "overrides": args.set, "params": sum(p.numel() for p in kino.parameters()), "tokens": tokens,
              "text_tokens": args.text_tokens, "dtype": args.dtype, "compiled": args.compile,
              "activation_checkpointing": checkpointing,
              "attention_backend": resolve_backend(cfg.attention_backend, device.type, dtype, (cfg.heads, cfg.dim // cfg.heads)),
              "max_abs_output_difference": difference, "max_abs_output": magnitude, "flops_per_step": flops}
    for name, measured in times.items():
        seconds = min(measured)
        report[f"{name}_step_s"] = seconds
        report[f"{name}_tokens_per_s"] = tokens / seconds
        report[f"{name}_mfu"] = flops / (seconds * peak) if peak else None
    report["kino_vs_diffusers"] = report["diffusers_wan_step_s"] / report["kino_step_s"]
    return report


def timed_steps(step, steps: int, warmup: int, device) -> float:
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--text-tokens", type=int, default=128)
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--checkpointing", choices=["config", "on", "off"], default="config")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile each transformer block of both models (regional compile)")
    parser.add_argument("--peak-flops", type=float, default=None, help="device peak FLOP/s (default: known GPUs)")
    parser.add_argument("--set", nargs="*", default=[], help="config overrides, e.g. model.depth=2")
    args = parser.parse_args()
    from conf.schema import load_config

    if load_config([f"model={args.model}", *args.set], check=False).model.arch == "wan":
        print(json.dumps(compare_wan(args), indent=1))
        return

    from models.attention import resolve_backend
    from models.flops import flops_per_sample, peak_flops
    from train.parallelize import apply_compile

    checkpointing = None if args.checkpointing == "config" else args.checkpointing == "on"
    cfg, kino, latent, text, tokens = one_clip_step(args.model, args.tokens, args.dtype, args.text_tokens,
                                                    checkpointing)
    device, dtype = latent.device, latent.dtype
    optimizer = torch.optim.AdamW(kino.parameters(), lr=1e-4, fused=device.type == "cuda")
    timestep = torch.rand(1, device=device)
    if args.compile:
        apply_compile(kino)  # regional, as training applies it (train/parallelize.py)

    def kino_step():
        optimizer.zero_grad(set_to_none=True)
        out = kino([latent], timestep, text)
        out.float().pow(2).mean().backward()
        optimizer.step()

    flops = flops_per_sample(kino, tokens, text.max_len)
    peak = args.peak_flops or (peak_flops(torch.cuda.get_device_name()) if device.type == "cuda" else None)
    results = {"kino": timed_steps(kino_step, args.steps, args.warmup, device)}
    backend = resolve_backend(cfg.attention_backend, device.type, dtype, (cfg.heads, cfg.dim // cfg.heads))
    if not args.no_baseline:
        del optimizer
        context_dim = kino.dit.text_pool.in_features
        wan = build_wan(cfg, context_dim).to(device=device, dtype=dtype)
        if cfg.activation_checkpointing:
            wan.enable_gradient_checkpointing()
        if args.compile:
            for block in wan.blocks:  # the same regional compile for the baseline
                block.compile()
        wan_optimizer = torch.optim.AdamW(wan.parameters(), lr=1e-4, fused=device.type == "cuda")
        hidden = latent[None]
        context = torch.randn(1, args.text_tokens, context_dim, device=device, dtype=dtype)

        def wan_step():
            wan_optimizer.zero_grad(set_to_none=True)
            out = wan(hidden_states=hidden, timestep=(timestep * 1000), encoder_hidden_states=context,
                      return_dict=False)[0]
            out.float().pow(2).mean().backward()
            wan_optimizer.step()

        results["diffusers_wan"] = timed_steps(wan_step, args.steps, args.warmup, device)
        results["wan_params"] = sum(p.numel() for p in wan.parameters())
    report = {
        "date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name() if device.type == "cuda"
        else platform.processor() or "cpu", "torch": torch.__version__, "model": args.model,
        "kino_params": sum(p.numel() for p in kino.parameters()), "tokens": tokens, "text_tokens": text.max_len,
        "dtype": args.dtype, "attention_backend": backend, "activation_checkpointing": cfg.activation_checkpointing,
        "compiled": args.compile,
        "flops_per_step": flops,
    }
    for name in ("kino", "diffusers_wan"):
        if name in results:
            report[f"{name}_step_s"] = results[name]
            report[f"{name}_tokens_per_s"] = tokens / results[name]
            report[f"{name}_mfu"] = flops / (results[name] * peak) if peak else None
    if "wan_params" in results:
        report["wan_params"] = results["wan_params"]
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
