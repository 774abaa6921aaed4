"""Each rank's peak host memory when a Wan-shaped model starts from diffusers weights and fine-tunes (issue 29).

`python benchmarks/start_memory.py [--ranks 2 4] [--lora 0 32]`: a random diffusers WanTransformer3DModel of about
0.28B parameters (16 blocks of 8 heads x 128, FFN 4096; 1,058 MiB in fp32) saved to disk, with a tiny random T5 and
Wan VAE, fine-tuned for 2 steps by `python -m train experiment=wan_finetune` under ZeRO-3 in fp32 on N CPU ranks.
Each rank's peak RSS (VmHWM) is read from /proc while it runs: at its first logged step ("start": construction,
base weights, partitioning) and at its exit, beside train.memory's estimate for the same config (what a GPU would
hold: the process itself, torch and DeepSpeed's code, is not in it). The bar the issue sets: ZeRO-3's share of the
model states (16 bytes a parameter / N) + 1.5 GiB.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

WAN = dict(patch_size=(1, 2, 2), num_attention_heads=8, attention_head_dim=128, in_channels=4, out_channels=4,
           text_dim=24, freq_dim=256, ffn_dim=4096, num_layers=16)


def build_inputs(work: Path):
    import diffusers
    import torch

    from data.demo_set import build
    from tests.conftest import write_tiny_t5, write_tiny_wan_vae

    if not (work / "transformer" / "config.json").exists():
        torch.manual_seed(0)
        diffusers.WanTransformer3DModel(**WAN).save_pretrained(work / "transformer")
        write_tiny_t5(work / "t5")
        write_tiny_wan_vae(work / "vae")
        build(work / "data", procedural=16, real=False, samples_per_shard=8, seed=0)
    params = sum(p.numel() for p in diffusers.WanTransformer3DModel.from_pretrained(work / "transformer").parameters())
    return params


def overrides(work: Path, run_dir: Path, lora: int, checkpointing: bool, extra=()):
    stage = ["resolutions=[32]", "aspect_ratios=[1.0]", "frame_counts=[5]", "token_budget=192", "warmup_steps=0"]
    return ["experiment=wan_finetune", f"data.root={work / 'data'}", f"train.run_dir={run_dir}", "data.fps=8",
            f"model.init_from={work / 'transformer'}", f"model.text.path={work / 't5'}",
            "model.text.tokenizer_path=null", "model.text.max_tokens=16", "model.text.pad_to=16",
            f"model.autoencoder.path={work / 'vae'}", "model.autoencoder.latent_channels=4",
            "model.autoencoder.temporal_factor=2", "model.autoencoder.spatial_factor=4", "model.dim=1024",
            "model.heads=8", "model.depth=16", "model.ffn_dim=4096", "model.text.dim=24",
            f"model.activation_checkpointing={str(checkpointing).lower()}", "curriculum=demo",
            *[f"curriculum.stages.{i}.{s}" for i in (0, 1) for s in stage],
            "curriculum.stages.0.steps=1", "curriculum.stages.1.steps=1", "zero.stage=3", "zero.precision=fp32",
            "tracking.mode=disabled", "tracking.eval_prompts=0", "tracking.eval_clips=0",
            "tracking.sampling_steps=1", "tracking.log_every=1", "train.checkpoint_every=100",
            "train.shift_reference_tokens=256", "data.num_workers=0", f"model.lora.rank={lora}", *extra]


def rank_of(pid: int):
    """The RANK of a `python -m train` process, or None for any other process."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if b"train" not in cmdline or b"-m" not in cmdline:
            return None
        env = dict(e.split(b"=", 1) for e in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in e)
        return int(env[b"RANK"]) if b"RANK" in env else None
    except (OSError, ValueError):
        return None


def peak_mib(pid: int):
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None


def estimated_mib(work: Path, ranks: int, lora: int, checkpointing: bool, extra=()) -> float:
    """train.memory's peak for this run (its rows together), in MiB: what it says a GPU would hold."""
    from conf.schema import load_config
    from train.memory import estimate

    cfg = load_config(overrides(work, work / "unused", lora, checkpointing, extra), check=False)
    return estimate(cfg, ranks).total / 2 ** 20


def measure(work: Path, ranks: int, lora: int, checkpointing: bool, extra=()):
    run_dir = Path(tempfile.mkdtemp(prefix="start_memory_"))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", "-m",
               "train", *overrides(work, run_dir, lora, checkpointing, extra)]
    process = subprocess.Popen(command, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline"),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peaks, start, done = {}, {}, threading.Event()

    def poll():
        metrics = run_dir / "metrics.jsonl"
        while not done.is_set():
            for entry in Path("/proc").iterdir():
                if entry.name.isdigit():
                    rank = rank_of(int(entry.name))
                    mib = peak_mib(int(entry.name)) if rank is not None else None
                    if mib is not None:
                        peaks[rank] = max(peaks.get(rank, 0.0), mib)
            if not start and metrics.exists() and metrics.read_text().strip():
                start.update(peaks)  # the first step is logged: start-up is behind every rank
            time.sleep(0.1)

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    began = time.time()
    output = process.communicate()[0]
    done.set()
    watcher.join()
    shutil.rmtree(run_dir, ignore_errors=True)  # a full fine-tune's checkpoints are GBs: runs would fill the disk
    if process.returncode:
        raise SystemExit(f"the run failed ({process.returncode}):\n{output[-3000:]}")
    return {rank: (start.get(rank), peaks[rank]) for rank in sorted(peaks)}, time.time() - began


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", nargs="+", type=int, default=[2, 4])
    parser.add_argument("--lora", nargs="+", type=int, default=[0, 32])
    parser.add_argument("--checkpointing", nargs="+", choices=["on", "off"], default=["on"],
                        help="model.activation_checkpointing (on: the shipped Wan configs; off: the baseline's recipe)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="more overrides for every run, e.g. zero.reduce_bucket_size=10000000")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "kino_start_memory")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    params = build_inputs(args.work)
    print(f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores; a Wan-shaped model of {params / 1e9:.3f}B "
          f"parameters ({params * 4 / 2 ** 20:,.0f} MiB in fp32), ZeRO-3, fp32, 2 steps"
          f"{'; ' + ' '.join(args.set) if args.set else ''}")
    print("| ranks | LoRA rank | checkpointing | bar (16 B x params / ranks + 1.5 GiB) | train.memory's estimate "
          "(MiB) | peak RSS at the first step, per rank (MiB) | peak RSS over the run, per rank (MiB) | s |")
    print("|---|---|---|---|---|---|---|---|")
    for ranks in args.ranks:
        for lora in args.lora:
            for mode in args.checkpointing:
                found, seconds = measure(args.work, ranks, lora, mode == "on", args.set)
                bar = 16 * params / ranks / 2 ** 20 + 1536
                estimate = estimated_mib(args.work, ranks, lora, mode == "on", args.set)
                first = " / ".join(f"{s:,.0f}" if s else "-" for s, _ in found.values())
                overall = " / ".join(f"{p:,.0f}" for _, p in found.values())
                print(f"| {ranks} | {lora} | {mode} | {bar:,.0f} | {estimate:,.0f} | {first} | {overall} "
                      f"| {seconds:.0f} |", flush=True)
    print(json.dumps({"params": params}))


if __name__ == "__main__":
    main()
