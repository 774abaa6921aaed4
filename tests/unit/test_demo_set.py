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
