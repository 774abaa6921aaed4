"""Held-out reconstruction PSNR of a trained built-in VAE against a down-up-sampling baseline.

The baseline compresses RGB by the VAE's own factors (area-downsample to 1 + (T-1)/4 frames at
H/8 x W/8, then trilinear upsampling back), so both see the same spacetime compression; the VAE
keeps 16 channels per latent position where the baseline keeps 3.

  python -m train.export runs/vae_demo && python benchmarks/vae_psnr.py runs/vae_demo/export/step_1000
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from data.buckets import BucketShape
from models.autoencoder import to_unit_range
from models.vae import psnr
from train.export import load_exported
from train.vae_trainer import held_out_clip


def down_up(x: torch.Tensor, temporal: int, spatial: int) -> torch.Tensor:
    """(1, 3, T, H, W): first frame alone, the rest averaged in groups of `temporal`, then back up."""
    first, rest = x[:, :, :1], x[:, :, 1:]
    small_first = F.interpolate(first[:, :, 0], scale_factor=1 / spatial, mode="area")
    small_rest = F.avg_pool3d(rest, (temporal, spatial, spatial))
    up_first = F.interpolate(small_first, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, :, None]
    up_rest = F.interpolate(small_rest, size=rest.shape[2:], mode="trilinear", align_corners=False)
    return torch.cat([up_first, up_rest], dim=2).clamp(-1, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export_dir")
    parser.add_argument("--clips", type=int, default=24)
    args = parser.parse_args()
    cfg, vae = load_exported(args.export_dir)
    shapes = [BucketShape(9, 32, 32), BucketShape(9, 24, 40), BucketShape(9, 40, 24), BucketShape(17, 48, 48)]
    vae_scores, baseline_scores = [], []
    for i in range(args.clips):
        x = to_unit_range(held_out_clip(i, shapes[i % len(shapes)])).unsqueeze(0)
        with torch.no_grad():
            reconstruction = vae(x, sample=False)[0].clamp(-1, 1)
        vae_scores.append(psnr(reconstruction, x))
        baseline_scores.append(psnr(down_up(x, vae.temporal_factor, vae.spatial_factor), x))
    print(json.dumps({"date": time.strftime("%Y-%m-%d"), "export": args.export_dir, "held_out_clips": args.clips,
                      "vae_psnr_db": sum(vae_scores) / len(vae_scores),
                      "down_up_baseline_psnr_db": sum(baseline_scores) / len(baseline_scores),
                      "vae_wins": sum(v > b for v, b in zip(vae_scores, baseline_scores))}, indent=1))


if __name__ == "__main__":
    main()
