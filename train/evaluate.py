"""Does the model follow its prompts, and how well does it denoise clips it never trained on?

`python -m train.evaluate RUN [--step N] [--raw]` and, inside training, every `tracking.eval_every` steps
(EMA weights, main rank):

* **prompt adherence**, judged from the generated pixels alone (train/adherence.py): procedural prompts
  whose attribute combinations occur in the training set (`seen`) and combinations that do not
  (`held_out`), each generated at one of the last stage's buckets (its shortest clips, one aspect
  ratio per prompt, cycling);
  the share right per attribute and overall;
* **validation loss** on the held-out licensed split `data.validation_root`: every clip at fixed
  timesteps with fixed noise, so the number is deterministic and comparable across runs and resumes;
  overall and per bucket.
"""
from __future__ import annotations

from conf.errors import ArgumentParser, at_least
import itertools
import json
import math
import random
from pathlib import Path
from typing import Dict, Iterator, List, Sequence, Tuple

import torch

from data.buckets import BucketShape
from data.demo_set import BACKGROUNDS, COLOURS, CROSSING_REACH, MOTIONS, SHAPES, render_clip
from models.conditioning import text_only_input
from models.flow import noisy_pair
from train.adherence import (ATTRIBUTES, MODE_ATTRIBUTES, judge, judge_conditioned, parse_prompt, prompt_for,
                             summarize)
from train.generate import extend, extension_context, generate, given_latents, last_stage_shapes

VALIDATION_TIMESTEPS = (0.1, 0.3, 0.5, 0.7, 0.9)


def _raw_samples(root) -> Iterator[Tuple[int, int, Dict]]:
    """(shard index, offset, raw WebDataset sample) of every sample a dataset's manifest lists, in order."""
    from data.schema import read_manifest
    from data.storage import join, tar_samples

    for shard_index, row in enumerate(read_manifest(root)["shards"]):
        for offset, raw in enumerate(tar_samples(join(root, row["path"]), handler=lambda error: False)):
            yield shard_index, offset, raw


def training_combinations(root) -> List[Tuple[str, str, str, str]]:
    """(colour, shape, motion, background) of every "moving" procedural caption in a dataset, in shard order: the
    prompts judged are "moving" ones, and a combination only ever captioned "drifting rightward" (a crossing) was
    not trained in the prompt's words."""
    found = []
    for _, _, raw in _raw_samples(root):
        try:
            parsed = parse_prompt(raw.get("txt", b"").decode("utf-8"))
        except UnicodeDecodeError:
            continue
        if parsed and parsed["pace"] == "moving":
            found.append((parsed["colour"], parsed["shape"], parsed["motion"], parsed["background"]))
    return found


def adherence_prompts(root, count: int, seed: int = 0) -> Dict[str, List[str]]:
    """`count` prompts whose combination the dataset holds (seen) and `count` it does not (held_out)."""
    trained = sorted(set(training_combinations(root)))
    everything = [c for c in itertools.product(sorted(COLOURS), SHAPES, sorted(MOTIONS), sorted(BACKGROUNDS))
                  if c[0] != c[3]]
    unseen = sorted(set(everything) - set(trained))
    rng = random.Random(seed)
    pick = lambda pool: [prompt_for(*c) for c in rng.sample(pool, min(count, len(pool)))]  # noqa: E731
    return {"seen": pick(trained), "held_out": pick(unseen)}


@torch.no_grad()
def prompt_adherence(model, autoencoder, text, cfg, device, prompts: Dict[str, List[str]],
                     shapes: Sequence[BucketShape]) -> Dict[str, Dict[str, float]]:
    """Split -> {attribute: share right, overall}; each prompt at one of `shapes`, cycling."""
    results = {}
    for split, texts in prompts.items():
        if not texts:
            continue
        plan = [shapes[i % len(shapes)] for i in range(len(texts))]
        videos = generate(model, autoencoder, text, texts, plan, cfg.tracking.sampling_steps, cfg.tracking.cfg_scale,
                          cfg.train.seed, cfg.train.shift_reference_tokens, device, cfg.tracking.sampler)
        results[split] = summarize(judge(p, v.numpy()) for p, v in zip(texts, videos))
    return results


