"""`python -m data.demo_set`: an existing demo dataset is kept only when this Kino's generator, with the same
options, built it (a stale one once made `make demo` train on clips an older version wrote, whose motion the
model never learned); a dataset it did not build is never overwritten."""
import json

import pytest

from data.demo_set import GENERATOR_VERSION, main

OPTIONS = ["--procedural", "4", "--no-real", "--validation", "2", "--samples-per-shard", "2"]


def build(out, capsys, *extra):
    main([str(out), *OPTIONS, *extra])
    return capsys.readouterr().out


def test_a_dataset_of_another_generator_version_or_options_is_rebuilt_and_a_current_one_kept(tmp_path, capsys):
    out = tmp_path / "demo"
    assert "wrote" in build(out, capsys)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["recipe"]["generator"] == GENERATOR_VERSION
    assert "already built" in build(out, capsys)

    manifest["builder"] = "data.samples"  # what the first generator wrote: no recipe
    del manifest["recipe"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    (out / "shard-00099.tar").write_bytes(b"left over")
    log = build(out, capsys)
    assert "rebuilding" in log and "version 1" in log and not (out / "shard-00099.tar").exists()
    assert json.loads((out / "manifest.json").read_text())["recipe"]["generator"] == GENERATOR_VERSION
    assert (out / "validation" / "manifest.json").exists()

    log = build(out, capsys, "--seed", "3")
    assert "rebuilding" in log and "seed 0 -> 3" in log
    log = build(out, capsys, "--seed", "3", "--validation", "0")
    assert "rebuilding" in log and "validation 2 -> 0" in log and not (out / "validation").exists()


def test_a_dataset_it_did_not_build_is_never_overwritten(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"name": "mine", "builder": "data.ingest", "shards": []}))
    assert "already built" in build(out, capsys)  # kept as it is: not ours to judge
    with pytest.raises(SystemExit, match="did not build"):
        build(out, capsys, "--force")
    assert json.loads((out / "manifest.json").read_text())["builder"] == "data.ingest"


def test_procedural_clips_start_at_the_centre_unless_a_start_spread_is_asked_for(tmp_path):
    """start_spread=0 (the default) renders the clips of before the option, each starting at the centre; > 0
    starts each clip back along its motion by up to that much, so its first frame tells where the object is
    (issue 30's conditioning frames; BENCHMARKS.md, "Conditioning modes in the demo")."""
    from data.demo_set import procedural_samples, render_clip
    from data.video_io import read_video
    from train.adherence import object_centroids

    def described(samples):  # mp4 bytes are not byte-stable from one encode to the next: what they show is
        return [(key, caption, meta) for key, _, caption, meta in samples]

    assert described(procedural_samples(12, 0)) == described(procedural_samples(12, 0, start_spread=0.0))
    centre = object_centroids(render_clip("circle", "red", "black", "right", 48, 48, 8)[:1])[0]
    back = object_centroids(render_clip("circle", "red", "black", "right", 48, 48, 8, start=-0.5)[:1])[0]
    assert abs(centre[0] - 23.5) < 1 and back[0] < centre[0] - 4 and abs(back[1] - centre[1]) < 1

    def first_frame_offsets(spread):
        offsets = []
        for key, video, _, meta in procedural_samples(12, 3, start_spread=spread):
            path = tmp_path / f"{key}.mp4"
            path.write_bytes(video)
            point = object_centroids(read_video(path)[0][:1])[0]
            g = meta["generator"]  # the same clip started at the centre
            centred = render_clip(g["shape"], g["colour"], g["background"], g["motion"], meta["width"],
                                  meta["height"], 2)
            offsets.append(float(abs(point - object_centroids(centred[:1])[0]).sum()))
        return offsets

    assert max(first_frame_offsets(0.0)) < 1.5
    assert sum(o > 1.5 for o in first_frame_offsets(0.5)) >= 8
