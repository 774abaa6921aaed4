"""Held-out reconstruction PSNR of a trained built-in VAE against a down-up-sampling baseline.

The baseline compresses RGB by the VAE's own factors (area-downsample to 1 + (T-1)/4 frames at
H/8 x W/8, then trilinear upsampling back), so both see the same spacetime compression; the VAE
keeps 16 channels per latent position where the baseline keeps 3. The clips are the held-out split the run
validated on (data.validation_root, or --validation-root), through the training loader's license gate and decoding.

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
from train.evaluate import validation_clips
from train.export import load_exported


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
    parser.add_argument("--validation-root", default=None, help="held-out clips (default: the run's data.validation_root)")
    args = parser.parse_args()
    cfg, vae = load_exported(args.export_dir)
    if args.validation_root:
        cfg.data.validation_root = args.validation_root
    if not cfg.data.validation_root:
        raise SystemExit("no held-out clips: the run has no data.validation_root; give --validation-root DATASET")
    shapes = [BucketShape(9, 32, 32), BucketShape(9, 24, 40), BucketShape(9, 40, 24), BucketShape(17, 48, 48)]
    clips = validation_clips(cfg, shapes, args.clips)
    vae_scores, baseline_scores = [], []
    for clip in clips:
        x = to_unit_range(clip.video).unsqueeze(0)
        with torch.no_grad():
            reconstruction = vae(x, sample=False)[0].clamp(-1, 1)
        vae_scores.append(psnr(reconstruction, x))
        baseline_scores.append(psnr(down_up(x, vae.temporal_factor, vae.spatial_factor), x))
    print(json.dumps({"date": time.strftime("%Y-%m-%d"), "export": args.export_dir, "held_out_clips": len(clips),
                      "validation_root": cfg.data.validation_root,
                      "vae_psnr_db": sum(vae_scores) / len(vae_scores),
                      "down_up_baseline_psnr_db": sum(baseline_scores) / len(baseline_scores),
                      "vae_wins": sum(v > b for v, b in zip(vae_scores, baseline_scores))}, indent=1))


if __name__ == "__main__":
    main()
