"""Loader throughput per core: Kino's loader against a naive baseline, measured in one run.

Kino: coordinator chunk plan -> license gate on metadata -> decord decodes only the frames the clip
needs (target fps, one temporal crop) -> resize/crop to the stage bucket -> pack into token budgets.
Baseline: webdataset -> decord decodes every frame of every clip -> resize to the largest bucket ->
fixed-size batches padded to the longest clip (no license gate, no buckets).

  python benchmarks/data_throughput.py datasets/demo --clips 200
Both run in this one process (one core; torch and decord limited to one thread). Kino's loader is then measured
with each decoder of `data.decoder` that loads here (decord, pyav, torchcodec), side by side: frames/s per core.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)


def kino(root: str, clips: int, cfg, decoder: str = "decord") -> dict:
    from data.coordinator import CoordinatorClient, CoordinatorCore
    from data.licenses import LicensePolicy
    from data.loader import ClipStream, LoaderSpec, dataset_rows
    from train.curriculum import stage_shapes

    stage = cfg.curriculum.stages[-1]
    spec = LoaderSpec(root=root, policy=LicensePolicy.from_ids(cfg.data.licenses.allow),
                      shapes=stage_shapes(cfg, stage), token_budget=stage.token_budget,
                      patch_size=tuple(cfg.model.patch_size), temporal_factor=1, spatial_factor=1, fps=cfg.data.fps,
                      seed=0, coordinator=CoordinatorClient(CoordinatorCore(dataset_rows(root))), decoder=decoder)
    stream = iter(ClipStream(spec))
    start, done, frames, tokens, capacity = time.perf_counter(), 0, 0, 0, 0
    while done < clips:
        batch = next(stream)
        if not batch.videos:
            continue
        done += len(batch.videos)
        frames += sum(v.shape[0] for v in batch.videos)
        tokens += batch.tokens
        capacity += stage.token_budget
    seconds = time.perf_counter() - start
    return {"clips_per_s": done / seconds, "frames_per_s": frames / seconds, "useful_token_frac": tokens / capacity}


def baseline(root: str, clips: int, cfg) -> dict:
    import decord
    import torch.nn.functional as F
    import webdataset as wds

    from data.schema import read_manifest
    from train.curriculum import stage_shapes

    stage = cfg.curriculum.stages[-1]
    largest = max(stage_shapes(cfg, stage), key=lambda s: s.frames * s.height * s.width)
    batch_size = max(1, stage.token_budget // largest.tokens(cfg.model.patch_size))
    urls = [f"{root}/{row['path']}" for row in read_manifest(root)["shards"]]
    start, done, frames, useful, padded, batch, lost = time.perf_counter(), 0, 0, 0, 0, [], 0
    while done < clips:
        for sample in wds.WebDataset(urls, shardshuffle=False, handler=wds.warn_and_continue,
                                     nodesplitter=None, workersplitter=None, empty_check=False):
            try:
                reader = decord.VideoReader(io.BytesIO(sample["mp4"]), num_threads=1)
                video = reader.get_batch(list(range(len(reader)))).asnumpy()  # every frame
            except Exception:
                lost += 1  # decord's width bug (and corrupt videos): the naive loader just loses them
                continue
            x = torch.from_numpy(video).permute(0, 3, 1, 2).float()
            x = F.interpolate(x, size=(largest.height, largest.width), mode="bilinear", antialias=True)
            batch.append(x)
            frames += len(video)
            done += 1
            if len(batch) == batch_size:
                longest = max(v.shape[0] for v in batch)
                torch.stack([F.pad(v, (0, 0, 0, 0, 0, 0, 0, longest - v.shape[0])) for v in batch])
                useful += sum(v.shape[0] for v in batch)
                padded += longest * len(batch)
                batch = []
            if done >= clips:
                break
    seconds = time.perf_counter() - start
    return {"clips_per_s": done / seconds, "frames_per_s": frames / seconds,
            "useful_token_frac": useful / max(padded, 1), "clips_lost": lost}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root")
    parser.add_argument("--clips", type=int, default=200)
    args = parser.parse_args()
    from conf.schema import load_config

    cfg = load_config(["experiment=demo"])
    kino(args.root, 10, cfg)  # warm caches (files, decord) for both
    result = {"date": time.strftime("%Y-%m-%d"), "dataset": args.root, "clips": args.clips, "cores": 1,
              "kino": kino(args.root, args.clips, cfg), "baseline": baseline(args.root, args.clips, cfg)}
    result["speedup_clips_per_s"] = result["kino"]["clips_per_s"] / result["baseline"]["clips_per_s"]
    result["speedup_useful_tokens_per_s"] = result["speedup_clips_per_s"] * (
        result["kino"]["useful_token_frac"] / result["baseline"]["useful_token_frac"])
    from data.decode import DECODERS, decoder_unavailable

    result["decoders"] = {}
    for decoder in DECODERS:  # the same loader, the same clips, each decoder that loads here
        why = decoder_unavailable(decoder)
        if why:
            result["decoders"][decoder] = {"unavailable": why}
            continue
        kino(args.root, 10, cfg, decoder)
        result["decoders"][decoder] = kino(args.root, args.clips, cfg, decoder)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
