"""Bad input never crashes `python -m data ingest | verify | inspect` and is never lost silently: one test per case.
Each case is a video2dataset tar of four good samples with one bad thing among them (real mp4 bytes, real tars).
Ingest writes the good ones and reports the bad one, with its key (or tar offset) and reason, in
ingest_report.json (`--strict` exits 1); verify and inspect read the same tar as a shard and report it too."""
import io
import json
import tarfile

import numpy as np
import pytest

from data.__main__ import main
from data.demo_set import render_clip
from data.shards import sha256_file
from data.video_io import encode_mp4

FRAMES = 8
VIDEO = encode_mp4(render_clip("circle", "red", "black", "right", 32, 32, FRAMES), 8)


def meta(key: str, **extra):
    return {"license": "CC0-1.0", "source_url": f"https://example.org/{key}", "attribution": "Kino tests",
            "rights_holder": "Kino", "width": 32, "height": 32, "fps": 8.0, "num_frames": FRAMES, **extra}


def good(key: str):
    return key, {"mp4": VIDEO, "txt": b"a red circle moving right", "json": json.dumps(meta(key)).encode()}


def write_tar(path, samples):
    """Samples as a video2dataset tar; returns each sample's (first header offset, end offset)."""
    spans = []
    with open(path, "wb") as handle:
        with tarfile.open(fileobj=handle, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for key, members in samples:
                start = handle.tell()
                for extension, data in members.items():
                    info = tarfile.TarInfo(f"{key}.{extension}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                spans.append((start, handle.tell()))
    return spans


def bad_sample(case: str):
    key, members = good("bad")
    if case == "non_utf8_caption":
        members["txt"] = b"a red \xff\xfe circle"
    elif case == "non_json_metadata":
        members["json"] = b"{license: CC0"
    elif case == "missing_member":
        del members["mp4"]
    elif case == "unreadable_video":
        members["mp4"] = b"\x00\x00\x00 not a video at all" * 10
    elif case == "shorter_than_claimed":
        members["json"] = json.dumps(meta("bad", num_frames=FRAMES * 4)).encode()
    return key, members


# case -> (the reason's words, samples kept, the report line's key)
CASES = {
    "non_utf8_caption": ("caption is not UTF-8", 4, "bad"),
    "non_json_metadata": ("metadata is not JSON", 4, "bad"),
    "missing_member": ("no video member", 4, "bad"),
    "unreadable_video": ("video unreadable", 4, "bad"),
    "shorter_than_claimed": ("shorter than its metadata claims", 4, "bad"),
    "duplicate_key": ("duplicate key", 4, "g1"),
    "truncated_tar": ("tar truncated inside member", 2, "bad"),
    "corrupt_tar": ("corrupt tar data", 4, "@"),
}


def make_case(directory, case: str):
    """A tar: g0, g1, the bad sample, g2, g3 (truncated: cut inside the bad sample; corrupt: the bad sample's bytes
    overwritten with garbage; duplicate: a second g1 in its place)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "00000.tar"
    middle = ("g1", good("g1")[1]) if case == "duplicate_key" else \
        good("bad") if case in ("truncated_tar", "corrupt_tar") else bad_sample(case)
    spans = write_tar(path, [good("g0"), good("g1"), middle, good("g2"), good("g3")])
    data = bytearray(path.read_bytes())
    start, end = spans[2]
    if case == "truncated_tar":
        data = data[:start + 512 + 300]  # inside the bad sample's first member
    elif case == "corrupt_tar":
        data[start:end] = np.random.default_rng(0).integers(1, 255, end - start, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("case", sorted(CASES))
def test_ingest_keeps_the_good_samples_and_reports_the_bad_one(case, tmp_path, capsys):
    reason, kept, key = CASES[case]
    make_case(tmp_path / "v2d", case)
    out = tmp_path / "out"
    status = main(["ingest", "--video2dataset", str(tmp_path / "v2d"), "--out", str(out), "--strict"])
    assert status == 1  # --strict: something was rejected
    report = json.loads((out / "ingest_report.json").read_text())
    assert report["accepted"] == kept and report["rejected"] == 1, report
    (line,) = report["rejections"]
    assert reason in "; ".join(line["reasons"]) and key in line["key"], line
    manifest = json.loads((out / "manifest.json").read_text())
    assert sum(shard["num_samples"] for shard in manifest["shards"]) == kept
    assert main(["ingest", "--video2dataset", str(tmp_path / "v2d"), "--out", str(tmp_path / "again")]) == 0
    assert "REJECTED 1 rows" in capsys.readouterr().out


@pytest.mark.parametrize("case", sorted(CASES))
def test_verify_and_inspect_report_the_bad_sample_of_a_shard(case, tmp_path, capsys):
    reason, kept, key = CASES[case]
    root = tmp_path / "shards"
    shard = make_case(root, case).rename(root / "shard-00000.tar")
    manifest = {"version": 1, "shards": [{"path": shard.name, "num_samples": 5, "bytes": shard.stat().st_size,
                                          "sha256": sha256_file(shard), "licenses": {"CC0-1.0": 5}}]}
    (root / "manifest.json").write_text(json.dumps(manifest))
    assert main(["verify", str(root)]) == 1
    out = capsys.readouterr().out
    words = {"shorter_than_claimed": "frames, its metadata claims", "unreadable_video": "video:"}.get(case, reason)
    assert sum(words in line for line in out.splitlines()) == 1, out
    assert f", {kept} good" in out
    assert main(["inspect", str(root)]) == 0
    out = capsys.readouterr().out
    assert f", {kept} good" in out and words in out
