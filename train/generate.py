"""Generate clips from prompts with the rectified-flow sampler and write them as mp4 + gif.

`python -m train.generate RUN --prompt TEXT [--prompt TEXT ...] --out DIR` generates from any complete
checkpoint of a run (EMA weights unless --raw), at the last curriculum stage's buckets (one per aspect ratio,
longest clips) unless --width/--height/--frames say otherwise. Files: NN-<prompt slug>-WxHxT.mp4 and .gif.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch

from data.buckets import BucketShape
from data.video_io import write_video
from models.flow import SAMPLERS, guided


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:48] or "unconditional"


@torch.no_grad()
def generate(model, autoencoder, text, prompts: Sequence[str], shapes: Sequence[BucketShape], steps: int,
             cfg_scale: float, seed: int, reference_tokens: int, device, sampler: str = "euler") -> List[torch.Tensor]:
    """One clip per (prompt, shape) pair; returns uint8 (T, H, W, 3) videos."""
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    latent_shapes = [(autoencoder.latent_channels, *shape.latent_shape(autoencoder.temporal_factor,
                                                                         autoencoder.spatial_factor))
                     for shape in shapes]
    noise = [torch.randn(s, generator=generator).to(device) for s in latent_shapes]
    tokens = [math.prod(model.dit.grid(s)) for s in latent_shapes]

    def velocity(x: List[torch.Tensor], t: torch.Tensor, conditional) -> List[torch.Tensor]:
        captions = list(prompts) if conditional else list(prompts) + [""] * len(prompts)
        packed = model(x, t.to(device), text.batch(captions, device))
        return model.dit.unpatchify(packed, [tuple(xi.shape) for xi in x])

    latents = SAMPLERS[sampler](guided(velocity, cfg_scale), noise, steps, reference_tokens, tokens)
    model.train(was_training)
    return [autoencoder.decode(latent.cpu()) for latent in latents]


def write_videos(videos: Sequence[torch.Tensor], prompts: Sequence[str], out_dir: Path, fps: float) -> List[Path]:
    paths = []
    for i, (video, prompt) in enumerate(zip(videos, prompts)):
        stem = out_dir / f"{i:02d}-{_slug(prompt)}-{video.shape[2]}x{video.shape[1]}x{video.shape[0]}"
        paths.append(write_video(stem.with_suffix(".mp4"), video.numpy(), fps))
        write_video(stem.with_suffix(".gif"), video.numpy(), fps)
    return paths


def write_strip(videos: Sequence[torch.Tensor], path: Path, scale: int = 3, gap: int = 2) -> Path:
    """One PNG to look at: each clip a row of its frames side by side (nearest-neighbour upscaled), clips of
    different sizes stacked on a white sheet."""
    import numpy as np
    from PIL import Image

    rows = []
    for video in videos:
        frames = video.numpy().repeat(scale, axis=1).repeat(scale, axis=2)  # (T, H, W, 3)
        spacer = np.full((frames.shape[1], gap * scale, 3), 255, np.uint8)
        rows.append(np.concatenate([part for frame in frames for part in (frame, spacer)][:-1], axis=1))
    width = max(r.shape[1] for r in rows)
    sheet = np.full((sum(r.shape[0] for r in rows) + gap * scale * (len(rows) - 1), width, 3), 255, np.uint8)
    top = 0
    for row in rows:
        sheet[top:top + row.shape[0], :row.shape[1]] = row
        top += row.shape[0] + gap * scale
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(sheet).save(path)
    return path


def one_per_aspect_ratio(shapes: Sequence[BucketShape], longest: bool = True) -> List[BucketShape]:
    """The buckets with the most (or fewest) frames, one per aspect ratio."""
    frames = max(s.frames for s in shapes) if longest else min(s.frames for s in shapes)
    return list({round(s.aspect_ratio, 3): s for s in shapes if s.frames == frames}.values())


def generation_plan(prompts: Sequence[str], shapes: Sequence[BucketShape], limit: int = 4):
    """Prompts paired with the stage's longest buckets, one per aspect ratio, cycling."""
    by_ratio = sorted(one_per_aspect_ratio(shapes))
    pairs = [(prompts[i % len(prompts)], by_ratio[i % len(by_ratio)])
             for i in range(min(limit, max(len(prompts), len(by_ratio))))]
    return [p for p, _ in pairs], [s for _, s in pairs]


def last_stage_shapes(cfg, longest: bool = True) -> List[BucketShape]:
    """The last stage's longest (or shortest video) buckets, one per aspect ratio (widest first)."""
    from train.curriculum import stage_shapes

    shapes = [s for s in stage_shapes(cfg, cfg.curriculum.stages[-1]) if s.frames > 1]
    return sorted(one_per_aspect_ratio(shapes, longest), key=lambda s: -s.aspect_ratio)


