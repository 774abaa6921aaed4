"""Latent caches (`python -m data encode`, a real Ray Data job on a local Ray cluster) and training from them
(`data.latents`): the same samples and the same audit as training from the videos; a killed encode resumes to
the same output; a cache of other encoder weights, or other buckets, is refused by name."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, shared_ray_address
from tests.forked_ranks import run_ranks

MODEL = ["model.dim=64", "model.depth=2", "model.heads=2", "model.text.dim=32", "model.text.depth=1",
         "model.text.heads=2"]
RUN = ["curriculum.stages.0.steps=8", "curriculum.stages.1.steps=2", "tracking.mode=disabled", "tracking.eval_prompts=0",
       "tracking.eval_clips=0", "tracking.sampling_steps=2", "train.checkpoint_every=5"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline")


def encode(dataset: Path, out: Path, *overrides: str, workers: int = 1, wait: bool = True):
    command = [sys.executable, "-m", "data", "encode", str(dataset), "--out", str(out), "--workers", str(workers),
               "experiment=demo", *MODEL, *overrides]
    if not wait:  # to be killed: its own local Ray cluster, which dies with it
        return subprocess.Popen(command, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
    # on the session's Ray head: a local Ray cluster costs each encode about 8 s to start
    command.append(f"data.ray_address={shared_ray_address()}")
    result = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def cache(tmp_path_factory, tiny_dataset):
    out = tmp_path_factory.mktemp("cache") / "latents"
    result = encode(tiny_dataset, out, workers=2)
    assert "encoded 16 samples" in result.stdout and "samples/s" in result.stderr
    return out


def train(run_dir: Path, dataset: Path, *overrides: str):
    """`python -m train` on one process, with the demo's buckets (the cache's) for both stages."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m", "train",
               "experiment=demo", f"data.root={dataset}", f"train.run_dir={run_dir}", *MODEL, *RUN, *overrides]
    result = run_ranks(command, cwd=REPO, env=ENV, timeout=600)  # forked ranks: tests/forked_ranks.py
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def trained_keys(run_dir: Path):
    from train.provenance import read_trained_keys

    return {key for record in read_trained_keys(run_dir) for key in record["keys"]}


def test_the_cache_records_each_sample_its_source_and_the_encoder(cache, tiny_dataset):
    manifest = json.loads((cache / "manifest.json").read_text())
    meta = manifest["cache"]
    assert meta["dropped"] == {"license_missing": 2, "license_not_allowed": 2, "undecodable": 1}
    assert meta["encoder"]["autoencoder"]["name"] == "pixel" and meta["stage"] == "anneal"
    assert sum(s["encoded"] for s in manifest["shards"]) == 16
    from data.tar_samples import TarSample, decode_sample, read_tar

    # The source's layout: the same shard names, and each source sample at its own place (a dropped one as a stub
    # naming the reason).
    source = json.loads((tiny_dataset / "manifest.json").read_text())["shards"]
    assert [(s["path"], s["num_samples"]) for s in manifest["shards"]] == [(s["path"], s["num_samples"]) for s in source]
    for row in manifest["shards"]:
        ours = [s for s in read_tar(cache / row["path"]) if isinstance(s, TarSample)]
        theirs = [s for s in read_tar(tiny_dataset / row["path"]) if isinstance(s, TarSample)]
        assert [s.key for s in ours] == [s.key for s in theirs]
    samples = [s for row in manifest["shards"] for s in read_tar(cache / row["path"]) if isinstance(s, TarSample)]
    stubs = {s.key: s.members["drop"].decode() for s in samples if "drop" in s.members}
    assert sorted(stubs.values()) == sorted(r for r, n in meta["dropped"].items() for _ in range(n))
    assert stubs == {k: r for r, keys in meta["dropped_keys"].items() for k in keys}
    sample = next(s for s in samples if "latent.npy" in s.members)
    _, _, sample_meta, _ = decode_sample(sample, video_member="latent.npy")
    assert {"license", "rights_holder", "source_url", "source_shard", "source_key", "bucket", "encoder"} <= set(
        sample_meta)
    assert (tiny_dataset / sample_meta["source_shard"]).exists()


