"""Prompt adherence judged from pixels alone, for the procedural prompts of data/samples.py.

A procedural prompt names four attributes: "a <colour> <shape> moving <direction> on a <background>
background". A generated clip is read back without any model: the background is the colour of the
frame's border, the object is whatever differs from it, its colour is the object's median colour, its shape
comes from how much of its bounding box it fills (square ~1, circle ~0.8, triangle ~0.5), and its motion
from where its centroid goes between the first and last third of the clip. Each attribute is right or
wrong; a clip whose object cannot be found is wrong on all three object attributes.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np

from data.samples import BACKGROUNDS, COLOURS, MOTIONS, SHAPES

ATTRIBUTES = ("background", "colour", "shape", "motion")
_PROMPT = re.compile(r"^a (?P<colour>[a-z]+) (?P<shape>[a-z]+) moving (?P<motion>[a-z]+) on a "
                     r"(?P<background>[a-z ]+) background$")
_OBJECT_DISTANCE = 60.0  # RGB distance from the background above which a pixel belongs to the object
_MIN_OBJECT_FRACTION = 0.01  # of a frame's pixels: less than this is no object


def parse_prompt(prompt: str) -> Optional[Dict[str, str]]:
    """The four attributes of a procedural prompt, or None for any other text."""
    match = _PROMPT.match(prompt.strip().lower())
    if not match:
        return None
    found = match.groupdict()
    if found["colour"] not in COLOURS or found["shape"] not in SHAPES or found["motion"] not in MOTIONS \
            or found["background"] not in BACKGROUNDS:
        return None
    return found


def prompt_for(colour: str, shape: str, motion: str, background: str) -> str:
    return f"a {colour} {shape} moving {motion} on a {background} background"


def _nearest(rgb: np.ndarray, palette: Dict[str, Sequence[int]]) -> str:
    names = sorted(palette)
    distances = [np.linalg.norm(rgb - np.asarray(palette[n], np.float32)) for n in names]
    return names[int(np.argmin(distances))]


@dataclass
class Reading:
    """What a clip shows: each attribute's name, or None where no object was found."""

    background: str
    colour: Optional[str]
    shape: Optional[str]
    motion: Optional[str]


def read_clip(video: np.ndarray) -> Reading:
    """uint8 (T, H, W, 3) -> the attributes it shows."""
    frames = np.asarray(video, dtype=np.float32)
    border = np.concatenate([frames[:, 0], frames[:, -1], frames[:, :, 0], frames[:, :, -1]], axis=1)
    background_rgb = np.median(border.reshape(-1, 3), axis=0)
    background = _nearest(background_rgb, BACKGROUNDS)
    masks = np.linalg.norm(frames - background_rgb, axis=-1) > _OBJECT_DISTANCE  # (T, H, W)
    pixels = masks.shape[1] * masks.shape[2]
    present = [t for t in range(len(masks)) if masks[t].sum() >= _MIN_OBJECT_FRACTION * pixels]
    if not present:
        return Reading(background, None, None, None)
    colour = _nearest(np.median(frames[masks], axis=0), COLOURS)
    fills, inside = [], []  # a frame whose object touches the edge is cut: its fill says little
    for t in present:
        ys, xs = np.nonzero(masks[t])
        box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
        fills.append(masks[t].sum() / box)
        inside.append(ys.min() > 0 and xs.min() > 0 and ys.max() < masks.shape[1] - 1 and xs.max() < masks.shape[2] - 1)
    fill = float(np.median([f for f, whole in zip(fills, inside) if whole] or fills))
    shape = "square" if fill > 0.86 else ("circle" if fill > 0.62 else "triangle")
    return Reading(background, colour, shape, _motion(masks, present))


def _motion(masks: np.ndarray, present: List[int]) -> Optional[str]:
    centroids = np.array([[np.nonzero(masks[t])[1].mean(), np.nonzero(masks[t])[0].mean()] for t in present])
    third = max(1, len(present) // 3)
    dx, dy = centroids[-third:].mean(axis=0) - centroids[:third].mean(axis=0)
    if max(abs(dx), abs(dy)) < 1.0:  # under a pixel: nothing moved
        return None
    if abs(dx) >= abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


def judge(prompt: str, video: np.ndarray) -> Dict[str, bool]:
    """Attribute -> whether the clip shows what the procedural prompt asks."""
    wanted = parse_prompt(prompt)
    if wanted is None:
        raise ValueError(f"not a procedural prompt: {prompt!r}")
    seen = read_clip(video)
    return {attribute: getattr(seen, attribute) == wanted[attribute] for attribute in ATTRIBUTES}


def summarize(judgements: Iterable[Dict[str, bool]]) -> Dict[str, float]:
    """Share right per attribute, and `overall`: the mean over attributes and clips."""
    rows = list(judgements)
    if not rows:
        return {}
    scores = {attribute: sum(r[attribute] for r in rows) / len(rows) for attribute in ATTRIBUTES}
    scores["overall"] = sum(scores.values()) / len(ATTRIBUTES)
    return scores
