"""Training from a latent cache against encoding on the fly, and the encode job with 1 and 2 Ray workers, in one run.

  python benchmarks/latent_cache.py [--clips 48] [--steps 12] [--out DIR]

A procedural data set (the demo's clips at 64 px), the built-in causal VAE (4x temporal, 8x spatial, 16
channels; random weights: speed does not depend on them), a small DiT (dim 128, depth 2), one process on the CPU.
Step time is the mean of the steady second half of each run's steps (metrics.jsonl); encode time is the
whole `python -m data encode` job, Ray start-up included, and its steady rate (from the first finished shard to the
last).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

VAE = ["model.autoencoder.name=causal_vae", "model.autoencoder.latent_channels=16", "model.autoencoder.temporal_factor=4",
       "model.autoencoder.spatial_factor=8", "model.patch_size=[1,2,2]", "model.dim=128", "model.depth=2",
       "model.heads=4", "model.text.dim=64", "model.text.depth=1", "model.text.heads=2"]
STAGE = ["resolutions=[64]", "aspect_ratios=[1.0]", "frame_counts=[9]", "token_budget=192", "image_fraction=0.0"]


def overrides(weights: Path, steps: int):
    return ["experiment=demo", f"model.autoencoder.path={weights}", *VAE, "data.fps=12",
            *[f"curriculum.stages.{i}.{s}" for i in (0, 1) for s in STAGE], f"curriculum.stages.0.steps={steps}",
            "curriculum.stages.1.steps=1", "tracking.mode=disabled", "tracking.eval_prompts=0", "tracking.eval_clips=0",
            "tracking.video_every=0", "train.checkpoint_every=1000", "tracking.log_every=1"]


def run(command, env) -> float:
    started = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        raise SystemExit(result.stdout[-3000:] + result.stderr[-3000:])
    return time.perf_counter() - started


def encode_rates(command, env):
    """(whole job s, steady samples/s): the steady rate counts the samples encoded from the first finished shard to
    the last, over the time between them (Ray's and the actors' start-up left out)."""
    import re

    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    marks = []
    for line in process.stderr:
        found = re.match(r"encode: \d+/\d+ shards, (\d+) samples", line)
        if found:
            marks.append((time.perf_counter(), int(found.group(1))))
    if process.wait() != 0:
        raise SystemExit(process.stdout.read()[-3000:])
    whole = time.perf_counter() - started
    (t0, n0), (t1, n1) = marks[0], marks[-1]
    return whole, (n1 - n0) / (t1 - t0) if t1 > t0 else float("nan")


def steady_step_s(run_dir: Path) -> float:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steady = rows[len(rows) // 2:-1] or rows
    return sum(r["step_time_s"] for r in steady) / len(steady)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=48)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    import torch
    from safetensors.torch import save_file

    from data.demo_set import build
    from models.vae import CausalVideoVAE

    work = Path(args.out or tempfile.mkdtemp(prefix="kino-latent-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / "data"
    if not (data / "manifest.json").exists():
        build(data, procedural=args.clips, real=False, samples_per_shard=8, seed=0)
    torch.manual_seed(0)
    weights = work / "vae.safetensors"
    save_file(CausalVideoVAE(16, 32, (1, 2, 2), (False, True, True)).state_dict(), str(weights))
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline")  # a world of one takes a free port itself
    config = overrides(weights, args.steps)
    encode_s, steady = {}, {}
    for workers in (1, 2):
        out = work / f"cache{workers}"
        encode_s[workers], steady[workers] = encode_rates(
            [sys.executable, "-m", "data", "encode", str(data), "--out", str(out), "--workers", str(workers), *config],
            env)
    cache = work / "cache2"
    samples = sum(s["encoded"] for s in json.loads((cache / "manifest.json").read_text())["shards"])
    step_s = {}
    for name, extra in (("on the fly", []), ("from the cache", [f"data.latents={cache}"])):
        run_dir = work / name.replace(" ", "_")
        run([sys.executable, "-m", "train", f"data.root={data}", f"train.run_dir={run_dir}", "train.resume=false",
             *config, *extra], env)
        step_s[name] = steady_step_s(run_dir)
    report = {"date": time.strftime("%Y-%m-%d"), "cpu_cores": os.cpu_count(), "torch": torch.__version__,
              "clips": samples, "step_s": step_s, "speedup": step_s["on the fly"] / step_s["from the cache"],
              "encode_s": encode_s, "encode_samples_per_s": {w: samples / s for w, s in encode_s.items()},
              "encode_scaling_2_vs_1": encode_s[1] / encode_s[2], "encode_steady_samples_per_s": steady,
              "encode_steady_scaling_2_vs_1": steady[2] / steady[1]}
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
