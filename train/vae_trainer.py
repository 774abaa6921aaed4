"""Train the built-in causal video VAE (experiment=vae_demo) with the same loop, data, engine,
checkpoints and tracking as the DiT: only the model, the step and the generated videos (reconstructions of the
held-out split) differ."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Dict, List

import torch

from data.batch import PackedBatch
from data.video_io import write_video
from models.autoencoder import to_uint8, to_unit_range
from models.dit import parameter_count
from models.vae import psnr, vae_loss
from train.collectives import all_ranks_finite
from train.curriculum import stage_shapes
from train.epoch_gate import loss_weighted
from train.evaluate import validation_clips
from train.methods import build_model
from train.tracking import StepResult
from train.trainer import Trainer


HELD_OUT_CLIPS = 3  # reconstructed at each sampling point


class VAETrainer(Trainer):
    def build_model(self) -> torch.nn.Module:
        return build_model(self.cfg)

    def describe_model(self) -> str:
        return f"causal video VAE, {parameter_count(self.model) / 1e6:.2f}M parameters"

    def forward_backward_step(self, batch: PackedBatch) -> StepResult:
        device = self.env.device
        by_shape: Dict[tuple, List[torch.Tensor]] = defaultdict(list)
        for video in batch.videos:  # clips of one shape share a forward pass
            by_shape[tuple(video.shape)].append(to_unit_range(video))
        elements, recon_sum = 0, 0
        losses = []
        for clips in by_shape.values():
            x = torch.stack(clips).to(device)
            reconstruction, mean, logvar = self.engine(x, noise=torch.randn(
                (x.shape[0], self.model.latent_channels, *self._latent_dims(x)), generator=self.rng.noise_generator,
                device=device))
            loss, recon, _ = vae_loss(x, reconstruction, mean, logvar, self.cfg.model.autoencoder.kl_weight)
            losses.append(loss * x.numel())
            elements += x.numel()
            recon_sum = recon_sum + recon.detach() * x.numel()
        loss = torch.stack(losses).sum() / elements
        finite = all_ranks_finite(loss, device)
        self.engine.backward(loss_weighted(loss, batch))  # even when not finite: Trainer.forward_backward_step says why
        # "loss" in metrics is the reconstruction error (MSE + 0.1 L1) per element, without the KL term
        return StepResult(finite=finite, tokens=batch.tokens, loss_sum=recon_sum / elements * batch.tokens)

    def _latent_dims(self, x: torch.Tensor) -> tuple:
        t, h, w = x.shape[2:]
        return 1 + (t - 1) // self.model.temporal_factor, h // self.model.spatial_factor, w // self.model.spatial_factor

    def generate_videos(self) -> List[Path]:
        """Reconstruct held-out clips (data.validation_root) with the EMA weights: original | reconstruction."""
        vae = self.ema_model()
        if not self.env.is_main:
            return []
        vae = vae.eval()
        stage = self.curriculum.stage(max(self.step - 1, 0))
        out_dir = self.run_dir / "videos" / f"step_{self.step}"
        paths, scores = [], []
        for i, clip in enumerate(validation_clips(self.cfg, stage_shapes(self.cfg, stage), HELD_OUT_CLIPS)):
            x = to_unit_range(clip.video).unsqueeze(0).to(self.env.device)
            with torch.no_grad():
                reconstruction = vae(x, sample=False)[0].clamp(-1, 1)
            scores.append(psnr(reconstruction, x))
            side_by_side = torch.cat([clip.video, to_uint8(reconstruction[0].cpu())], dim=2)
            frames, height, width = clip.video.shape[:3]
            paths.append(write_video(out_dir / f"{i:02d}-reconstruction-{width}x{height}x{frames}.mp4",
                                     side_by_side.numpy(), self.cfg.data.fps))
        if not scores:
            raise RuntimeError(f"data.validation_root={self.cfg.data.validation_root}: no licensed clip fits the "
                               f"stage's buckets, so there is nothing to reconstruct")
        self.tracker.log_event(self.step, f"held-out reconstruction PSNR: {sum(scores) / len(scores):.2f} dB")
        self.tracker.log_videos(self.step, paths, [p.stem for p in paths])
        return paths
