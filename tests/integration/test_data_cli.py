"""python -m data ingest / verify / inspect / audit on real files."""
import csv
import json
import subprocess
import sys

from data.demo_set import render_clip
from data.video_io import encode_mp4
from tests.conftest import REPO

CONTRACT = {"license": "CC0-1.0", "source_url": "https://example.org/v", "attribution": "A. Maker",
            "rights_holder": "A. Maker"}


def run(*args):
    return subprocess.run([sys.executable, "-m", "data", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


def test_ingest_from_a_table_cuts_spans_and_rejects_incomplete_rows_with_a_report(tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    for name in ("a", "b", "c"):
        (videos / f"{name}.mp4").write_bytes(encode_mp4(render_clip("circle", "red", "black", "left", 64, 48, 36), 12))
    with open(tmp_path / "meta.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["video", "caption", *CONTRACT, "clip_span", "aesthetic"])
        writer.writeheader()
        writer.writerow({"video": "a.mp4", "caption": "a red circle", **CONTRACT, "clip_span": "0.5,2.0",
                         "aesthetic": "5.5"})
        writer.writerow({"video": "b.mp4", "caption": "a red circle", **dict(CONTRACT, license="")})
        writer.writerow({"video": "c.mp4", "caption": "a red circle", **dict(CONTRACT, rights_holder="")})
        writer.writerow({"video": "missing.mp4", "caption": "x", **CONTRACT})
    out = tmp_path / "shards"
    result = run("ingest", "--videos", str(videos), "--metadata", str(tmp_path / "meta.csv"), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "REJECTED 3 rows" in result.stdout
    report = json.loads((out / "ingest_report.json").read_text())
    reasons = {r["key"]: r["reasons"] for r in report["rejections"]}
    assert reasons["b"] == ["missing license"] and reasons["c"] == ["missing rights_holder"]
    assert "video file missing" in reasons["missing"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert [row["num_samples"] for row in manifest["shards"]] == [1]
    import webdataset as wds

    sample = next(iter(wds.tarfile_samples([{"url": str(out / manifest["shards"][0]["path"])}])))
    meta = json.loads(sample["json"])
    assert meta["source_clip_span"] == [0.5, 2.0] and "clip_span" not in meta  # the cut, recorded as done
    assert meta["num_frames"] == 18 and meta["fps"] == 12
    assert meta["aesthetic"] == 5.5 and meta["width"] == 64  # extra fields kept, probed fields filled
    assert run("ingest", "--videos", str(videos), "--metadata", str(tmp_path / "meta.csv"), "--out",
               str(tmp_path / "strict"), "--strict").returncode == 1


def test_ingest_reads_video2dataset_output_with_a_field_mapping(tmp_path):
    source = tmp_path / "v2d" / "00000"
    source.mkdir(parents=True)
    for i in range(3):
        (source / f"{i:05d}.mp4").write_bytes(encode_mp4(render_clip("square", "blue", "grey", "up", 32, 32, 12), 12))
        (source / f"{i:05d}.txt").write_text("a blue square")
        (source / f"{i:05d}.json").write_text(json.dumps(
            {"url": f"https://example.org/{i}", "meta": {"license_id": "CC-BY-4.0", "owner": "B. Owner"}}))
    out = tmp_path / "out"
    result = run("ingest", "--video2dataset", str(tmp_path / "v2d"), "--out", str(out),
                 "--map", "license=meta.license_id", "--map", "rights_holder=meta.owner",
                 "--map", "attribution=meta.owner", "--map", "source_url=url")
    assert result.returncode == 0 and "ingested 3 samples" in result.stdout, result.stdout + result.stderr
    verify = run("verify", str(out))
    assert verify.returncode == 0 and "OK" in verify.stdout and "CC-BY-4.0" in verify.stdout


def test_verify_reports_corruption_and_invalid_samples(tiny_dataset, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_dataset, copy)
    shard = sorted(copy.glob("shard-*.tar"))[0]
    shard.write_bytes(shard.read_bytes()[:-5000])
    result = run("verify", str(copy))
    assert result.returncode == 1
    assert f"MANIFEST {shard.name}" in result.stdout
    assert "CORRUPT" in result.stdout and "corrupt-00" in result.stdout  # the garbage video
    assert "INVALID" in result.stdout and "nolicense-00" in result.stdout
    inspect = run("inspect", str(tiny_dataset))
    assert inspect.returncode == 0 and "96x96" in inspect.stdout and "CC0-1.0" in inspect.stdout


def test_audit_answers_a_takedown_query_over_every_checkpoint(tmp_path):
    for step, holders in ((100, {"s0.tar": {"A. Maker": 3}}), (200, {"s0.tar": {"A. Maker": 3}, "s1.tar": {"B": 2}})):
        path = tmp_path / "checkpoints" / f"step_{step}"
        path.mkdir(parents=True)
        (path / "COMPLETE").write_text(str(step))
        (path / "audit.json").write_text(json.dumps({
            "step": step, "policy": ["CC0-1.0"], "license_totals": {"CC0-1.0": 5}, "rights_holders": holders,
            "sources": {"s1.tar": {"https://example.org/b": 2}} if step == 200 else {}, "dropped": {}}))
    result = run("audit", str(tmp_path), "--source", "https://example.org/b")
    assert "checkpoints/step_200 (step 200): 2 samples from s1.tar (2)" in result.stdout
    assert "step_100" not in result.stdout
    result = run("audit", str(tmp_path), "--rights-holder", "A. Maker")
    assert "step_100" in result.stdout and "step_200" in result.stdout
    assert "samples trained per license" in run("audit", str(tmp_path)).stdout


def test_takedown_removes_a_rights_holder_everywhere_and_a_fresh_run_never_sees_them(tmp_path):
    """Ingest clips of two rights holders, train, take one holder down (the report lists every removed sample, each
    rewritten file's hashes before and after, and the checkpoints that used them), then: a fresh run's audit has
    none of that holder; resuming the old run is refused, and with data.allow_changed_dataset=true it re-plans."""
    from data.demo_set import procedural_samples
    from tests.integration.test_training import torchrun

    source = tmp_path / "v2d"
    source.mkdir()
    for n, (key, video, caption, meta) in enumerate(procedural_samples(16, seed=0)):
        meta = dict(meta, rights_holder="Studio B" if n % 2 else meta["rights_holder"])
        (source / f"{key}.mp4").write_bytes(video)
        (source / f"{key}.txt").write_text(caption)
        (source / f"{key}.json").write_text(json.dumps(meta))
    dataset = tmp_path / "dataset"
    assert run("ingest", "--video2dataset", str(source), "--out", str(dataset), "--samples-per-shard", "4"
               ).returncode == 0
    common = ("tracking.mode=disabled", "curriculum.stages.0.steps=3", "curriculum.stages.1.steps=1",
              "train.checkpoint_every=2")
    trained = tmp_path / "trained"
    torchrun(trained, dataset, *common, "train.stop_after_steps=2", nproc=1)
    before = json.loads((trained / "checkpoints" / "step_2" / "audit.json").read_text())
    assert any("Studio B" in counts for counts in before["rights_holders"].values())

    result = run("takedown", str(dataset), "--rights-holder", "Studio B", "--run", str(trained))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "removed 8 samples" in result.stdout and "checkpoints/step_2 (step 2)" in result.stdout
    (report_path,) = (dataset / "takedowns").glob("takedown-*.json")
    report = json.loads(report_path.read_text())
    assert sorted(item["key"] for item in report["removed"]) == sorted(
        key for n, (key, *_) in enumerate(procedural_samples(16, seed=0)) if n % 2)
    assert all(item["rights_holder"] == "Studio B" for item in report["removed"])
    from data.shards import sha256_file

    manifest = json.loads((dataset / "manifest.json").read_text())
    for item in report["files"]:  # each rewritten shard: its hashes before and after, the manifest agreeing
        assert item["sha256_before"] != item["sha256_after"] == sha256_file(dataset / item["path"])
        assert next(r for r in manifest["shards"] if r["path"] == item["path"])["sha256"] == item["sha256_after"]
    assert sum(r["num_samples"] for r in manifest["shards"]) == 8
    assert manifest["takedowns"][0]["rights_holder"] == "Studio B"
    assert run("verify", str(dataset)).returncode == 0
    assert "trained on samples of 'Studio B'" in run("audit", str(trained), "--rights-holder", "Studio B").stdout

    fresh = tmp_path / "fresh"
    torchrun(fresh, dataset, *common, nproc=1)
    after = json.loads((fresh / "checkpoints" / "step_4" / "audit.json").read_text())
    assert sum(after["license_totals"].values()) > 0
    assert not any("Studio B" in counts for counts in after["rights_holders"].values())

    import os
    import subprocess
    import sys

    from tests.conftest import REPO
    from tests.forked_ranks import run_ranks
    from tests.integration.test_training import TINY

    refused = run_ranks([sys.executable, "-m", "train", "experiment=demo", f"data.root={dataset}",
                         f"train.run_dir={trained}", *TINY, *common], cwd=REPO, timeout=600,
                        env=dict(os.environ, WANDB_MODE="offline"))
    assert refused.returncode == 2 and "changed since" in refused.stderr and "allow_changed_dataset" in refused.stderr
    resumed = torchrun(trained, dataset, *common, "data.allow_changed_dataset=true", nproc=1)
    assert "starts a new epoch over the current shards" in resumed.stdout + resumed.stderr
    final = json.loads((trained / "checkpoints" / "step_4" / "audit.json").read_text())
    assert final["step"] == 4


def test_takedown_by_keys_dry_run_changes_nothing_and_an_emptied_shard_is_deleted(tmp_path):
    from data.demo_set import procedural_samples
    from data.shards import ShardSetWriter, sha256_file

    dataset = tmp_path / "dataset"
    writer = ShardSetWriter(dataset, samples_per_shard=4)
    samples = list(procedural_samples(8, seed=1))
    for key, video, caption, meta in samples:
        writer.write(key, video, caption, meta)
    writer.close()
    keys = [samples[0][0], samples[1][0]] + [s[0] for s in samples[4:]]  # two of shard 0, all of shard 1
    (tmp_path / "keys.txt").write_text("\n".join(keys) + "\n")
    hashes = {p.name: sha256_file(p) for p in dataset.glob("*.tar")}
    dry = run("takedown", str(dataset), "--keys", str(tmp_path / "keys.txt"), "--dry-run")
    assert dry.returncode == 0 and "would remove 6 samples" in dry.stdout
    assert {p.name: sha256_file(p) for p in dataset.glob("*.tar")} == hashes and not (dataset / "takedowns").exists()
    done = run("takedown", str(dataset), "--keys", str(tmp_path / "keys.txt"))
    assert done.returncode == 0 and "shard-00001.tar: 4 -> 0 samples" in done.stdout and "deleted" in done.stdout
    manifest = json.loads((dataset / "manifest.json").read_text())
    assert [(r["path"], r["num_samples"]) for r in manifest["shards"]] == [("shard-00000.tar", 2)]
    assert not (dataset / "shard-00001.tar").exists()
    assert run("verify", str(dataset)).returncode == 0
