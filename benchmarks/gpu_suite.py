"""Every GPU figure issue 12 asks for, in one command: `python3 benchmarks/gpu_suite.py [--out DIR]`.

  (a) Kino's DiT against diffusers' WanTransformer3DModel, 1B dims (1536 x 24, 12 heads), bf16, one clip of
      4k, 16k and 32k tokens, each block compiled (regional, both models), fused AdamW. The DiT is the
      configuration users train: frozen pretrained text embeddings (UMT5-XXL's width, 4096), not the byte encoder.
      Kino with `model.modulation=per_block` is the equal-dims comparison; with `shared` it has Wan's parameter
      count (the table reports both counts).
  (b) at 16k tokens: each attention backend this machine has, eager and compiled.
  (c) the trainer's real step, `python -m train` on one GPU through DeepSpeed ZeRO-2, from shards (a small
      procedural set it builds), with the in-process coordinator and tracking disabled (no Ray or W&B on the GPU
      machine): tokens/s, MFU, data wait, peak memory. Three configurations.
  (d) `train.memory`'s estimate against (c)'s measured peak, as error %.
  (e) issue 13: the longest clip one GPU trains for the 1B model (one rank, no sequence parallelism), with
      activation checkpointing, without and with tiling (model.mlp_chunks=8, model.loss_chunks=8): one training
      step (forward, backward, AdamW) on one clip, doubling the tokens until memory runs out or the next size
      would overrun a time budget (attention's cost grows with the square), next to the estimate's answer.
  (f) issue 14: Kino's `model.arch=wan` against diffusers' Wan 2.1 1.3B on identical weights, bf16, compiled
      blocks, 16k tokens: the largest output difference, then both training steps.

It writes gpu_suite.md (one table per part, the machine and the date) and gpu_suite.json. Planned to finish in
about 14 minutes on one H100/H200 (part (e) takes up to 5 of them, (f) one). `--rehearse` runs every part on the CPU at toy sizes, so the suite itself is
tested where no GPU is lent (tests/integration/test_gpu_suite.py); its numbers mean nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

UMT5_XXL_WIDTH = 4096


def stand_in_text_encoder(root: Path, width: int) -> Path:
    """A frozen T5 encoder directory at `width` with random weights and a word-level tokenizer (no hub): only its
    width matters to the DiT's cost."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from tokenizers.processors import TemplateProcessing

    from data.demo_set import BACKGROUNDS, COLOURS, MOTIONS, SHAPES

    words = ["a", "moving", "on", "background", *SHAPES, *COLOURS, *MOTIONS, *BACKGROUNDS]
    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator([" ".join(words)], trainers.WordLevelTrainer(special_tokens=["<pad>", "</s>", "<unk>"]))
    tokenizer.post_processor = TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>",
                                         unk_token="<unk>").save_pretrained(root)
    head_dim = min(64, width // 2)
    config = transformers.T5Config(vocab_size=tokenizer.get_vocab_size(), d_model=width, d_kv=head_dim,
                                   d_ff=2 * width, num_layers=1, num_heads=width // head_dim, pad_token_id=0, eos_token_id=1,
                                   decoder_start_token_id=0)
    transformers.T5EncoderModel(config).save_pretrained(root)
    return root


# -- (a) and (b): one model step --------------------------------------------------------------------------------
def model_step(size: Dict, tokens: int, text_path: Path, device, *, modulation: str = "per_block",
               backend: str = "auto", compiled: bool = True, wan: bool = False, steps: int = 5,
               warmup: int = 3) -> Dict:
    """Forward, backward and a fused AdamW step on one clip of ~`tokens` tokens, timed. `wan`: diffusers' Wan at
    the same dims instead of Kino."""
    from conf.schema import load_config
    from model_step import build_wan, latent_grid, timed_steps
    from models.attention import resolve_backend
    from models.dit import TextToVideoModel
    from models.flops import flops_per_sample, peak_flops
    from models.layers import cu_seqlens_from_lengths
    from models.text_encoder import TextBatch
    from train.parallelize import apply_compile

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = load_config([f"model={size['model']}", "model.text.name=pretrained", f"model.text.path={text_path}",
                       f"model.modulation={modulation}", f"model.attention_backend={backend}",
                       "model.activation_checkpointing=false", *size.get("overrides", [])], check=False).model
    torch.manual_seed(0)
    kino = TextToVideoModel(cfg).to(device, dtype)
    text_tokens, width = size["text_tokens"], kino.dit.text_pool.in_features
    shape = (cfg.autoencoder.latent_channels, *latent_grid(tokens, cfg.patch_size))
    latent = torch.randn(shape, device=device, dtype=dtype)
    timestep = torch.rand(1, device=device)
    embeddings = torch.randn(text_tokens, width, device=device, dtype=dtype)
    text = TextBatch(None, None, cu_seqlens_from_lengths([text_tokens], device), text_tokens, [text_tokens],
                     embeddings=embeddings)
    exact_tokens = int(torch.tensor(kino.dit.grid(shape)).prod())
    flops = flops_per_sample(kino, exact_tokens, text_tokens)
    row = {"model": "diffusers Wan" if wan else f"Kino ({modulation})", "tokens": exact_tokens,
           "attention": "diffusers" if wan else resolve_backend(backend, device.type, dtype, (cfg.heads, cfg.dim // cfg.heads)), "compiled": compiled}
    if wan:
        network = build_wan(cfg, width).to(device, dtype)
        blocks, hidden, context = network.blocks, latent[None], embeddings[None]

        def forward():
            return network(hidden_states=hidden, timestep=timestep * 1000, encoder_hidden_states=context,
                           return_dict=False)[0]
        kino = None  # only its FLOP count was needed
    else:
        network, blocks = kino, None

        def forward():
            return network([latent], timestep, text)
    if compiled:
        if wan:
            for block in blocks:
                block.compile()
        else:
            apply_compile(network)
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-4, fused=device.type == "cuda")

    def step():
        optimizer.zero_grad(set_to_none=True)
        forward().float().pow(2).mean().backward()
        optimizer.step()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = timed_steps(step, steps, warmup, device)
    peak = peak_flops(torch.cuda.get_device_name()) if device.type == "cuda" else None
    row.update(params=sum(p.numel() for p in network.parameters()), step_s=seconds, tokens_per_s=exact_tokens / seconds,
               mfu=flops / (seconds * peak) if peak else None,
               peak_gb=torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else None)
    return row  # its model and optimizer are freed on return; `guarded` then empties the CUDA cache


# -- (e): the longest clip one GPU trains -------------------------------------------------------------------------
def longest_clip(size: Dict, text_path: Path, device, *, tiling: bool, start: int, budget_s: float,
                 min_sizes: int = 1) -> Dict:
    """One training step on one clip of `start`, 2 x `start`, ... tokens (eager; activation checkpointing on), until
    one runs out of memory or the next would not finish inside `budget_s` (a step's time is extrapolated
    quadratically; the first `min_sizes` are tried whatever the time). Reports every size tried and the
    estimator's largest fitting budget for this GPU."""
    from conf.schema import load_config
    from model_step import latent_grid
    from models.dit import TextToVideoModel
    from models.layers import cu_seqlens_from_lengths
    from models.text_encoder import TextBatch
    from train.memory import estimate
    from train.parallelize import apply_activation_checkpointing, apply_tiling

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    capacity = 24 * 2 ** 30
    if device.type == "cuda":  # an H100's 80 GB, also on a larger GPU (an H200): the question is about the H100
        capacity = min(torch.cuda.get_device_properties(device).total_memory, 80 * 10 ** 9)
        torch.cuda.set_per_process_memory_fraction(capacity / torch.cuda.get_device_properties(device).total_memory)
    chunks = ["model.mlp_chunks=8", "model.loss_chunks=8"] if tiling else []
    overrides = [f"model={size['model']}", "model.text.name=pretrained", f"model.text.path={text_path}",
                 "model.activation_checkpointing=true", *chunks, *size.get("overrides", [])]
    full = load_config(overrides + ["zero.precision=bf16" if device.type == "cuda" else "zero.precision=fp32",
                                    "zero.stage=0"], check=False)
    cfg = full.model
    torch.manual_seed(0)
    model = TextToVideoModel(cfg).to(device, dtype)
    apply_tiling(model, cfg.mlp_chunks, cfg.loss_chunks)
    apply_activation_checkpointing(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    text_tokens, width = size["text_tokens"], model.dit.text_pool.in_features
    text = TextBatch(None, None, cu_seqlens_from_lengths([text_tokens], device), text_tokens, [text_tokens],
                     embeddings=torch.randn(text_tokens, width, device=device, dtype=dtype))
    tried, tokens, started = [], start, time.perf_counter()
    while True:
        shape = (cfg.autoencoder.latent_channels, *latent_grid(tokens, cfg.patch_size))
        exact = int(torch.tensor(model.dit.grid(shape)).prod())
        row = {"tokens": exact}
        try:
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            began = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            latent = torch.randn(shape, device=device, dtype=dtype)
            model([latent], torch.rand(1, device=device), text).float().pow(2).mean().backward()
            optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            row.update(step_s=time.perf_counter() - began,
                       peak_gb=torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else None)
        except torch.OutOfMemoryError:
            row["out_of_memory"] = True
        finally:
            latent = None
        tried.append(row)
        elapsed = time.perf_counter() - started
        out_of_time = len(tried) >= min_sizes and elapsed + 4 * 1.2 * row["step_s"] > budget_s
        if row.get("out_of_memory") or out_of_time:
            break
        tokens *= 2
    trained = [r for r in tried if not r.get("out_of_memory")]
    if device.type == "cuda":
        torch.cuda.set_per_process_memory_fraction(1.0)
    low, high = 1024, 1 << 24  # the estimator's longest clip that fits this GPU
    while high - low > 1024:
        middle = (low + high) // 2
        low, high = (middle, high) if estimate(full, 1, token_budget=middle).fits(capacity) else (low, middle)
    return {"tiling": tiling, "capacity_gb": capacity / 2 ** 30, "tried": tried, "longest_trained": max((r["tokens"] for r in trained), default=None),
            "stopped_by": "memory" if tried[-1].get("out_of_memory") else "time budget",
            "estimate_longest": low}


# -- (f): Kino's Wan against diffusers' Wan on identical weights ------------------------------------------------------
def wan_identical(size: Dict, compiled: bool, steps: int, warmup: int) -> Dict:
    import argparse as _argparse

    from model_step import compare_wan

    args = _argparse.Namespace(model=size["model"], set=size.get("overrides", []), tokens=size["tokens"],
                               text_tokens=size["text_tokens"], dtype=size["dtype"], steps=steps, warmup=warmup,
                               checkpointing="off", compile=compiled, peak_flops=None)
    return compare_wan(args)


# -- (c) and (d): the trainer's real step --------------------------------------------------------------------------
def trainer_run(name: str, overrides: List[str], data: Path, text_path: Path, run_dir: Path, steps: int,
                timeout: int) -> Dict:
    """`python -m train` in a process of its own (one GPU, ZeRO-2 unless overridden); its metrics and the memory
    estimate for the same config."""
    from conf.schema import load_config
    from train.memory import estimate

    args = ["experiment=demo", f"data.root={data}", f"train.run_dir={run_dir}", "train.resume=false",
            "tracking.mode=disabled", "tracking.eval_prompts=0", "tracking.eval_clips=0", "tracking.log_every=1",
            "tracking.video_every=0", "data.coordinator=local", "model.text.name=pretrained",
            f"model.text.path={text_path}", f"train.stop_after_steps={steps}", *overrides]
    env = dict(os.environ, MASTER_PORT=str(29600 + abs(hash(name)) % 300), OMP_NUM_THREADS="4")
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "train", *args], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=timeout)
    row = {"config": name, "overrides": " ".join(overrides), "wall_s": time.perf_counter() - started}
    if result.returncode != 0:
        return dict(row, error=(result.stderr or result.stdout)[-1500:])
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steady = metrics[len(metrics) // 2:]  # the first steps compile and warm up
    mean = lambda key: sum(m[key] for m in steady if m.get(key) is not None) / max(1, len(steady))  # noqa: E731
    cfg = load_config(args)
    budget = max(stage.token_budget for stage in cfg.curriculum.stages)
    estimated = estimate(cfg, world_size=1, token_budget=budget).total / 2 ** 30
    measured = max((m.get("peak_memory_gb") or 0) for m in metrics) or None
    return dict(row, steps=len(metrics), tokens_per_s=mean("tokens_per_s"), mfu=mean("mfu") or None,
                data_wait_frac=mean("data_wait_frac"), step_s=mean("step_time_s"), peak_gb=measured,
                estimate_gb=estimated, estimate_error=(estimated / measured - 1) if measured else None)


# -- the report ------------------------------------------------------------------------------------------------------
def fmt(value, spec: str, scale: float = 1.0) -> str:
    return "-" if value is None else format(value * scale, spec)


def markdown(report: Dict) -> str:
    env = report["environment"]
    lines = [f"## GPU suite: {env['device']}, {report['date']} (`python3 benchmarks/gpu_suite.py`"
             f"{' --rehearse' if report['rehearse'] else ''}; torch {env['torch']})", ""]
    lines += [f"### (a) Kino vs diffusers Wan, one clip, {report['precision']}, "
              f"{'compiled blocks' if report['compiled'] else 'eager'}", "",
              "| model | params | tokens | step s | tokens/s | MFU | peak GB | vs Wan |", "|---|---|---|---|---|---|---|---|"]
    for row in report["versus_wan"]:
        wan = next((r for r in report["versus_wan"] if r["model"] == "diffusers Wan" and r["tokens"] == row["tokens"]),
                   None)
        ratio = row["tokens_per_s"] / wan["tokens_per_s"] if wan and "error" not in row and "error" not in wan else None
        lines.append(f"| {row['model']} | {fmt(row.get('params'), ',.0f')} | {row['tokens']} | "
                     f"{fmt(row.get('step_s'), '.3f')} | {fmt(row.get('tokens_per_s'), ',.0f')} | "
                     f"{fmt(row.get('mfu'), '.1%')} | {fmt(row.get('peak_gb'), '.1f')} | {fmt(ratio, '.2f')}x |"
                     if "error" not in row else f"| {row['model']} | | {row['tokens']} | failed: {row['error']} | | | | |")
    lines += ["", "### (b) attention backends, eager and compiled", "",
              "| attention | compiled | tokens/s | MFU |", "|---|---|---|---|"]
    lines += [f"| {r['attention']} | {r['compiled']} | {fmt(r.get('tokens_per_s'), ',.0f')} | {fmt(r.get('mfu'), '.1%')} |"
              if "error" not in r else f"| {r['attention']} | {r['compiled']} | failed: {r['error']} | |"
              for r in report["backends"]]
    problems = compile_problems(report)
    if report["compiled"]:
        lines += ["", "Compiled cases with graph breaks or an eager fallback (Dynamo reset before each case): "
                  + ("; ".join(problems) if problems else "none")]
    lines += ["", "### (c) the trainer's step (DeepSpeed, one GPU, from shards) and (d) the memory estimate", "",
              "| config | tokens/s | MFU | data wait | step s | peak GB | estimate GB | estimate error |",
              "|---|---|---|---|---|---|---|---|"]
    for r in report["trainer"]:
        if "error" in r:
            lines.append(f"| {r['config']} | failed: {r['error'][-300:]!r} | | | | | | |")
            continue
        lines.append(f"| {r['config']} | {fmt(r['tokens_per_s'], ',.0f')} | {fmt(r['mfu'], '.1%')} | "
                     f"{fmt(r['data_wait_frac'], '.1%')} | {fmt(r['step_s'], '.3f')} | {fmt(r['peak_gb'], '.1f')} | "
                     f"{fmt(r['estimate_gb'], '.1f')} | {fmt(r['estimate_error'], '+.1%')} |")
    lines += ["", "### (e) the longest clip one 80 GB GPU trains, 1B, one step, activation checkpointing (issue 13)",
              "", "Memory is capped at 80 GB (an H100's) on a larger GPU. A size that would overrun the part's time "
              "budget is not tried: then the peak memory of the sizes tried, against the estimate, tells the rest.", "",
              "| tiling | longest trained (tokens) | stopped by | tried: tokens, step s, peak GB | estimate's longest |",
              "|---|---|---|---|---|"]
    for r in report.get("longest_clip", []):
        if "error" in r:
            lines.append(f"| {r.get('tiling', '?')} | failed: {r['error']} | | | |")
            continue
        tried = "; ".join(f"{t['tokens']:,}: " + ("out of memory" if t.get("out_of_memory") else
                                                   f"{t['step_s']:.1f} s, {fmt(t.get('peak_gb'), '.1f')} GB")
                          for t in r["tried"])
        lines.append(f"| {'mlp 8, head 8' if r['tiling'] else 'off'} | {fmt(r['longest_trained'], ',.0f')} | "
                     f"{r['stopped_by']} | {tried} | {r['estimate_longest']:,} |")
    lines += ["", "### (f) Kino's Wan vs diffusers' Wan, identical weights (issue 14)", "",
              "| model | tokens | dtype | compiled | max output difference | Kino tokens/s | diffusers tokens/s | "
              "Kino MFU | Kino / diffusers |", "|---|---|---|---|---|---|---|---|---|"]
    for r in report.get("wan_identical", []):
        if "error" in r:
            lines.append(f"| failed: {r['error']} | | | | | | | | |")
            continue
        lines.append(f"| {r['model']} {' '.join(r['overrides'])} | {r['tokens']:,} | {r['dtype']} | {r['compiled']} | "
                     f"{r['max_abs_output_difference']:.2e} (of {r['max_abs_output']:.2f}) | "
                     f"{r['kino_tokens_per_s']:,.0f} | {r['diffusers_wan_tokens_per_s']:,.0f} | "
                     f"{fmt(r.get('kino_mfu'), '.1%')} | {r['kino_vs_diffusers']:.2f}x |")
    lines += ["", f"Wall time {report['wall_s']:.0f} s."]
    return "\n".join(lines) + "\n"


def guarded(function, *args, **kwargs) -> Dict:
    """One failed measurement is reported in its row; the others still run. Dynamo starts each case afresh (no
    graphs, guards or counters from the last), and a compiled case's row says how it compiled: the graphs Dynamo
    captured and its graph breaks, so a case that broke its graphs or fell back to eager is named in the report.
    The GPU's cache is emptied after each, so one measurement's memory does not count against the next."""
    import torch._dynamo

    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()
    try:
        row = function(*args, **kwargs)
    except Exception as error:  # an OOM or a missing kernel on one configuration
        row = {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}",
               "model": kwargs.get("modulation", "?"), "tokens": args[1] if len(args) > 1 else 0,
               "attention": kwargs.get("backend", "?"), "compiled": kwargs.get("compiled", "?")}
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if isinstance(row, dict) and row.get("compiled") is True:
        from train.parallelize import compile_report, describe_compile

        report = compile_report()
        breaks = sum(report["graph_breaks"].values())
        row.update(graphs=report["graphs"], graph_breaks=breaks, eager=report["graphs"] == 0,
                   compile_note=describe_compile(report) if breaks or not report["graphs"] else "")
    return row


def compile_problems(report: Dict) -> List[str]:
    """The compiled cases that ran with graph breaks or fell back to eager (no graph captured)."""
    return [f"{r.get('model', '?')} {r.get('tokens', '')} tokens ({r.get('attention', '?')}): {r['compile_note']}"
            for part in ("versus_wan", "backends") for r in report.get(part, []) if r.get("compile_note")]


def plan(rehearse: bool) -> Dict:
    if rehearse:  # toy sizes on the CPU: every part runs, in well under a minute
        return {"size": {"model": "tiny", "text_tokens": 8}, "tokens": [64, 128], "backend_tokens": 64,
                # two sizes at least: on a loaded 2-core machine the first step alone can outlast a budget
                "longest": {"start": 64, "budget_s": 3, "min_sizes": 2},
                "wan": {"model": "wan_1.3B", "overrides": ["model.depth=2", "model.dim=96", "model.heads=4",
                                                             "model.ffn_dim=160"], "tokens": 256, "text_tokens": 16,
                        "dtype": "fp32"},
                "width": 32, "steps": 1, "warmup": 1, "trainer_steps": 3,
                "trainer": {"tiny, ZeRO-2": [], "tiny, ZeRO-2, checkpointing": ["model.activation_checkpointing=true"],
                            "tiny, ZeRO-3": ["zero.stage=3"]}}
    one_b = ["model=1B", "model.autoencoder.name=pixel", "model.autoencoder.latent_channels=3",
             "model.autoencoder.temporal_factor=1", "model.autoencoder.spatial_factor=1", "zero.precision=bf16"]
    budget = ["curriculum.stages.0.token_budget=16384", "curriculum.stages.1.token_budget=16384"]
    return {"size": {"model": "1B", "text_tokens": 128}, "tokens": [4096, 16384, 32768], "backend_tokens": 16384,
            # 1B on an H200: 64k tokens take some seconds a step, 256k about a minute and a half (attention)
            "longest": {"start": 65536, "budget_s": 150},
            "wan": {"model": "wan_1.3B", "tokens": 16384, "text_tokens": 512, "dtype": "bf16"},
            "width": UMT5_XXL_WIDTH, "steps": 6, "warmup": 3, "trainer_steps": 16,
            "trainer": {"1B, ZeRO-2, 16k budget": one_b + budget,
                        "1B, ZeRO-2, 16k budget, no checkpointing": one_b + budget
                        + ["model.activation_checkpointing=false"],
                        "1B, ZeRO-3, 16k budget": one_b + budget + ["zero.stage=3"]}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python3 benchmarks/gpu_suite.py", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--rehearse", action="store_true", help="every part on the CPU at toy sizes")
    parser.add_argument("--parts", default="abcdef",
                        help="which parts to run (letters above; d goes with c): e.g. abcd in one call and e in "
                             "another, when a call may last 10 minutes at most")
    args = parser.parse_args(argv)
    if not args.rehearse and not torch.cuda.is_available():
        print("gpu_suite: no CUDA device here; --rehearse runs the suite on the CPU at toy sizes", file=sys.stderr)
        return 2
    from data.demo_set import build
    from models.attention import available_backends

    started = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.rehearse else "cpu")
    p = plan(args.rehearse)
    work = Path(tempfile.mkdtemp(prefix="kino-gpu-suite-"))
    text_path = stand_in_text_encoder(work / "text_encoder", p["width"])
    common = dict(steps=p["steps"], warmup=p["warmup"], compiled=not args.rehearse)
    parts = set(args.parts)
    versus_wan = []
    for tokens in (p["tokens"] if "a" in parts else []):
        for modulation in ("per_block", "shared"):
            versus_wan.append(guarded(model_step, p["size"], tokens, text_path, device, modulation=modulation,
                                      **common))
        versus_wan.append(dict(guarded(model_step, p["size"], tokens, text_path, device, wan=True, **common),
                               model="diffusers Wan"))
    backends = []
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for backend in [b for b in available_backends(device, dtype) if b != "reference" and "b" in parts]:
        for compiled in ((False,) if args.rehearse else (False, True)):
            backends.append(guarded(model_step, p["size"], p["backend_tokens"], text_path, device, backend=backend,
                                    compiled=compiled, steps=p["steps"], warmup=p["warmup"]))
    data = work / "data"
    if "c" in parts:
        build(data, procedural=64, real=False, samples_per_shard=16, seed=0)
    trainer = [trainer_run(name, overrides, data, text_path, work / f"run{i}", p["trainer_steps"], timeout=600)
               for i, (name, overrides) in enumerate(p["trainer"].items())] if "c" in parts else []
    longest = [guarded(longest_clip, p["size"], text_path, device, tiling=tiling, **p["longest"])
               for tiling in (False, True)] if "e" in parts else []
    wan = [guarded(wan_identical, p["wan"], compiled=not args.rehearse, steps=p["steps"], warmup=p["warmup"])] \
        if "f" in parts else []
    report = {"date": time.strftime("%Y-%m-%d"), "rehearse": args.rehearse, "compiled": common["compiled"],
              "precision": str(dtype).replace("torch.", ""),
              "environment": {"device": torch.cuda.get_device_name() if device.type == "cuda" else
                              f"cpu ({platform.processor() or platform.machine()}, rehearsal)",
                              "torch": torch.__version__, "python": platform.python_version()},
              "versus_wan": versus_wan, "backends": backends, "trainer": trainer, "longest_clip": longest,
              "wan_identical": wan,
              "wall_s": time.perf_counter() - started}
    args.out.mkdir(parents=True, exist_ok=True)
    text = markdown(report)
    name = "gpu_suite" if parts == set("abcdef") else f"gpu_suite_{''.join(sorted(parts))}"
    (args.out / f"{name}.md").write_text(text)
    (args.out / f"{name}.json").write_text(json.dumps(report, indent=1, default=str))
    print(text)
    failed = [r for part in ("versus_wan", "backends", "trainer", "longest_clip", "wan_identical") for r in report[part]
              if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
