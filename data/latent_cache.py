"""Latent caches: `python -m data encode DATASET --out CACHE [--stage NAME] [--workers N] [overrides]`.

A Ray Data job: source shards -> (per shard, in a pool of encoder actors: GPU actors where GPUs exist) license
gate -> decode -> fit to the chosen curriculum stage's buckets -> the frozen autoencoder, and the frozen text
encoder when the run uses a pretrained one -> one latent WebDataset shard per source shard, under the source
shard's name, then a manifest.

A cache keeps the source's layout: sample n of a cache shard is sample n of its source shard, so the data plan
(chunks of shard offsets) is the same over the videos and over every cache of them, and a run can train some
stages from the videos and others from caches (`curriculum.stages[i].latents`) within one epoch. A sample the
encode dropped stays as a stub, `drop` (the reason) and the source's `json`: training reports it as a drop for
that reason, as it would from the videos, and a takedown finds it by its metadata.

An encoded sample holds `latent.npy` (C, T, H, W float32), `txt` (the caption), `text.npy` (the caption's
embeddings, pretrained text encoders only), `image.npy` (CLIP's tokens of the clip's first and last frames, (2,
tokens, dim) float32, for a model with an image branch: model.image, Wan 2.1 I2V), `condition.npy` (for a model
that reads diffusers' I2V pipeline's inputs, model.image.inputs=pipeline: the autoencoder's encodings of the clip's
first frame followed by grey frames, and the last latent frame of [grey..., last] and of [first, grey..., last],
(C, T + 2, H, W) float32: models/conditioning.py cached_conditions) and `json`: the source sample's metadata (license, rights holder,
source URL, ...) plus `source_shard`, `source_key`, `bucket` (frames, height, width) and `encoder` (the short
hash of the encoder identity). The manifest's `cache` section records the identity in full (each encoder's
config and the sha256 of its weights), the stage's buckets, the data fps, the source dataset and the drops per
reason. A shard is written under a temporary name and renamed when whole, with a `.done.json` beside it, so a
killed job resumes without re-encoding finished shards. Training reads a cache through a stage's `latents`
(`curriculum.stages[i].latents`) or, for every stage without one, `data.latents`.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import tarfile
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from data.schema import MANIFEST_NAME, MANIFEST_VERSION, read_manifest, write_manifest
from data.shards import sha256_file
from data.storage import location, make_folder, staged, write_text
from models.weights import weights_sha256

# Keys of an encoder's config that do not change what it computes (where its weights live, how many clips a call
# takes): left out of the identity; the weights' sha256 stands for `path`.
NOT_IDENTITY = ("path", "tokenizer_path", "encode_batch")
# 2: one shard per source shard under the source's name, every source sample at its own offset (a dropped one as a
# stub that names the reason). Format 1 (latent-*.tar, drops left out) cannot be mixed with the videos.
CACHE_FORMAT = 2


def encoder_identity(model_cfg) -> Dict[str, Any]:
    """What makes two caches interchangeable: each frozen encoder's config and the sha256 of its weights. Its
    `dtype` as it runs on this machine's device (auto: bf16 on CUDA, fp32 elsewhere), where encoding runs, and
    where a run that reads the cache would otherwise run the encoder."""
    import torch

    from models.precision import FROZEN_DTYPES, frozen_dtype

    device = "cuda" if torch.cuda.is_available() else "cpu"
    names = {dtype: name for name, dtype in FROZEN_DTYPES.items()}
    ae = {k: v for k, v in asdict(model_cfg.autoencoder).items() if k not in NOT_IDENTITY}
    ae["weights_sha256"] = model_cfg.autoencoder.path and weights_sha256(model_cfg.autoencoder.path)
    if ae["name"] == "pixel":  # no network: nothing computes in a dtype
        ae.pop("dtype")
    else:
        ae["dtype"] = names[frozen_dtype(model_cfg.autoencoder.dtype, device)]
    identity = {"autoencoder": ae}
    if model_cfg.text.name == "pretrained":  # the built-in encoder trains with the model: captions are cached
        text = {k: v for k, v in asdict(model_cfg.text).items() if k not in NOT_IDENTITY}
        text["weights_sha256"] = model_cfg.text.path and weights_sha256(model_cfg.text.path)
        text["dtype"] = names[frozen_dtype(model_cfg.text.dtype, device)]
        identity["text"] = text
    else:
        identity["text"] = {"name": "builtin", "cached": "captions only"}
    if model_cfg.image.path:  # the first and last frames' CLIP tokens are cached (a run without images has no key)
        # `images` (1: I2V, 2: FLF2V) is left out: image.npy holds the first and the last frame's tokens either way.
        image = {k: v for k, v in asdict(model_cfg.image).items() if k not in NOT_IDENTITY + ("images",)}
        image["weights_sha256"] = weights_sha256(model_cfg.image.path)
        image["dtype"] = names[frozen_dtype(model_cfg.image.dtype, device)]
        identity["image"] = image
    return identity


def identity_hash(identity: Dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def differences(saved: Any, current: Any, prefix: str = "") -> List[str]:
    """Every key where two nested dicts differ, as 'key: the cache has X, the config gives Y'."""
    if isinstance(saved, dict) and isinstance(current, dict):
        found = []
        for key in sorted(set(saved) | set(current)):
            found += differences(saved.get(key), current.get(key), f"{prefix}.{key}" if prefix else key)
        return found
    if isinstance(saved, (list, tuple)) and isinstance(current, (list, tuple)):
        saved, current = [list(x) if isinstance(x, tuple) else x for x in saved], \
            [list(x) if isinstance(x, tuple) else x for x in current]
    return [] if saved == current else [f"{prefix}: the cache has {saved!r}, the config gives {current!r}"]


def _npy(array) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array))
    return buffer.getvalue()


def load_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


class ShardEncoder:
    """One actor of the pool: the frozen encoders, loaded once; encodes whole source shards (Ray Data batches of
    shard rows) into latent shards."""

    def __init__(self, cfg_yaml: str, stage_index: int, source: str, out: str):
        import torch

        from conf.schema import from_yaml
        from data.licenses import LicensePolicy
        from data.loader import stage_spec
        from models.autoencoder import build_autoencoder
        from models.dit import text_conditioner

        self.cfg = cfg = from_yaml(cfg_yaml)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.autoencoder = build_autoencoder(cfg.model.autoencoder)
        if hasattr(self.autoencoder, "to"):  # a frozen network (the pixel space has none): where it encodes
            self.autoencoder = self.autoencoder.to(self.device)
        self.text = text_conditioner(cfg.model) if cfg.model.text.name == "pretrained" else None
        if self.text is not None:
            self.text.to(self.device)
        self.images = getattr(self.text, "image_encoder", None)  # a pretrained text conditioner carries it
        if cfg.model.image.path and self.images is None:
            from models.image_encoder import ImageEncoder

            self.images = ImageEncoder(cfg.model.image).to(self.device)
        self.spec = stage_spec(cfg, cfg.curriculum.stages[stage_index], source,
                               LicensePolicy.from_ids(cfg.data.licenses.allow), coordinator=None)
        self.identity_hash = identity_hash(encoder_identity(cfg.model))
        from models.conditioning import pipeline_inputs

        self.conditions = pipeline_inputs(cfg.model)  # condition.npy: what a given first or last frame reads
        self.source, self.out = location(source), location(out)

    def __call__(self, batch: Dict[str, Any]) -> Dict[str, List[Any]]:
        summaries = [self.encode_shard(str(path), int(index), int(count))
                     for path, index, count in zip(batch["path"], batch["index"], batch["count"])]
        return {"summary": [json.dumps(s) for s in summaries]}

    def encode_shard(self, shard: str, index: int, count: int) -> Dict[str, Any]:
        import torch

        from data.loader import CORRUPT_SHARD, prepare_sample
        from data.reader import ConsumerReader
        from data.tar_samples import add_sample

        target = self.out / shard
        done = self.out / f"{shard}.done.json"
        if done.exists() and target.exists():  # finished by an earlier, killed run
            return dict(json.loads(done.read_text()), resumed=True)
        dropped: Dict[str, List[str]] = {}
        written, licenses = 0, Counter()
        # Read as training reads (one chunk of the whole shard): offset n of the cache is offset n of the source,
        # so a run can take some stages from the videos and others from caches and continue the same epoch.
        reader = ConsumerReader(self.source, None, "encode", 0, 1)
        work = {"epoch": 0, "chunk": index, "start": 0, "stop": count, "shard": shard, "skip": []}
        with staged(target) as tmp:
            with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
                for raw, tag, error in reader.read_chunk(work):
                    # A sample the shard could not give keeps its place under a key without dots (WebDataset splits a
                    # member's name at the first dot: "shard-00000.tar@5" would merge every such stub into one).
                    key = raw.get("__key__") if raw else f"{shard.replace('.', '_')}@{tag[2]}"
                    clip, reason = (None, CORRUPT_SHARD) if error else prepare_sample(raw, tag, self.spec)
                    if clip is None:
                        # A stub keeps the sample's place and says why it was dropped (training reports it as the
                        # videos would); the source's metadata stays with it, so a takedown finds it as in the source.
                        dropped.setdefault(reason, []).append(key)
                        members = {"drop": reason.encode("utf-8")}
                        if raw and "json" in raw:
                            members["json"] = raw["json"]
                    else:
                        with torch.no_grad():
                            latent = self.autoencoder.encode_batch([clip.video.to(self.device)])[0].float().cpu()
                        members = {"latent.npy": _npy(latent.numpy()), "txt": clip.caption.encode("utf-8")}
                        if self.text is not None:
                            embeddings = self.text.batch([clip.caption], self.device).embeddings.float().cpu().numpy()
                            members["text.npy"] = _npy(embeddings)
                        if self.images is not None:  # what a clip given its first or last frame reads
                            tokens = self.images.encode([clip.video[0], clip.video[-1]]).cpu().numpy()
                            members["image.npy"] = _npy(tokens)
                        if self.conditions:
                            from models.conditioning import cached_conditions

                            with torch.no_grad():
                                stored = cached_conditions(self.autoencoder, clip.video)
                            members["condition.npy"] = _npy(stored.float().cpu().numpy())
                        bucket = list(clip.video.shape[:3])  # frames, height, width the clip was fitted to
                        meta = dict(clip.meta, source_shard=shard, source_key=key, bucket=bucket,
                                    encoder=self.identity_hash)
                        members["json"] = json.dumps(meta, sort_keys=True).encode()
                        written += 1
                        licenses[str(meta.get("license"))] += 1
                    add_sample(tar, key, members)
            size, digest = tmp.stat().st_size, sha256_file(tmp)  # before upload: storage is not read back
        summary = {"source_shard": shard, "path": shard, "num_samples": count, "encoded": written,
                   "bytes": size, "sha256": digest, "licenses": dict(licenses),
                   "dropped": dropped}
        write_text(done, json.dumps(summary))
        return summary


def encode(source, out, cfg, stage_index: int, workers: int = 1, ray_address: Optional[str] = None
           ) -> Dict[str, Any]:
    """Encode every shard of `source` into `out` with a pool of `workers` encoder actors; returns the manifest."""
    import ray

    from conf.schema import to_yaml
    from data.loader import dataset_fingerprint
    from data.buckets import stage_shapes

    source, out = location(source), location(out)
    rows = [{"path": row["path"], "index": n, "count": int(row["num_samples"])}
            for n, row in enumerate(read_manifest(source)["shards"])]  # first: a source that is no dataset
    make_folder(out)                                                       # leaves no cache folder behind
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not ray.is_initialized():
        ray.init(address=ray_address or "local", num_cpus=None if ray_address else max(workers, 1),
                 include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    import torch

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    gpus = 1 if torch.cuda.is_available() else 0
    dataset = ray.data.from_items(rows).map_batches(
        ShardEncoder, batch_size=1, concurrency=workers, num_cpus=0 if gpus else 1, num_gpus=gpus,
        fn_constructor_args=(to_yaml(cfg), stage_index, str(source), str(out)))
    started, summaries, samples = time.monotonic(), [], 0
    for row in dataset.iter_rows():  # shards as they finish: a progress line each
        summary = json.loads(row["summary"])
        summaries.append(summary)
        samples += summary["encoded"]
        elapsed = time.monotonic() - started
        left = (len(rows) - len(summaries)) * elapsed / len(summaries)
        filled = round(20 * len(summaries) / len(rows))
        print(f"encode: {len(summaries)}/{len(rows)} shards, {samples} samples, {samples / max(elapsed, 1e-9):.1f} "
              f"samples/s, ETA {left:.0f} s [{'#' * filled}{'.' * (20 - filled)}]"
              f"{' (resumed: already encoded)' if summary.get('resumed') else ''}", file=sys.stderr, flush=True)
    summaries.sort(key=lambda s: s["path"])
    dropped = Counter()
    for summary in summaries:
        for reason, keys in summary["dropped"].items():
            dropped[reason] += len(keys)
    stage = cfg.curriculum.stages[stage_index]
    manifest = {"version": MANIFEST_VERSION, "name": out.name, "builder": "data.encode",
                "shards": [{k: s[k] for k in ("path", "num_samples", "encoded", "bytes", "sha256", "licenses")}
                           for s in summaries],
                "cache": {"format": CACHE_FORMAT,
                          "source": str(source.resolve() if isinstance(source, Path) else source),
                          "source_fingerprint": dataset_fingerprint(source),
                          "stage": stage.name, "fps": cfg.data.fps, "patch_size": list(cfg.model.patch_size),
                          "buckets": [[s.frames, s.height, s.width] for s in stage_shapes(cfg, stage)],
                          "encoder": encoder_identity(cfg.model), "dropped": dict(dropped),
                          "dropped_keys": {r: [k for s in summaries for k in s["dropped"].get(r, [])]
                                           for r in dropped}}}
    if cfg.model.text.name == "pretrained":  # caption dropout trains on the empty caption's embedding
        from dataclasses import replace

        from models.dit import text_conditioner

        captions_only = replace(cfg.model, image=replace(cfg.model.image, path=None))  # no CLIP for a caption
        empty = text_conditioner(captions_only).batch([""]).embeddings.float().numpy()
        with staged(out / "empty_caption.npy") as tmp:
            tmp.write_bytes(_npy(empty))
    write_manifest(out, manifest)
    return manifest


def stage_root(cfg, stage) -> str:
    """Where a stage reads its samples: its own cache, else the run's (data.latents), else the videos."""
    return stage.latents or cfg.data.latents or cfg.data.root


