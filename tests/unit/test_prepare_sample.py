"""`prepare_sample` turns one raw WebDataset sample (a dict of bytes, as a tar gives it) into a clip ready to pack,
or names why it must not reach the model. Real mp4 bytes, no tar."""
import json

import pytest

from data.buckets import bucket_shapes
from data.licenses import LicensePolicy
from data.loader import LoaderSpec, prepare_sample
from data.demo_set import procedural_samples

POLICY = LicensePolicy.from_ids(["CC0-1.0"])
SPEC = LoaderSpec(root="unused", policy=POLICY, shapes=bucket_shapes([32], [1.0, 1.78, 0.56], [8], multiple=4),
                  token_budget=4096, patch_size=(1, 4, 4), temporal_factor=1, spatial_factor=1, fps=8.0, seed=0,
                  coordinator=None)


@pytest.fixture(scope="module")
def raw():
    key, mp4, caption, meta = next(procedural_samples(1, seed=0))
    return {"__key__": key, "__url__": "/data/shard-00000.tar", "mp4": mp4, "txt": caption.encode(),
            "json": json.dumps(meta).encode()}


def test_a_licensed_sample_becomes_a_clip_fitted_to_a_bucket(raw):
    clip, reason = prepare_sample(raw, (0, 3, 5), SPEC)
    assert reason is None
    frames, height, width, channels = clip.video.shape
    assert (frames, channels) == (8, 3) and any((s.height, s.width) == (height, width) for s in SPEC.shapes)
    assert clip.tokens == frames * (height // 4) * (width // 4)
    assert (clip.key, clip.shard, clip.tag, clip.entry()) == (raw["__key__"], "shard-00000.tar", (0, 3, 5),
                                                              [0, 3, 5, "shard-00000.tar"])
    assert clip.caption == raw["txt"].decode() and clip.meta["license"] == "CC0-1.0"


def test_the_same_tag_makes_the_same_choices_whoever_reads_it(raw):
    first, _ = prepare_sample(raw, (0, 3, 5), SPEC)
    again, _ = prepare_sample(raw, (0, 3, 5), SPEC)
    assert first.video.equal(again.video)


@pytest.mark.parametrize("change, reason", [
    (lambda r: r.pop("mp4"), "incomplete_sample"),
    (lambda r: r.update(json=b"{not json"), "metadata_invalid"),
    (lambda r: r.update(json=json.dumps(dict(json.loads(r["json"]), license="CC-BY-NC-4.0")).encode()),
     "license_not_allowed"),
    (lambda r: r.update(txt=b"\xff\xfe caption"), "caption_not_utf8"),
    (lambda r: r.update(mp4=b"\x00" * 64), "undecodable"),
    (lambda r: r.update(json=json.dumps(dict(json.loads(r["json"]), num_frames=2)).encode()), "too_short"),
])
def test_a_sample_that_must_not_reach_the_model_is_named_with_its_reason(raw, change, reason):
    broken = dict(raw)
    change(broken)
    assert prepare_sample(broken, (0, 0, 0), SPEC) == (None, reason)
