"""The pixel judge of prompt adherence (train/adherence.py) reads rendered procedural clips correctly, at the
demo's bucket shapes, and refuses what it cannot judge."""
import itertools
import random

import numpy as np
import pytest

from data.decode import resize_and_crop
from data.demo_set import BACKGROUNDS, CLIP_FRAMES, COLOURS, MOTIONS, SHAPES, render_clip
from train.adherence import judge, parse_prompt, prompt_for, read_clip, summarize


def rendered(colour, shape, motion, background, source=(96, 96), bucket=(48, 48), frames=8, clip_frames=24):
    clip = render_clip(shape, colour, background, motion, source[0], source[1], clip_frames)
    picked = np.linspace(0, clip_frames - 1, frames).round().astype(int)
    return resize_and_crop(clip[picked], bucket[1], bucket[0]).numpy()


@pytest.mark.parametrize("buckets, clip_frames", [
    (((24, 24), (32, 16), (16, 32)), CLIP_FRAMES),  # the demo's buckets and clips (8 of 12 frames)
    (((32, 32), (48, 48), (64, 36), (36, 64)), 24),
])
def test_every_attribute_of_rendered_clips_is_read_back(buckets, clip_frames):
    rng = random.Random(0)
    combos = [c for c in itertools.product(sorted(COLOURS), SHAPES, sorted(MOTIONS), sorted(BACKGROUNDS))]
    judgements = []
    for colour, shape, motion, background in rng.sample(combos, 60):
        for bucket in buckets:
            source = {1.0: (96, 96)}.get(bucket[0] / bucket[1], (128, 72) if bucket[0] > bucket[1] else (72, 128))
            video = rendered(colour, shape, motion, background, source, bucket, clip_frames=clip_frames)
            judgements.append(judge(prompt_for(colour, shape, motion, background), video))
    scores = summarize(judgements)
    assert scores == {"background": 1.0, "colour": 1.0, "shape": 1.0, "motion": 1.0, "overall": 1.0}


def test_soft_corners_or_a_stray_speck_do_not_change_the_shape():
    # What sampled clips look like: a square with soft corners, a circle with a speck of another colour near
    # it. Read by the share of its bounding box it fills, the speck widened the circle's box: a triangle.
    square = rendered("yellow", "square", "right", "navy", bucket=(24, 24), clip_frames=CLIP_FRAMES)
    for t in range(len(square)):
        ys, xs = np.nonzero(np.any(square[t] != square[t, 0, 0], axis=-1))
        for y, x in itertools.product((ys.min(), ys.max() - 1), (xs.min(), xs.max() - 1)):
            square[t, y:y + 2, x:x + 2] = BACKGROUNDS["navy"]
    assert read_clip(square).shape == "square"
    circle = rendered("green", "circle", "down", "grey", bucket=(24, 24), clip_frames=CLIP_FRAMES)
    circle[:, 1, 1] = COLOURS["magenta"]
    assert read_clip(circle).shape == "circle" and read_clip(circle).colour == "green"


def test_noise_and_an_empty_frame_are_not_read_as_the_prompt():
    prompt = prompt_for("yellow", "square", "down", "navy")
    empty = np.zeros((8, 32, 32, 3), np.uint8) + np.array(BACKGROUNDS["navy"], np.uint8)
    assert judge(prompt, empty) == {"background": True, "colour": False, "shape": False, "motion": False}
    assert read_clip(empty).colour is None
    still = rendered("yellow", "square", "down", "navy")[:1].repeat(8, axis=0)
    assert judge(prompt, still)["motion"] is False  # an object that does not move has no direction
    wrong_way = rendered("yellow", "square", "up", "navy")
    assert judge(prompt, wrong_way) == {"background": True, "colour": True, "shape": True, "motion": False}


def test_only_procedural_prompts_are_parsed():
    assert parse_prompt("a magenta triangle moving left on a dark green background") == {
        "colour": "magenta", "shape": "triangle", "pace": "moving", "motion": "left", "background": "dark green"}
    assert parse_prompt("a red circle drifting upward on a navy background") == {  # the demo's slow crossings
        "colour": "red", "shape": "circle", "pace": "drifting", "motion": "up", "background": "navy"}
    assert parse_prompt("a red circle drifting up on a navy background") is None
    assert parse_prompt("a big grey rabbit stretching its arms") is None
    assert parse_prompt("a purple square moving left on a black background") is None  # not in the palette
    with pytest.raises(ValueError, match="not a procedural prompt"):
        judge("a rabbit", np.zeros((2, 8, 8, 3), np.uint8))
