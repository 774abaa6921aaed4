"""The VAE as a training method, its export, and a DiT trained on its latents (one process each)."""
import json
import os
import subprocess
import sys

import torch

from tests.conftest import REPO
from tests.forked_ranks import run_ranks


def run_train(*overrides, port):
    env = dict(os.environ, WANDB_MODE="offline", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    result = run_ranks([sys.executable, "-m", "train", *overrides], cwd=REPO, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_vae_trains_exports_and_serves_as_the_dit_latent_space(tiny_dataset, tmp_path):
    from data.demo_set import build_validation

    vae_run = tmp_path / "vae"
    held_out = build_validation(tmp_path / "held_out", count=3).parent
    small_vae = ["model.autoencoder.base_channels=8", "model.autoencoder.latent_channels=4"]
    result = run_train("experiment=vae_demo", f"data.root={tiny_dataset}", f"data.validation_root={held_out}",
                       f"train.run_dir={vae_run}",
                       "curriculum.stages.0.steps=3", "tracking.log_every=1", "tracking.mode=disabled",
                       *small_vae, port=29541)
    assert "held-out reconstruction PSNR" in result.stdout
    rows = [json.loads(line) for line in (vae_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["loss"] > 0 for r in rows)
    assert list((vae_run / "videos" / "step_3").glob("*-reconstruction-*.mp4"))

    exported = subprocess.run([sys.executable, "-m", "train.export", str(vae_run)], cwd=REPO, capture_output=True,
                              text=True, timeout=300)
    assert exported.returncode == 0, exported.stderr
    weights = vae_run / "export" / "step_3" / "model.safetensors"
    from safetensors.torch import load_file

    from train.export import ema_weights

    ema = ema_weights(vae_run / "checkpoints" / "step_3")
    assert all(torch.equal(load_file(str(weights))[k], v) for k, v in ema.items())
    # README: benchmarks/vae_psnr.py on the export, over the run's held-out clips
    scored = subprocess.run([sys.executable, "benchmarks/vae_psnr.py", str(weights.parent), "--clips", "3"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert scored.returncode == 0, scored.stderr[-3000:]
    report = json.loads(scored.stdout)
    assert report["held_out_clips"] == 3 and report["vae_psnr_db"] > 0 and report["down_up_baseline_psnr_db"] > 0

    dit_run = tmp_path / "dit"
    run_train("experiment=demo", f"data.root={tiny_dataset}", f"train.run_dir={dit_run}",
              "model.autoencoder.name=causal_vae", f"model.autoencoder.path={weights}", *small_vae,
              "model.autoencoder.temporal_factor=4", "model.autoencoder.spatial_factor=8",
              "model.patch_size=[1,1,1]", "model.dim=32", "model.depth=1", "model.heads=2", "model.text.dim=32",
              "model.text.depth=1", "model.text.heads=2", "data.fps=12",
              "curriculum.stages.0.steps=2", "curriculum.stages.0.frame_counts=[9]",
              "curriculum.stages.0.resolutions=[32]", "curriculum.stages.0.token_budget=200",
              "curriculum.stages.1.steps=1", "curriculum.stages.1.frame_counts=[9]",
              "curriculum.stages.1.resolutions=[32]", "curriculum.stages.1.token_budget=200",
              "tracking.log_every=1", "tracking.sampling_steps=2", "tracking.mode=disabled",
              "tracking.eval_prompts=0", "tracking.eval_clips=0", port=29542)
    rows = [json.loads(line) for line in (dit_run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(r["loss"] > 0 for r in rows)
    samples = list((dit_run / "videos" / "step_3").glob("*.mp4"))
    assert samples  # decoded through the VAE back to pixels
