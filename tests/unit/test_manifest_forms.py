"""Manifests at scale (data/schema.py): above SPLIT_ABOVE shards a manifest is a small header and a Parquet table of
the shards, so that a 1M-shard dataset's ranks read two columns instead of parsing 170 MB of JSON. Both forms hold
the same rows and the same fingerprint (a checkpoint taken on one resumes on the other), every tool reads both, and
a data plane trains from a split one."""
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter

import pytest

from data.loader import dataset_fingerprint, dataset_rows
from data.storage import UMASK
from data.schema import MANIFEST_NAME, SPLIT_VERSION, read_manifest, read_manifest_header, write_manifest
from tests.conftest import GOOD_SAMPLES, REPO


def data_cli(*args):
    return subprocess.run([sys.executable, "-m", "data", *args], cwd=REPO, capture_output=True, text=True, timeout=300)


def same(report: str, root) -> str:
    """A verb's report without what differs between two runs of it: the root, and the decoder's log timestamps."""
    return re.sub(r"\[\d\d:\d\d:\d\d\]", "[time]", report.replace(str(root), "ROOT"))


def split_copy(dataset, tmp_path):
    copy = tmp_path / "split"
    shutil.copytree(dataset, copy)
    write_manifest(copy, read_manifest(copy), split_above=0)
    return copy


def test_a_split_manifest_holds_the_same_rows_and_fingerprint_as_the_inline_one(tiny_dataset, tmp_path):
    split = split_copy(tiny_dataset, tmp_path)
    header = json.loads((split / MANIFEST_NAME).read_text())
    assert header["version"] == SPLIT_VERSION and "shards" not in header
    assert (split / header["shard_table"]).exists()
    assert header["num_shards"] == len(read_manifest(tiny_dataset)["shards"])
    inline = read_manifest(tiny_dataset)
    assert read_manifest(split)["shards"] == inline["shards"]  # every field, licenses included
    assert dataset_rows(split) == dataset_rows(tiny_dataset)
    # the fingerprint checkpoints have always stored: sha256 of the sorted (name, count, sha256) rows as JSON
    rows = sorted((r["path"], int(r["num_samples"]), r.get("sha256")) for r in inline["shards"])
    assert dataset_fingerprint(split) == dataset_fingerprint(tiny_dataset) == hashlib.sha256(
        json.dumps(rows).encode()).hexdigest()
    for verb in ("verify", "inspect"):  # the same findings (the tiny set holds bad samples on purpose)
        on_split, on_inline = data_cli(verb, str(split)), data_cli(verb, str(tiny_dataset))
        assert on_split.returncode == on_inline.returncode, on_split.stderr
        lines, expected = same(on_split.stdout, split).splitlines(), same(on_inline.stdout, tiny_dataset).splitlines()
        assert lines[-1] == expected[-1] and sorted(lines) == sorted(expected)


def test_rewriting_a_split_manifest_replaces_its_table_and_the_verb_converts_both_ways(tiny_dataset, tmp_path):
    split = split_copy(tiny_dataset, tmp_path)
    first = read_manifest_header(split)["shard_table"]
    manifest = read_manifest(split)
    manifest["shards"] = manifest["shards"][1:]  # as a takedown that empties a shard does
    write_manifest(split, manifest, split_above=0)
    second = read_manifest_header(split)["shard_table"]
    assert second != first and not (split / first).exists() and len(dataset_rows(split)) == len(manifest["shards"])
    said = data_cli("manifest", str(split))
    assert said.returncode == 0 and "version 2, split" in said.stdout
    back = data_cli("manifest", str(split), "--inline")
    assert back.returncode == 0 and "version 2 -> 1" in back.stdout
    assert not list(split.glob("shards-*.parquet")) and read_manifest_header(split)["version"] == 1
    assert dataset_rows(split) == [(p, n) for p, n in dataset_rows(tiny_dataset)][1:]


def test_a_dataset_is_written_world_readable_like_any_file_a_user_writes(tiny_dataset, tmp_path):
    """Shards and manifests are staged through a temp file: not with its private 0600 mode, which would hide a
    shared dataset from other users and pods."""
    split = split_copy(tiny_dataset, tmp_path)
    table = split / read_manifest_header(split)["shard_table"]
    for path in [split / MANIFEST_NAME, table, *tiny_dataset.glob("*.tar")]:
        assert os.stat(path).st_mode & 0o777 == 0o666 & ~UMASK, path