def test_training_from_the_cache_trains_the_samples_and_audit_of_training_from_the_videos(cache, tiny_dataset,
                                                                                          tmp_path):
    """Same samples and audit as from the videos, with the cached run training every conditioning mode too (issue
    30): the given frames are then the cached latents."""
    videos, latents = tmp_path / "videos", tmp_path / "latents"
    train(videos, tiny_dataset)
    # From the cache with every conditioning mode too: the given frames are the cached latents' own.
    from tests.integration.test_sequence_parallel import EVERY_MODE

    train(latents, tiny_dataset, f"data.latents={cache}", *EVERY_MODE)
    assert trained_keys(latents) == trained_keys(videos) and len(trained_keys(videos)) == 16
    a, b = (json.loads((d / "checkpoints" / "step_10" / "audit.json").read_text()) for d in (videos, latents))
    assert set(a["license_totals"]) == set(b["license_totals"]) == {"CC0-1.0"}
    assert set(a["consumed"]) == set(b["consumed"])  # the source shards, by name
    assert {h for c in a["rights_holders"].values() for h in c} == {h for c in b["rights_holders"].values() for h in c}
    assert a["dropped"] == b["dropped"]  # the same reasons and counts: the cache's stubs report the encode's drops
    assert sorted(b["dropped_examples"]["license_missing"]) == sorted(a["dropped_examples"]["license_missing"])


def steps_and_keys(run_dir: Path):
    from train.provenance import read_trained_keys

    return sorted((record["step"], sorted(record["keys"])) for record in read_trained_keys(run_dir))


def test_each_stage_reads_its_own_source_and_the_epoch_goes_on_across_them(tiny_dataset, tmp_path):
    """Stage 0 from the videos, stage 1 (other buckets) from a cache encoded for it, then back to the videos on
    resume: every step trains the samples the all-video run trains at that step, so the data plan continues over
    each change of source."""
    stage1 = ["curriculum.stages.1.frame_counts=[4]", "curriculum.stages.1.token_budget=600",
              "curriculum.stages.0.steps=6", "curriculum.stages.1.steps=6"]
    out = tmp_path / "stage1"
    encode(tiny_dataset, out, *stage1, "--stage", "anneal")
    videos, mixed = tmp_path / "videos", tmp_path / "mixed"
    train(videos, tiny_dataset, *stage1)
    result = train(mixed, tiny_dataset, *stage1, f"curriculum.stages.1.latents={out}", "train.stop_after_steps=9")
    resumed = train(mixed, tiny_dataset, *stage1)  # stage 1's last 3 steps from the videos again
    assert "resuming from" in resumed.stdout + resumed.stderr
    assert steps_and_keys(mixed) == steps_and_keys(videos) and len(steps_and_keys(videos)) == 12
    from tests.exactly_once import assert_exactly_once

    assert_exactly_once(mixed)
    a, b = (json.loads((d / "checkpoints" / "step_12" / "audit.json").read_text()) for d in (videos, mixed))
    assert a["dropped"] == b["dropped"] and a["license_totals"] == b["license_totals"]
    log = result.stdout + result.stderr
    assert f"videos from {tiny_dataset}" in log and f"latents from the cache {out}" in log

    from conf.schema import ConfigError, load_config
    from train.preflight import check_data

    # No held-out split: check_data reads every dataset the run names, and a fresh clone has no datasets/demo.
    common = ["experiment=demo", f"data.root={tiny_dataset}", "tracking.eval_clips=0", *MODEL, *stage1]
    with pytest.raises(ConfigError, match=r"curriculum.stages\[0\].latents=.*\n.*curriculum.stages\[0\] buckets"):
        check_data(load_config([*common, f"curriculum.stages.0.latents={out}"]))
    # A takedown applied to the cache alone: the stages' sources no longer hold the same samples.
    import shutil

    taken = tmp_path / "taken"
    shutil.copytree(out, taken)
    from data.tar_samples import TarSample, read_tar

    first = json.loads((taken / "manifest.json").read_text())["shards"][0]["path"]
    key = next(s.key for s in read_tar(taken / first) if isinstance(s, TarSample))
    (tmp_path / "keys.txt").write_text(key + "\n")
    subprocess.run([sys.executable, "-m", "data", "takedown", str(taken), "--keys", str(tmp_path / "keys.txt")],
                   cwd=REPO, env=ENV, check=True, capture_output=True, timeout=120)
    with pytest.raises(ConfigError, match=rf"do not hold the same samples: {first}: 4 vs 3 samples"):
        check_data(load_config([*common, f"curriculum.stages.1.latents={taken}"]))
    # Taken down from the videos alone: the cache was encoded from other videos than those.
    source, fresh = tmp_path / "source", tmp_path / "fresh"
    shutil.copytree(tiny_dataset, source)
    shutil.copytree(out, fresh)
    takedown = [sys.executable, "-m", "data", "takedown", "--keys", str(tmp_path / "keys.txt")]
    subprocess.run([*takedown, str(source)], cwd=REPO, env=ENV, check=True, capture_output=True, timeout=120)
    with pytest.raises(ConfigError, match=r"(?s)stages\[1\].latents=.*encoded from other videos than data.root"):
        check_data(load_config([*common, f"data.root={source}", f"curriculum.stages.1.latents={fresh}"]))
    # Taken down from both together (one command), they hold the same samples again.
    shutil.copytree(tiny_dataset, source, dirs_exist_ok=True)
    (source / "takedowns").exists() and shutil.rmtree(source / "takedowns")
    subprocess.run([*takedown, str(source), str(fresh)], cwd=REPO, env=ENV, check=True, capture_output=True,
                   timeout=120)
    check_data(load_config([*common, f"data.root={source}", f"curriculum.stages.1.latents={fresh}"]))
    before, after = (json.loads((d / "manifest.json").read_text()) for d in (out, fresh))
    assert sum(r["encoded"] for r in after["shards"]) == sum(r["encoded"] for r in before["shards"]) - 1


