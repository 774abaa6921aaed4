"""Generate clips from prompts with the rectified-flow sampler and write them as mp4 + gif.

`python -m train.generate RUN --prompt TEXT [--prompt TEXT ...] --out DIR` generates from any complete
checkpoint of a run (EMA weights unless --raw), at the last curriculum stage's buckets (one per aspect ratio,
longest clips) unless --width/--height/--frames say otherwise. Files: NN-<prompt slug>-WxHxT.mp4 and .gif.
"""
from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch

from data.buckets import BucketShape
from data.video_io import write_video
from models.conditioning import condition_latents, conditioned_input, pipeline_input, pipeline_inputs
from models.flow import SAMPLERS, guided


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:48] or "unconditional"


@torch.no_grad()
def generate(model, autoencoder, text, prompts: Sequence[str], shapes: Sequence[BucketShape], steps: int,
             cfg_scale: float, seed: int, reference_tokens: int, device, sampler: str = "euler",
             given: Optional[Sequence[Optional[Tuple[torch.Tensor, torch.Tensor]]]] = None) -> List[torch.Tensor]:
    """One clip per (prompt, shape) pair; returns uint8 (T, H, W, 3) videos. `given`, for a model trained with
    model.frame_conditioning: per clip, None or (latents, which latent frames are given: bool[, the pixels they were
    encoded from]), from `given_latents`; the clip is generated around them (in Kino's layout keeping them as
    given). A model with an
    image branch (model.image) reads CLIP's tokens of the given first or last frame from those pixels; under
    model.image.inputs=pipeline it reads what diffusers' WanImageToVideoPipeline gives its transformer (every frame
    sampled, a mask per pixel frame, the pixels encoded with grey elsewhere: models/conditioning.py), and the clip
    is the sampled one, its given frames included, as the pipeline's is."""
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    latent_shapes = [(autoencoder.latent_channels, *shape.latent_shape(autoencoder.temporal_factor,
                                                                         autoencoder.spatial_factor))
                     for shape in shapes]
    noise = [torch.randn(s, generator=generator).to(device) for s in latent_shapes]
    tokens = [math.prod(model.dit.grid(s)) for s in latent_shapes]

    conditioned = model.cfg.frame_conditioning
    given = list(given) if given is not None else [None] * len(latent_shapes)
    if any(g is not None for g in given) and not conditioned:
        raise ValueError("this model was not trained with conditioning frames (model.frame_conditioning)")
    nothing = lambda s: (torch.zeros(s, device=device), torch.zeros(s[1], dtype=torch.bool))  # noqa: E731
    frames = [nothing(s) if g is None else (g[0].to(device), g[1]) for s, g in zip(latent_shapes, given)] \
        if conditioned else None
    images = given_images(text, given, [f[1] for f in frames] if frames else None)
    conditions = None
    if frames is not None and pipeline_inputs(model.cfg):  # the same in both halves of guidance, as the pipeline's
        conditions = condition_latents(autoencoder, [None if g is None or len(g) < 3 else g[2] for g in given],
                                       [f[1] for f in frames], latent_shapes, device)

    def velocity(x: List[torch.Tensor], t: torch.Tensor, conditional) -> List[torch.Tensor]:
        captions = list(prompts) if conditional else list(prompts) + [""] * len(prompts)
        factor, repeat = autoencoder.temporal_factor, len(x) // len(latent_shapes)
        if frames is None:
            inputs = x
        elif conditions is not None:
            inputs = [pipeline_input(xi, c, g, factor) for xi, c, (_, g) in zip(x, conditions * repeat, frames * repeat)]
        else:
            inputs = [conditioned_input(xi, c, g, factor) for xi, (c, g) in zip(x, frames * repeat)]
        batch = text.batch(captions, device)
        if images is not None:  # the unconditional half keeps its image, as diffusers' I2V pipeline does
            batch = dataclasses.replace(batch, images=images.repeat(len(x) // len(images), 1, 1))
        packed = model(inputs, t.to(device), batch)
        return model.dit.unpatchify(packed, [tuple(xi.shape) for xi in x])

    latents = SAMPLERS[sampler](guided(velocity, cfg_scale), noise, steps, reference_tokens, tokens)
    if frames is not None and conditions is None:  # Kino's layout: the given frames stay as given
        latents = [torch.where(g.to(device).view(1, -1, 1, 1), c, x) for x, (c, g) in zip(latents, frames)]
    model.train(was_training)
    return [autoencoder.decode(latent.cpu()) for latent in latents]


def given_images(text, given, masks) -> Optional[torch.Tensor]:
    """Each clip's CLIP tokens for a model with an image branch (its text conditioner carries the image encoder,
    models/image_encoder.py WithImages), None otherwise: read from the pixels `given_latents` encoded."""
    encoder = getattr(text, "image_encoder", None)
    if encoder is None or masks is None:
        return None
    from models.image_encoder import clip_picks

    if any(g is not None and len(g) < 3 and bool(m.any()) for g, m in zip(given, masks)):
        raise ValueError("a model with an image branch (model.image) reads the given frames' pixels: give each clip "
                         "(latents, given, pixels), as given_latents returns")
    return encoder.tokens(clip_picks(masks, encoder.cfg.images, [None if g is None else g[2] for g in given]))


def extension_context(shape: BucketShape, temporal_factor: int) -> int:
    """The pixel frames each window of `extend` is given: the last half of its latent frames' worth (at least
    one), so each window adds shape.frames minus this many."""
    latents = max(1, shape.latent_shape(temporal_factor)[0] // 2)
    return latents if temporal_factor == 1 else 1 + (latents - 1) * temporal_factor


def given_latents(autoencoder, shape: BucketShape, first=None, last=None
                  ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The latents, given latent frames and pixels of a clip of `shape` whose first and/or last frames are given:
    uint8 (H, W, 3) images, or for `first` a leading stretch (F, H, W, 3) of frames, at `shape`'s size. They are
    placed in an otherwise black clip, which is encoded; the latent frames they fill are given (the last image fills
    the last latent frame's pixel frames). The clip's pixels come back too: its first and last frames are what an
    image-conditioned model's CLIP reads."""
    video = torch.zeros(shape.frames, shape.height, shape.width, 3, dtype=torch.uint8)
    factor = autoencoder.temporal_factor
    lead = 0
    if first is not None:
        first = first if first.dim() == 4 else first.unsqueeze(0)
        lead = min(len(first), shape.frames - 1)
        if lead:
            video[:lead] = first[-lead:]
    if last is not None:
        video[-factor:] = last
    latents = autoencoder.encode(video)
    given = torch.zeros(latents.shape[1], dtype=torch.bool)
    if lead:  # the latent frames a leading stretch of `lead` pixel frames fills
        given[:BucketShape(lead, shape.height, shape.width).latent_shape(factor)[0]] = True
    given[-1] = given[-1] | (last is not None)
    return latents, given, video


def read_image(path: Path, shape: BucketShape) -> torch.Tensor:
    """A PNG/JPEG as uint8 (H, W, 3) at `shape`'s size (scaled to cover it, centre-cropped)."""
    import numpy as np
    from PIL import Image

    from data.decode import resize_and_crop

    return resize_and_crop(np.asarray(Image.open(path).convert("RGB"))[None], shape.height, shape.width)[0]


def extend(model, autoencoder, text, prompts: Sequence[str], videos: Sequence[torch.Tensor],
           shapes: Sequence[BucketShape], total_frames: int, **sampling) -> List[torch.Tensor]:
    """Each of `videos` ((F, H, W, 3) uint8 at its shape's size) grown to `total_frames` in windows of its shape's
    frames: each window is given the last half of its latent frames' worth of what is already there (at least
    one) and generates the rest, so a clip grows past the longest training length; the clips' windows are
    sampled together. Returns the whole clips, each video first."""
    contexts = [extension_context(shape, autoencoder.temporal_factor) for shape in shapes]
    out = list(videos)
    rounds = 0
    while any(len(o) < total_frames for o in out):
        growing = [i for i, o in enumerate(out) if len(o) < total_frames]
        given = [given_latents(autoencoder, shapes[i], first=out[i][-contexts[i]:]) for i in growing]
        # Each window draws its own noise (the seed decides the whole extension): with one noise for every window, a
        # window given what the last one made could only make it again.
        seeded = dict(sampling, seed=sampling["seed"] + 7919 * rounds) if "seed" in sampling else sampling
        windows = generate(model, autoencoder, text, [prompts[i] for i in growing], [shapes[i] for i in growing],
                           given=given, **seeded)
        rounds += 1
        for i, window in zip(growing, windows):
            out[i] = torch.cat([out[i], window[min(contexts[i], len(out[i])):]])
    return [o[:total_frames] for o in out]


def write_videos(videos: Sequence[torch.Tensor], prompts: Sequence[str], out_dir: Path, fps: float,
                 mode: Optional[str] = None) -> List[Path]:
    """NN-<prompt slug>-WxHxT[-mode].mp4 and .gif; `mode`: the conditioning mode, when frames were given."""
    paths = []
    for i, (video, prompt) in enumerate(zip(videos, prompts)):
        suffix = f"-{mode}" if mode and mode != "text" else ""
        stem = out_dir / f"{i:02d}-{_slug(prompt)}-{video.shape[2]}x{video.shape[1]}x{video.shape[0]}{suffix}"
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
    """Prompts paired with the stage's longest buckets, one per aspect ratio, cycling; none for no prompts."""
    if not prompts:
        return [], []
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
    parser.add_argument("--cfg", type=float, default=None,
                        help="guidance scale (default: tracking.cfg_scale; with --extend, tracking.extend_cfg_scale)")
    parser.add_argument("--sampler", choices=sorted(SAMPLERS), default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--strip", type=Path, default=None, help="also write every clip's frames into this PNG")
    parser.add_argument("--image", type=Path, default=None,
                        help="the first frame (image-to-video; a model trained with model.frame_conditioning)")
    parser.add_argument("--last-image", type=Path, default=None, help="the last frame (with --image: first-last)")
    parser.add_argument("--extend", type=Path, default=None,
                        help="a video to extend forwards to --frames frames (its own included), in windows of the "
                             "training length, each given the end of the last")
    args = parser.parse_args(argv)
    for image in (args.image, args.last_image, args.extend):
        if image is not None and not image.is_file():
            parser.error(f"{image}: no such file")
    if args.extend is not None and (args.image or args.last_image or args.frames is None):
        parser.error("--extend takes --frames (the extended clip's length), and no --image or --last-image")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg, model, autoencoder, text, checkpoint = load_for_generation(args.run_dir, args.step, args.raw, device)
    shapes = last_stage_shapes(cfg)
    if args.extend is not None:
        if not cfg.model.frame_conditioning:
            parser.error(f"--extend: {args.run_dir} was not trained with conditioning frames "
                         "(model.frame_conditioning=false)")
        from data.decode import resize_and_crop
        from data.video_io import read_video

        frames, _ = read_video(args.extend)
        aspect = frames.shape[2] / frames.shape[1]  # the bucket nearest the video's shape, unless told
        nearest = min(shapes, key=lambda s: abs(math.log(s.aspect_ratio / aspect)))
        shape = requested_shape(cfg, nearest, args.width, args.height, None)
        source = resize_and_crop(frames, shape.height, shape.width)
        sampling = dict(steps=args.steps or cfg.tracking.sampling_steps, seed=args.seed, device=device,
                        cfg_scale=cfg.tracking.extend_cfg_scale if args.cfg is None else args.cfg,
                        reference_tokens=cfg.train.shift_reference_tokens, sampler=args.sampler or cfg.tracking.sampler)
        prompts, mode = list(args.prompt), "extend"
        videos = extend(model, autoencoder, text, prompts, [source] * len(prompts), [shape] * len(prompts),
                        max(args.frames, len(source)), **sampling)
    else:
        prompts, mode, videos = generate_from_arguments(args, cfg, model, autoencoder, text, shapes, device,
                                                        parser)
    paths = write_videos(videos, prompts, args.out, cfg.data.fps, mode)
    print(f"{checkpoint} ({'raw' if args.raw else 'EMA'} weights):")
    for path in paths:
        print(f"  {path}")
    if args.strip:
        print(f"  {write_strip(videos, args.strip)} (frames of every clip, one row each)")


def generate_from_arguments(args, cfg, model, autoencoder, text, shapes, device, parser):
    """train.generate's prompts, first or last images, and shapes: (prompts, mode, videos)."""
    if args.width is not None or args.height is not None or args.frames is not None:
        shapes = [requested_shape(cfg, shapes[0], args.width, args.height, args.frames)]
    prompts = [p for p in args.prompt for _ in shapes]
    plan = [s for _ in args.prompt for s in shapes]
    mode = {(True, False): "first_frame", (False, True): "last_frame", (True, True): "first_last"}.get(
        (args.image is not None, args.last_image is not None), "text")
    if mode != "text" and not cfg.model.frame_conditioning:
        parser.error(f"--image/--last-image: {args.run_dir} was not trained with conditioning frames "
                     "(model.frame_conditioning=false)")
    given = None
    if mode != "text":
        given = [given_latents(autoencoder, shape, read_image(args.image, shape) if args.image else None,
                               read_image(args.last_image, shape) if args.last_image else None) for shape in plan]
    videos = generate(model, autoencoder, text, prompts, plan, args.steps or cfg.tracking.sampling_steps,
                      cfg.tracking.cfg_scale if args.cfg is None else args.cfg, args.seed,
                      cfg.train.shift_reference_tokens, device, args.sampler or cfg.tracking.sampler, given=given)
    return prompts, mode, videos


if __name__ == "__main__":
    from conf.errors import run_command

    raise SystemExit(run_command("kino", main))