def load_for_generation(run_dir, step: Optional[int] = None, raw: bool = False, device="cpu") -> Tuple:
    """(config, model, autoencoder, text conditioner, checkpoint) of a run's complete checkpoint, the model
    holding its EMA (or, with raw, its trained) weights in the run's training precision."""
    from models.autoencoder import build_autoencoder
    from models.dit import TextToVideoModel, text_conditioner
    from conf.schema import from_yaml
    from train.engine import compute_dtype
    from train.export import checkpoint_path, ema_weights, raw_weights

    checkpoint = checkpoint_path(Path(run_dir), step)
    cfg = from_yaml((checkpoint / "config.yaml").read_text())
    if cfg.train.method != "dit":
        from conf.errors import UserError

        raise UserError(f"{run_dir} trains {cfg.train.method!r}, not a text-to-video model")
    model = TextToVideoModel(cfg.model)
    model.load_state_dict(raw_weights(checkpoint) if raw else ema_weights(checkpoint))
    model = model.to(device, compute_dtype(cfg)).eval()
    autoencoder = on_device(build_autoencoder(cfg.model.autoencoder), device)
    text = on_device(text_conditioner(cfg.model), device)
    return cfg, model, autoencoder, text, checkpoint


def on_device(component, device):
    """Frozen helpers (autoencoder, pretrained text encoder) live on the model's device when they can move."""
    return component.to(device) if hasattr(component, "to") else component


def requested_shape(cfg, default: BucketShape, width: Optional[int], height: Optional[int],
                    frames: Optional[int]) -> BucketShape:
    """--width/--height/--frames (each defaulting to the bucket's), checked against the run's model."""
    from conf.errors import UserError
    from train.config import frame_count_problem, spatial_multiple

    shape = BucketShape(default.frames if frames is None else frames, default.height if height is None else height,
                        default.width if width is None else width)
    multiple = spatial_multiple(cfg.model)
    for flag, side in (("--width", shape.width), ("--height", shape.height)):
        if side < multiple or side % multiple:
            near = max(multiple, round(side / multiple) * multiple)
            raise UserError(f"{flag} {side}: this model's frames are multiples of {multiple} pixels a side "
                            f"(patch x autoencoder factor); {near} would do")
    problem = frame_count_problem(shape.frames, cfg.model)
    if problem:
        raise UserError(f"--frames {shape.frames}: {problem}")
    return shape


def main(argv=None) -> None:
    import torch

    from conf.errors import ArgumentParser, at_least

    parser = ArgumentParser(prog="python -m train.generate", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--prompt", action="append", required=True, help="repeat for several prompts")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--step", type=at_least(0, "a checkpoint step"), default=None,
                        help="checkpoint step (default: latest)")
    parser.add_argument("--raw", action="store_true", help="the trained weights instead of the EMA")
    parser.add_argument("--width", type=at_least(1, "a width"))
    parser.add_argument("--height", type=at_least(1, "a height"))
    parser.add_argument("--frames", type=at_least(1, "a clip's frames"))
    parser.add_argument("--steps", type=at_least(1, "sampler steps"), default=None,
                        help="sampler steps (default: tracking.sampling_steps)")
    parser.add_argument("--cfg", type=float, default=None, help="guidance scale (default: tracking.cfg_scale)")
    parser.add_argument("--sampler", choices=sorted(SAMPLERS), default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--strip", type=Path, default=None, help="also write every clip's frames into this PNG")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg, model, autoencoder, text, checkpoint = load_for_generation(args.run_dir, args.step, args.raw, device)
    shapes = last_stage_shapes(cfg)
    if args.width is not None or args.height is not None or args.frames is not None:
        shapes = [requested_shape(cfg, shapes[0], args.width, args.height, args.frames)]
    prompts = [p for p in args.prompt for _ in shapes]
    plan = [s for _ in args.prompt for s in shapes]
    videos = generate(model, autoencoder, text, prompts, plan, args.steps or cfg.tracking.sampling_steps,
                      cfg.tracking.cfg_scale if args.cfg is None else args.cfg, args.seed,
                      cfg.train.shift_reference_tokens, device, args.sampler or cfg.tracking.sampler)
    paths = write_videos(videos, prompts, args.out, cfg.data.fps)
    print(f"{checkpoint} ({'raw' if args.raw else 'EMA'} weights):")
    for path in paths:
        print(f"  {path}")
    if args.strip:
        print(f"  {write_strip(videos, args.strip)} (frames of every clip, one row each)")


if __name__ == "__main__":
    from conf.errors import run_command

    raise SystemExit(run_command("kino", main))