def test_a_cache_of_other_encoder_weights_or_buckets_is_refused_by_name(tmp_path, tiny_dataset):
    import torch
    from safetensors.torch import save_file

    from conf.schema import ConfigError, load_config
    from train.preflight import check_data
    from models.vae import CausalVideoVAE

    weights = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        vae = CausalVideoVAE(4, 8, (1, 2), (False, True))
        weights.append(tmp_path / f"vae{seed}.safetensors")
        save_file(vae.state_dict(), str(weights[-1]))
    vae = ["model.autoencoder.name=causal_vae", "model.autoencoder.latent_channels=4",
           "model.autoencoder.temporal_factor=2", "model.autoencoder.spatial_factor=4",
           "model.autoencoder.base_channels=8", "model.autoencoder.channel_mult=[1,2]",
           "model.autoencoder.temporal_downsample=[false,true]", "model.patch_size=[1,2,2]",
           "curriculum.stages.0.frame_counts=[9]", "curriculum.stages.1.frame_counts=[9]",
           "curriculum.stages.0.resolutions=[32]", "curriculum.stages.1.resolutions=[32]",
           "curriculum.stages.0.token_budget=600", "curriculum.stages.1.token_budget=600"]
    out = tmp_path / "cache"
    encode(tiny_dataset, out, *vae, f"model.autoencoder.path={weights[0]}")
    common = ["experiment=demo", f"data.root={tiny_dataset}", "tracking.eval_clips=0", *MODEL, *vae,
              f"data.latents={out}"]
    check_data(load_config([*common, f"model.autoencoder.path={weights[0]}"]))
    with pytest.raises(ConfigError, match="encoder.autoencoder.weights_sha256: the cache has"):
        check_data(load_config([*common, f"model.autoencoder.path={weights[1]}"]))
    with pytest.raises(ConfigError, match=r"curriculum.stages\[1\] buckets"):
        check_data(load_config([*common, f"model.autoencoder.path={weights[0]}",
                                "curriculum.stages.1.frame_counts=[5]"]))


def test_a_killed_encode_resumes_without_reencoding_and_equals_an_uninterrupted_one(tiny_dataset, tmp_path, cache):
    out = tmp_path / "killed"
    process = encode(tiny_dataset, out, wait=False)
    deadline = time.monotonic() + 300
    while not list(out.glob("*.done.json")):
        assert process.poll() is None and time.monotonic() < deadline, process.stdout.read()[-3000:]
        time.sleep(0.1)
    os.killpg(process.pid, signal.SIGKILL)  # the job and its Ray cluster, mid-encode
    process.wait(timeout=60)
    finished = {p.name for p in out.glob("*.done.json")}
    assert finished and not (out / "manifest.json").exists()
    result = encode(tiny_dataset, out)
    assert result.stderr.count("resumed: already encoded") >= len(finished)
    ours, reference = (json.loads((d / "manifest.json").read_text()) for d in (out, cache))
    assert [(s["path"], s["sha256"]) for s in ours["shards"]] == [(s["path"], s["sha256"]) for s in reference["shards"]]
    assert ours["cache"]["dropped_keys"] == reference["cache"]["dropped_keys"]
    assert not list(out.glob(".*.partial"))


