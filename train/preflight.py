"""Checks of what a config names on disk, run where the run starts (`python -m train` before its process group,
`launch local` before torchrun), never by `validate` (conf/schema.py): on a cluster the paths are the nodes', and
need not exist where `launch slurm|k8s` renders the job. Each raises ConfigError naming the key."""
from __future__ import annotations

from typing import List

from conf.errors import ConfigError
from conf.schema import KinoConfig
from data.storage import location


def check_data(cfg: KinoConfig) -> None:
    """What the config names on disk, before any process group starts: every dataset the run reads holds a
    manifest, each latent cache matches the run and its sources hold the same samples, and the base weights have
    the configured architecture. Run where the run starts (`python -m train`, `launch local`), not in `validate`:
    on a cluster the paths are the nodes', and need not exist where `launch slurm|k8s` renders the job."""
    missing = missing_manifests(cfg)
    if missing:
        raise ConfigError("the run's data is not there: " + "; ".join(missing))
    check_base_weights(cfg)
    check_image_encoder(cfg)
    if cfg.data.latents or any(stage.latents for stage in cfg.curriculum.stages):
        from data.latent_cache import check_sources

        try:
            check_sources(cfg)
        except (ValueError, OSError) as error:
            raise ConfigError(str(error)) from error


def missing_manifests(cfg: KinoConfig) -> List[str]:
    """The datasets this run reads that hold no manifest, each with its key."""

    from data.latent_cache import run_roots
    from data.schema import MANIFEST_NAME

    wanted = []
    if cfg.data.root in run_roots(cfg) or cfg.tracking.eval_prompts:  # videos, or the prompts' captions
        wanted.append(("data.root", cfg.data.root))
    if cfg.data.validation_root and (cfg.tracking.eval_clips or cfg.train.method == "vae"):
        wanted.append(("data.validation_root", cfg.data.validation_root))
    return [f"{key}={root}: no {MANIFEST_NAME} (build a dataset with python -m data ingest, or the demo's with "
            f"python -m data.demo_set)" for key, root in wanted if not (location(root) / MANIFEST_NAME).exists()]


def check_base_weights(cfg: KinoConfig) -> None:
    """model.init_from against the configured architecture, key by key (the files' headers only; the weights are
    read when the run starts)."""
    model = cfg.model
    if not model.init_from:
        return
    from pathlib import Path

    from models.dit import context_dim
    from models.wan_weights import WeightsMismatch, check_matches

    if not Path(model.init_from).is_dir():
        raise ConfigError(f"model.init_from={model.init_from} is not a directory (a diffusers WanTransformer3DModel)")
    if model.text.name == "pretrained" and not (Path(model.text.path) / "config.json").exists():
        raise ConfigError(f"model.text.path={model.text.path} holds no config.json (a T5/UMT5 encoder directory)")
    try:
        check_matches(model.init_from, model, context_dim(model))
    except WeightsMismatch as error:
        raise ConfigError(str(error)) from error


def check_image_encoder(cfg: KinoConfig) -> None:
    """model.image.path: a CLIPVisionModel directory whose width and tokens an image are model.image's (its config
    alone; the weights load when the run starts)."""
    image = cfg.model.image
    if not image.path:
        return
    from models.image_encoder import clip_config, shape_problems

    try:
        problems = shape_problems(clip_config(image.path), image)
    except (ValueError, OSError) as error:
        raise ConfigError(str(error)) from error
    if problems:
        raise ConfigError(f"model.image.path={image.path} does not match the config: " + "; ".join(problems))