def run_roots(cfg) -> List[str]:
    """The distinct places the run's stages read from, in stage order (the first gives the data plan's rows)."""
    roots: List[str] = []
    for stage in cfg.curriculum.stages:
        root = stage_root(cfg, stage)
        if root not in roots:
            roots.append(root)
    return roots


def with_fp32_default(identity: Dict[str, Any]) -> Dict[str, Any]:
    """A cache's encoder identity, a dtype filled in where it has none: such caches were encoded in fp32 (before
    model.autoencoder.dtype, and model.text.dtype, existed), or with model.text.dtype=auto on a CPU."""
    identity = {part: dict(value) if isinstance(value, dict) else value for part, value in identity.items()}
    for part in ("autoencoder", "text"):
        if isinstance(identity.get(part), dict) and identity[part].get("name") not in ("builtin", "pixel"):
            if identity[part].get("dtype") in (None, "auto"):
                identity[part]["dtype"] = "fp32"
    return identity


def cache_problems(manifest: Dict[str, Any], cfg, stage_indices: List[int],
                   videos_fingerprint: Optional[str] = None) -> List[str]:
    """Every difference between a cache (its manifest) and the run's config: its format, the encoders' identity,
    the data fps and patch size, the buckets of each stage that reads it, and, when the run reads the videos too
    (`videos_fingerprint`), whether it was encoded from them as they are now."""
    from data.buckets import stage_shapes

    saved = manifest.get("cache")
    if saved is None:
        return ["it is a video dataset, not a latent cache (build one with python -m data encode)"]
    if saved.get("format", 1) != CACHE_FORMAT:
        return [f"cache format {saved.get('format', 1)}, this Kino reads format {CACHE_FORMAT} (every source sample "
                f"at its own offset): encode it again with python -m data encode"]
    problems = [f"encoder.{d}" for d in differences(with_fp32_default(saved["encoder"]), encoder_identity(cfg.model))]
    problems += differences(saved["fps"], cfg.data.fps, "data.fps")
    problems += differences(saved["patch_size"], list(cfg.model.patch_size), "model.patch_size")
    for n in stage_indices:
        buckets = [[s.frames, s.height, s.width] for s in stage_shapes(cfg, cfg.curriculum.stages[n])]
        problems += differences(saved["buckets"], buckets, f"curriculum.stages[{n}] buckets")
        if cfg.curriculum.stages[n].image_fraction > 0 and not first_frame_alone(cfg.model.autoencoder):
            problems.append(f"curriculum.stages[{n}].image_fraction: a cached sample trains as an image on its first "
                            f"latent frame, which this autoencoder is not known to encode from the first frame alone "
                            f"(tests/unit/test_cached_images.py); train this stage's images from the videos")
    # Stages that read the videos and stages that read a cache must see the same samples: a rebuild keeps shard
    # names and counts, not content.
    if videos_fingerprint is not None and not problems and saved.get("source_fingerprint") != videos_fingerprint:
        problems.append(f"it was encoded from other videos than data.root={cfg.data.root} holds now (their "
                        f"fingerprints differ: a rebuild, or a takedown of one and not the other). Encode it "
                        f"again, or take samples down from both together (python -m data takedown DATASET CACHE)")
    return problems