def test_every_field_of_a_row_and_of_the_manifest_survives_the_split_and_back(tmp_path):
    """A latent cache's rows carry `encoded`, a manifest its own top-level fields (one named like a split header's
    `num_samples` among them): none may be lost in either form, nor in a rewrite (a takedown)."""
    rows = [{"path": f"s-{i}.tar", "num_samples": 2, "bytes": 10, "sha256": None, "licenses": {"CC0-1.0": 2},
             "encoded": 2 - i % 2} for i in range(3)] + [{"path": "bare.tar", "num_samples": 1}]
    manifest = {"version": 1, "name": "cache", "cache": {"stage": "main"}, "num_samples": "user's own", "shards": rows}
    write_manifest(tmp_path, manifest, split_above=0)
    split = read_manifest(tmp_path)
    assert split["shards"] == rows and split["cache"] == {"stage": "main"}
    assert split["num_samples"] == 7  # the header's own count, while split
    write_manifest(tmp_path, split, split_above=0)  # a rewrite of the split form
    assert read_manifest(tmp_path)["shards"] == rows
    write_manifest(tmp_path, manifest, split_above=10)  # inline again: the user's field is kept as it was
    assert read_manifest(tmp_path) == manifest and not list(tmp_path.glob("shards-*.parquet"))


def test_a_reader_whose_table_a_rewrite_removed_reads_the_new_manifest(tiny_dataset, tmp_path, monkeypatch):
    import data.schema as schema

    split = split_copy(tiny_dataset, tmp_path)
    real = schema.read_manifest_header
    calls = []

    def header_then_rewrite(root):
        header = real(root)
        if not calls:  # between this reader's header and its table, a takedown rewrites the manifest
            calls.append(1)
            manifest = read_manifest(split)
            manifest["shards"] = manifest["shards"][1:]
            write_manifest(split, manifest, split_above=0)
        return header

    monkeypatch.setattr(schema, "read_manifest_header", header_then_rewrite)
    assert len(schema.shard_plan(split)[0]) == len(read_manifest(tiny_dataset)["shards"]) - 1


def test_a_manifest_of_an_unknown_version_is_refused_with_both_known_forms(tmp_path):
    (tmp_path / MANIFEST_NAME).write_text(json.dumps({"version": 7, "shards": []}))
    with pytest.raises(ValueError, match="neither 1 .* nor 2"):
        read_manifest(tmp_path)


def test_a_data_plane_trains_an_epoch_exactly_once_from_a_split_manifest(tiny_dataset, tmp_path):
    from tests.unit.test_data_plane import plane_for, train

    plane = plane_for(split_copy(tiny_dataset, tmp_path), tmp_path / "run")
    trained, step = Counter(), 0
    while plane.coordinator.state()["completed_epochs"] < 1 and step < 100:
        trained.update(train(plane, step, step + 1))
        step += 1
    first = {tag: n for tag, n in trained.items() if tag[0] == 0}
    assert len(first) == GOOD_SAMPLES and set(first.values()) == {1}
    plane.close()


def test_ingest_appends_to_and_replaces_a_split_dataset(tiny_dataset, tmp_path):
    from tests.integration.first_hour import write_table

    split = split_copy(tiny_dataset, tmp_path)
    table = read_manifest_header(split)["shard_table"]
    before = len(dataset_rows(split))
    write_table(tmp_path / "videos", tmp_path / "meta.csv", count=4)
    for video in (tmp_path / "videos").iterdir():  # new keys: the tiny set holds procedural-0000... already
        video.rename(video.with_name("extra-" + video.name))
    meta = tmp_path / "meta.csv"
    meta.write_text(meta.read_text().replace("\nprocedural-", "\nextra-procedural-"))
    ingest = ("ingest", "--videos", str(tmp_path / "videos"), "--metadata", str(tmp_path / "meta.csv"),
              "--out", str(split), "--samples-per-shard", "2")
    appended = data_cli(*ingest, "--append")
    assert appended.returncode == 0, appended.stderr
    assert len(dataset_rows(split)) == before + 2 and read_manifest(split)["appended"]
    replaced = data_cli(*ingest, "--force")
    assert replaced.returncode == 0, replaced.stderr
    assert len(dataset_rows(split)) == 2 and not (split / table).exists()
    assert sorted(p.name for p in split.glob("*.tar")) == sorted(p for p, _ in dataset_rows(split))


def test_the_shard_table_is_read_from_arrows_own_memory_never_a_python_stream(tiny_dataset, tmp_path, monkeypatch):
    """A Parquet read of a Python file object let an Arrow pool thread release that object while the interpreter
    finalized: `python -m data inspect` on a split manifest aborted at exit (exit -6, 3-6 runs in 100 under load).
    Arrow must be handed a buffer of its own, which holds no Python object."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    split = split_copy(tiny_dataset, tmp_path)
    sources = []
    real = pq.read_table

    def recording(source, *args, **kwargs):
        sources.append(source)
        return real(source, *args, **kwargs)

    monkeypatch.setattr(pq, "read_table", recording)
    assert dataset_rows(split) == dataset_rows(tiny_dataset)
    assert sources and all(isinstance(s, pa.BufferReader) for s in sources), sources