# Where the judged clips start, along their motion (data/demo_set.py render_clip `start`): off the centre, in the
# middle of where the outward clips start ([-START_SPREAD, 0]). At the edge of that range the demo's model pulls a
# given object back toward the data's middle (x3's weights: the first generated frame where given, `start`, 1.0 at
# 0 and -0.25, 0.75 at -0.5, 0.69 at -0.75; BENCHMARKS.md, "Conditioning modes in the demo").
OFF_CENTRE = -0.25
# An extension's source is a crossing (data/demo_set.py CROSSING_REACH) from the back edge: at that speed 4x its
# length stays in the frame, so the motion can go on without the object leaving it; the crossings reach past both
# ends of that path (CROSSING_SPAN).
EXTEND_START = -1.0


def conditioned_modes(cfg) -> List[str]:
    """The judged modes (train/adherence.py MODE_ATTRIBUTES) that the last stage trains."""
    if not cfg.model.frame_conditioning:
        return []
    shares = cfg.curriculum.stages[-1].conditioning
    return [m for m in MODE_ATTRIBUTES if shares.get(m, 0.0) > 0]


@torch.no_grad()
def conditioned_adherence(model, autoencoder, text, cfg, device, prompts: Dict[str, List[str]],
                          shapes: Sequence[BucketShape], modes: Sequence[str]) -> Dict[str, Dict[str, float]]:
    """'<mode>/<split>' -> {attribute: share right, overall}, judged from pixels (train/adherence.py
    judge_conditioned). Each prompt's given frames are the procedural clip it describes, rendered at the shape and
    starting a quarter of the way back from the centre (OFF_CENTRE): its first frame (first_frame), first and last
    (first_last); or the first half of it as a crossing from the back edge, extended to 4x the shape's frames
    (extend)."""
    sampling = dict(steps=cfg.tracking.sampling_steps, cfg_scale=cfg.tracking.cfg_scale, seed=cfg.train.seed,
                    reference_tokens=cfg.train.shift_reference_tokens, device=device, sampler=cfg.tracking.sampler)
    results = {}
    for split, texts in prompts.items():
        cases = []  # (prompt, shape, rendered clip, rendered crossing, the crossing's prompt) per procedural prompt
        for i, prompt in enumerate(texts):
            wanted, shape = parse_prompt(prompt), shapes[i % len(shapes)]
            if wanted is None:  # judged from pixels: procedural prompts only
                continue
            # Off the centre, where the demo's outward clips start: the given frame has to be followed.
            drawn = (wanted["shape"], wanted["colour"], wanted["background"], wanted["motion"], shape.width,
                     shape.height, shape.frames)
            cases.append((prompt, shape, render_clip(*drawn, start=OFF_CENTRE),
                          render_clip(*drawn, reach=CROSSING_REACH, start=EXTEND_START),
                          prompt_for(wanted["colour"], wanted["shape"], wanted["motion"], wanted["background"],
                                     pace="drifting")))
        if not cases:
            continue
        texts_, plan, rendered, crossings, drifting = ([c[i] for c in cases] for i in range(5))
        for mode in modes:  # each mode's clips sampled together
            if mode == "extend":  # the source is a crossing, and its caption says so
                sources = [torch.from_numpy(r[:max(1, len(r) // 2)]) for r in crossings]
                videos = extend(model, autoencoder, text, drifting, sources, plan, 4 * max(s.frames for s in plan),
                                **dict(sampling, cfg_scale=cfg.tracking.extend_cfg_scale))
                rows = []
                for prompt, shape, source, video in zip(drifting, plan, sources, videos):
                    step = shape.frames - extension_context(shape, autoencoder.temporal_factor)
                    windows = list(range(len(source), len(video), max(1, step)))
                    rows.append(judge_conditioned(mode, prompt, video.numpy(), source.numpy(), windows))
            else:
                given = [given_latents(autoencoder, shape, first=torch.from_numpy(r[0]),
                                       last=torch.from_numpy(r[-1]) if mode == "first_last" else None)
                         for shape, r in zip(plan, rendered)]
                videos = generate(model, autoencoder, text, texts_, plan, given=given, **sampling)
                rows = [judge_conditioned(mode, p, v.numpy(), r) for p, v, r in zip(texts_, videos, rendered)]
            attributes = MODE_ATTRIBUTES[mode]
            scores = {a: sum(r[a] for r in rows) / len(rows) for a in attributes}
            scores["overall"] = sum(scores.values()) / len(attributes)
            results[f"{mode}/{split}"] = scores
    return results


def validation_clips(cfg, shapes: Sequence[BucketShape], limit: int) -> List[Dict]:
    """Up to `limit` clips of the validation split, through the same license gate and decoding as training."""
    from data.licenses import LicensePolicy
    from data.loader import LoaderSpec, prepare_sample

    root, ae = cfg.data.validation_root, cfg.model.autoencoder
    spec = LoaderSpec(root=root, policy=LicensePolicy.from_ids(cfg.data.licenses.allow), shapes=list(shapes),
                      token_budget=10 ** 9, patch_size=tuple(cfg.model.patch_size), temporal_factor=ae.temporal_factor,
                      spatial_factor=ae.spatial_factor, fps=cfg.data.fps, seed=cfg.data.seed, coordinator=None,
                      decoder=cfg.data.decoder)
    clips = []
    for shard_index, offset, raw in _raw_samples(root):
        item, _ = prepare_sample(raw, (0, shard_index, offset), spec)
        if item is not None:
            clips.append(item)
        if len(clips) >= limit:
            break
    return clips


@torch.no_grad()
def validation_loss(model, autoencoder, text, clips: Sequence[Dict], device) -> Dict[str, float]:
    """Mean velocity MSE over clips x VALIDATION_TIMESTEPS with noise fixed per clip: `overall` and per bucket
    (`FxHxW`). The timesteps are used as they are (no resolution shift), the same for every checkpoint."""
    was_training = model.training
    model.eval()
    per_bucket: Dict[str, List[float]] = {}
    for index, clip in enumerate(clips):
        video = clip.video
        losses = per_bucket.setdefault(f"{video.shape[0]}x{video.shape[1]}x{video.shape[2]}", [])
        x0 = autoencoder.encode(video).to(device)
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(index)).to(device)
        caption = text.batch([clip.caption], device)
        # Under diffusers' I2V inputs a clip given no frame reads the grey clip's latents as its condition.
        grey = autoencoder.blank(tuple(x0.shape)).to(device) if model.cfg.pipeline_inputs else None
        for t in VALIDATION_TIMESTEPS:
            x_t, target = noisy_pair(x0, noise, t)
            prediction = model([text_only_input(model.cfg, x_t, grey)], torch.tensor([t], device=device), caption)
            losses.append(float((prediction.float() - model.dit.patchify([target]).float()).pow(2).mean()))
    model.train(was_training)
    if not per_bucket:
        return {}
    every = [v for values in per_bucket.values() for v in values]
    result = {"overall": sum(every) / len(every)}
    result.update({bucket: sum(v) / len(v) for bucket, v in sorted(per_bucket.items())})
    return result


class Evaluator:
    """The run's evaluation, set up once: prompts chosen, validation clips decoded."""

    def __init__(self, cfg, autoencoder, text, device):
        self.cfg, self.autoencoder, self.text, self.device = cfg, autoencoder, text, device
        self.shapes = last_stage_shapes(cfg, longest=False)  # the shortest clips: motion shows, sampling is cheap
        count = cfg.tracking.eval_prompts
        self.prompts = adherence_prompts(cfg.data.root, count, cfg.train.seed) if count else {}
        self.clips = validation_clips(cfg, self.shapes, cfg.tracking.eval_clips) \
            if cfg.data.validation_root and cfg.tracking.eval_clips else []

    def __call__(self, model) -> Dict[str, float]:
        """Flat metrics: eval/adherence/<split>/<attribute>, eval/val_loss, eval/val_loss/<bucket>."""
        metrics: Dict[str, float] = {}
        for split, scores in prompt_adherence(model, self.autoencoder, self.text, self.cfg, self.device,
                                              self.prompts, self.shapes).items():
            metrics.update({f"eval/adherence/{split}/{k}": v for k, v in scores.items()})
        for key, scores in conditioned_adherence(model, self.autoencoder, self.text, self.cfg, self.device,
                                                 self.prompts, self.shapes, conditioned_modes(self.cfg)).items():
            metrics.update({f"eval/{key}/{k}": v for k, v in scores.items()})
        if self.clips:
            losses = validation_loss(model, self.autoencoder, self.text, self.clips, self.device)
            metrics.update({("eval/val_loss" if k == "overall" else f"eval/val_loss/{k}"): v
                            for k, v in losses.items()})
        return metrics


def _score_rows(metrics: Dict[str, float], key: str, title: str, attributes: Sequence[str], width: int,
                indent: str = "") -> List[str]:
    """A header of `attributes` + overall, then a row per split of the eval/<key>/<split>/<attribute> metrics."""
    splits = sorted({k.split("/")[2] for k in metrics if k.startswith(f"eval/{key}/")})
    if not splits:
        return []
    columns = list(attributes) + ["overall"]
    rows = [f"{title:<{width}}" + "".join(f"{c:>12}" for c in columns)]
    for split in splits:
        rows.append(f"{indent}{split:<{width - len(indent)}}"
                    + "".join(f"{metrics.get(f'eval/{key}/{split}/{c}', math.nan):>12.2f}" for c in columns))
    return rows


def table(metrics: Dict[str, float]) -> str:
    """The adherence scores as a small text table, plus the validation loss."""
    lines = _score_rows(metrics, "adherence", "prompts", ATTRIBUTES, 10)
    for mode, attributes in MODE_ATTRIBUTES.items():  # the modes judged, each with its own columns
        lines += _score_rows(metrics, mode, mode, attributes, 22, indent="  ")
    if "eval/val_loss" in metrics:
        lines.append(f"validation loss {metrics['eval/val_loss']:.4f} (fixed timesteps "
                     f"{', '.join(map(str, VALIDATION_TIMESTEPS))}, fixed noise)")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = ArgumentParser(prog="python -m train.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--step", type=at_least(0, "a checkpoint step"), default=None,
                        help="checkpoint step (default: latest)")
    parser.add_argument("--raw", action="store_true", help="the trained weights instead of the EMA")
    parser.add_argument("--prompts", type=at_least(0, "prompts"), default=None,
                        help="prompts per split (default: tracking.eval_prompts, else 8)")
    parser.add_argument("--clips", type=at_least(0, "clips"), default=None,
                        help="validation clips (default: tracking.eval_clips, else 16)")
    parser.add_argument("--validation-root", default=None,
                        help="held-out split (default: data.validation_root, else DATA_ROOT/validation if present)")
    parser.add_argument("--json", type=Path, default=None, help="also write the metrics here")
    args = parser.parse_args(argv)
    from train.generate import load_for_generation

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg, model, autoencoder, text, checkpoint = load_for_generation(args.run_dir, args.step, args.raw, device)
    cfg.tracking.eval_prompts = args.prompts if args.prompts is not None else (cfg.tracking.eval_prompts or 8)
    from data.storage import location

    default_split = location(cfg.data.root) / "validation"
    cfg.data.validation_root = args.validation_root or cfg.data.validation_root or \
        (str(default_split) if (default_split / "manifest.json").exists() else None)
    clips = args.clips if args.clips is not None else (cfg.tracking.eval_clips or 16)
    cfg.tracking.eval_clips = clips if cfg.data.validation_root else 0
    metrics = Evaluator(cfg, autoencoder, text, device)(model)
    print(f"{checkpoint} ({'raw' if args.raw else 'EMA'} weights)")
    print(table(metrics))
    if args.json:
        args.json.write_text(json.dumps(metrics, indent=1, sort_keys=True))


if __name__ == "__main__":
    from conf.errors import run_command

    raise SystemExit(run_command("kino", main))