# Autoencoders whose first latent frame encodes the first frame alone (causal in time): checked with random
# weights by tests/unit/test_cached_images.py.
CAUSAL_DIFFUSERS_AUTOENCODERS = ("AutoencoderKLWan",)


def first_frame_alone(autoencoder_cfg) -> bool:
    if autoencoder_cfg.name in ("pixel", "causal_vae") or autoencoder_cfg.temporal_factor == 1:
        return True
    config = Path(autoencoder_cfg.path or "") / "config.json"
    return config.is_file() and json.loads(config.read_text()).get("_class_name") in CAUSAL_DIFFUSERS_AUTOENCODERS


def check_sources(cfg) -> None:
    """Raise ValueError unless every stage can read its source: each cache matches the run (naming every
    difference), and every source holds the same shards with the same sample counts, so one data plan deals the
    same samples over all of them."""
    from data.loader import dataset_fingerprint, dataset_rows

    stages, roots = cfg.curriculum.stages, run_roots(cfg)
    videos = dataset_fingerprint(cfg.data.root) if cfg.data.root in roots else None
    for root in roots:
        if root == cfg.data.root:
            continue
        users = [n for n, stage in enumerate(stages) if stage_root(cfg, stage) == root]
        key = (f"curriculum.stages[{users[0]}].latents" if stages[users[0]].latents else "data.latents")
        if not (location(root) / MANIFEST_NAME).exists():
            raise ValueError(f"{key}={root}: no {MANIFEST_NAME} (build the cache with python -m data encode)")
        problems = cache_problems(read_manifest(root), cfg, users, videos)
        if problems:
            raise ValueError(f"{key}={root} does not match this run:\n  " + "\n  ".join(problems))
    reference = dict(dataset_rows(roots[0]))
    for root in roots[1:]:
        rows = dict(dataset_rows(root))
        differ = [f"{shard}: {reference.get(shard, 'absent')} vs {rows.get(shard, 'absent')} samples"
                  for shard in sorted(set(reference) | set(rows)) if reference.get(shard) != rows.get(shard)]
        if differ:
            raise ValueError(
                f"{roots[0]} and {root} (read by different stages) do not hold the same samples: "
                f"{'; '.join(differ[:3])}{' ...' if len(differ) > 3 else ''}. A cache keeps its source's shards "
                f"and sample counts: take samples down from the videos and every cache together (python -m data "
                f"takedown DATASET CACHE ...), or encode the cache again")
