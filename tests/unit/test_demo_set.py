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


def test_crossings_drift_from_anywhere_along_the_path_and_outward_clips_start_near_the_centre(tmp_path):
    """Outward clips ("moving") start up to START_SPREAD back from the centre; crossings ("drifting", CROSSINGS of
    them) start anywhere along the path and a little past its ends, at CROSSING_REACH of the speed, so a clip's first
    frame says where its object is and a motion can go on for 4 clip lengths (issue 30; BENCHMARKS.md,
    "Conditioning modes in the demo"). crossings=0 and start_spread=0 render the clips of generator version 2."""
    from data.demo_set import CROSSING_REACH, CROSSING_SPAN, START_SPREAD, procedural_samples, render_clip
    from data.video_io import read_video
    from train.adherence import object_centroids, parse_prompt

    def described(samples):  # mp4 bytes are not byte-stable from one encode to the next: what they show is
        return [(key, caption, meta) for key, _, caption, meta in samples]

    centred = described(procedural_samples(12, 0, crossings=0.0, start_spread=0.0))
    assert all(m["generator"]["start"] == 0.0 and m["generator"]["reach"] == 1.0 and " moving " in c
               for _, c, m in centred)
    centre = object_centroids(render_clip("circle", "red", "black", "right", 48, 48, 8)[:1])[0]
    back = object_centroids(render_clip("circle", "red", "black", "right", 48, 48, 8, start=-1.0)[:1])[0]
    assert abs(centre[0] - 23.5) < 1 and back[0] < centre[0] - 8 and abs(back[1] - centre[1]) < 1

    offsets, travels, crossing = [], [], 0
    for key, video, caption, meta in procedural_samples(40, 3):
        g = meta["generator"]
        assert parse_prompt(caption)["motion"] == g["motion"]
        if g["reach"] != CROSSING_REACH:
            assert " moving " in caption and -START_SPREAD <= g["start"] <= 0.0
            continue
        crossing += 1
        assert f" drifting {g['motion']}ward " in caption and -CROSSING_SPAN <= g["start"] <= CROSSING_SPAN - CROSSING_REACH
        path = tmp_path / f"{key}.mp4"
        path.write_bytes(video)
        frames = read_video(path)[0]
        points = object_centroids(frames[[0, -1]])
        outward = render_clip(g["shape"], g["colour"], g["background"], g["motion"], meta["width"],
                              meta["height"], 2)  # the outward clip of the same caption, from the centre
        offsets.append(float(abs(points[0] - object_centroids(outward[:1])[0]).sum()))
        travels.append((float(abs(points[1] - points[0]).sum()),
                        float(abs(object_centroids(outward[[-1]])[0] - object_centroids(outward[:1])[0]).sum())))
    assert 4 <= crossing <= 18  # about CROSSINGS = 0.25 of 40
    assert sum(o > 1.5 for o in offsets) >= crossing // 2
    assert all(slow < 0.75 * fast for slow, fast in travels)