def test_takedown_rewrites_a_cache_too_and_training_from_it_never_sees_the_samples(cache, tiny_dataset, tmp_path):
    import shutil

    copy = tmp_path / "latents"
    shutil.copytree(cache, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    from data.tar_samples import TarSample, read_tar

    first_shard = [s for s in read_tar(copy / manifest["shards"][0]["path"]) if isinstance(s, TarSample)]
    removed = {first_shard[0].key}
    (tmp_path / "keys.txt").write_text("\n".join(removed) + "\n")
    result = subprocess.run([sys.executable, "-m", "data", "takedown", str(copy), "--keys", str(tmp_path / "keys.txt")], cwd=REPO, env=ENV,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "removed 1 samples" in result.stdout, result.stdout + result.stderr
    run_dir = tmp_path / "run"
    train(run_dir, tiny_dataset, f"data.latents={copy}")
    assert removed.isdisjoint(trained_keys(run_dir)) and len(trained_keys(run_dir)) == 15


def test_a_cache_with_a_pretrained_text_encoder_trains_on_its_cached_embeddings(tiny_dataset, tiny_t5, tmp_path):
    text = ["model.text.name=pretrained", f"model.text.path={tiny_t5}", "model.text.max_tokens=16"]
    out = tmp_path / "cache"
    encode(tiny_dataset, out, *text)
    from data.latent_cache import load_npy

    assert load_npy((out / "empty_caption.npy").read_bytes()).shape[1] == 24
    cached, live = tmp_path / "cached", tmp_path / "live"
    common = (*text, "data.caption_dropout=0.5", "tracking.log_every=1")
    result = train(cached, tiny_dataset, *common, f"data.latents={out}")
    assert f"latents from the cache {out}" in result.stdout + result.stderr
    train(live, tiny_dataset, *common)  # the same run from the videos, the T5 encoding every caption as it trains
    # The cache holds what the encoders make: the same batches give the same losses, with the cached empty-caption
    # embedding wherever dropout took the caption (a cache that fed other embeddings would drift off at once).
    assert steps_and_keys(cached) == steps_and_keys(live)
    losses = [[json.loads(line)["loss"] for line in (d / "metrics.jsonl").read_text().splitlines()]
              for d in (cached, live)]
    assert len(losses[0]) == 10 and losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_a_source_shard_cut_short_keeps_its_count_in_the_cache_with_a_stub_per_lost_sample(tiny_dataset, tmp_path):
    """The samples a truncated source shard can no longer give keep their places as stubs (one each, reason
    corrupt_shard), so the cache still holds the source's count; training reports them as it would from the
    videos."""
    import shutil

    import webdataset as wds

    from conf.schema import load_config, to_yaml
    from data.latent_cache import ShardEncoder
    from data.loader import CORRUPT_SHARD, prepare_sample

    source = tmp_path / "source"
    shutil.copytree(tiny_dataset, source)
    row = json.loads((source / "manifest.json").read_text())["shards"][0]
    data = (source / row["path"]).read_bytes()
    (source / row["path"]).write_bytes(data[:len(data) // 3])  # the manifest still says num_samples
    cfg = load_config(["experiment=demo", f"data.root={source}", *MODEL], check=False)
    out = tmp_path / "cache"
    out.mkdir()
    summary = ShardEncoder(to_yaml(cfg), 1, str(source), str(out)).encode_shard(row["path"], 0, row["num_samples"])
    samples = list(wds.tarfile_samples([{"url": str(out / row["path"])}]))
    assert summary["num_samples"] == len(samples) == row["num_samples"] == 4
    lost = summary["dropped"][CORRUPT_SHARD]
    assert len(lost) >= 1 and len(set(s["__key__"] for s in samples)) == 4
    spec = ShardEncoder(to_yaml(cfg), 1, str(source), str(out)).spec
    reasons = [prepare_sample(s, (0, 0, n), spec)[1] for n, s in enumerate(samples)]
    assert reasons.count(CORRUPT_SHARD) == len(lost) and reasons[-1] == CORRUPT_SHARD
