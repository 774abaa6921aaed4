"""Prompt adherence judged from pixels alone, for the procedural prompts of data/demo_set.py.

A procedural prompt names four attributes: "a <colour> <shape> moving <direction> on a <background>
background" ("drifting rightward" for the demo's slow crossings: the same attributes). A generated clip is read back without any model: the background is the colour of the
frame's border, the object is the largest connected region that differs from it (stray specks are not the
object), its colour is the object's median colour, its shape is the one of data/demo_set.py's shapes that,
drawn with the object's area at its centroid, overlaps it best (most frames decide), and its motion is where
its centroid goes between the first and last third of the clip. Each attribute is right or wrong; a clip
whose object cannot be found is wrong on all three object attributes.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from data.demo_set import BACKGROUNDS, COLOURS, MOTIONS, SHAPES, caption_for, shape_mask

ATTRIBUTES = ("background", "colour", "shape", "motion")
_PROMPT = re.compile(r"^a (?P<colour>[a-z]+) (?P<shape>[a-z]+) (?P<pace>moving|drifting) (?P<motion>[a-z]+) on a "
                     r"(?P<background>[a-z ]+) background$")
_OBJECT_DISTANCE = 60.0  # RGB distance from the background above which a pixel belongs to the object
_MIN_OBJECT_FRACTION = 0.01  # of a frame's pixels: less than this is no object


def parse_prompt(prompt: str) -> Optional[Dict[str, str]]:
    """The four attributes of a procedural prompt, or None for any other text."""
    match = _PROMPT.match(prompt.strip().lower())
    if not match:
        return None
    found = match.groupdict()
    if found["pace"] == "drifting":  # "drifting rightward"
        found["motion"] = found["motion"][:-len("ward")] if found["motion"].endswith("ward") else ""
    if found["colour"] not in COLOURS or found["shape"] not in SHAPES or found["motion"] not in MOTIONS \
            or found["background"] not in BACKGROUNDS:
        return None
    return found


def prompt_for(colour: str, shape: str, motion: str, background: str, pace: str = "moving") -> str:
    return caption_for(colour, shape, motion, background, pace)


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
    for t in present:
        masks[t] = _largest_region(masks[t])
    colour = _nearest(np.median(frames[masks], axis=0), COLOURS)
    shapes, inside = [], []  # a frame whose object touches the edge is cut: its outline says little
    for t in present:
        ys, xs = np.nonzero(masks[t])
        shapes.append(_best_fitting_shape(masks[t]))
        inside.append(ys.min() > 0 and xs.min() > 0 and ys.max() < masks.shape[1] - 1 and xs.max() < masks.shape[2] - 1)
    votes = Counter(s for s, whole in zip(shapes, inside) if whole) or Counter(shapes)
    shape = max(SHAPES, key=lambda name: (votes[name], -SHAPES.index(name)))  # ties: the earlier shape
    return Reading(background, colour, shape, _motion(masks, present))


def _largest_region(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of a boolean frame mask."""
    labels, sizes = _regions(mask)
    return labels == (max(sizes, key=sizes.get) if sizes else 0)


def _regions(mask: np.ndarray) -> Tuple[np.ndarray, Dict[int, int]]:
    """The 4-connected regions of a boolean frame mask: a label per pixel (0: none) and each label's size."""
    labels = np.zeros(mask.shape, np.int32)
    sizes: Dict[int, int] = {}
    label = 0
    for start in zip(*np.nonzero(mask)):
        if labels[start]:
            continue
        label += 1
        labels[start], stack, size = label, [start], 0
        while stack:
            y, x = stack.pop()
            size += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = label
                    stack.append((ny, nx))
        sizes[label] = size
    return labels, sizes


# Area of each shape of data/demo_set.py's shape_mask per radius squared, and how far its centroid sits below
# its centre (the triangle's base is wider than its apex), in radii.
_AREA_PER_RADIUS2 = {"circle": np.pi, "square": 1.7 ** 2, "triangle": 1.2 * 1.8 ** 2 / 2}
_CENTROID_BELOW_CENTRE = {"circle": 0.0, "square": 0.0, "triangle": 0.2}


def _best_fitting_shape(mask: np.ndarray) -> str:
    """The shape whose outline, drawn with the mask's area at the mask's centroid, overlaps it best (IoU).
    Unlike the share of its bounding box an object fills, this does not flip a square to a circle for one
    soft corner, nor a circle to a triangle for one stray pixel on its edge."""
    ys, xs = np.nonzero(mask)
    area, cy, cx = float(len(ys)), ys.mean(), xs.mean()
    scores = []
    for name in SHAPES:
        radius = np.sqrt(area / _AREA_PER_RADIUS2[name])
        drawn = shape_mask(name, mask.shape[0], mask.shape[1], cy - _CENTROID_BELOW_CENTRE[name] * radius,
                            cx, radius)
        union = np.logical_or(drawn, mask).sum()
        scores.append(np.logical_and(drawn, mask).sum() / union if union else 0.0)
    return SHAPES[int(np.argmax(scores))]


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


# -- clips generated around given frames (models/conditioning.py) ----------------------------------------------
MODE_ATTRIBUTES = {"first_frame": ("start", "colour", "shape", "motion"),
                   "first_last": ("start", "end", "colour", "motion"),
                   "extend": ("continuous", "motion")}
_NEAR = 0.15  # of the frame's shorter side: a centroid this close to where it was given is there
_JUMP = 2.0  # a step at a window boundary may be this many times the largest step inside a window (+ 1 pixel)
# A second region at least this share of the largest's size is a second object. A window that draws the object
# twice (where the given frames have it and where the caption's clips often are) makes the largest region hop
# between the two inside a window, which the boundary test alone then excuses.
_SECOND_OBJECT = 0.5


def _object_masks(video: np.ndarray) -> np.ndarray:
    """(T, H, W) bool: the pixels away from the background (the median of the border, as read_clip's)."""
    frames = np.asarray(video, dtype=np.float32)
    border = np.concatenate([frames[:, 0], frames[:, -1], frames[:, :, 0], frames[:, :, -1]], axis=1)
    return np.linalg.norm(frames - np.median(border.reshape(-1, 3), axis=0), axis=-1) > _OBJECT_DISTANCE


def object_counts(video: np.ndarray) -> List[int]:
    """How many objects each frame shows: its regions of at least _MIN_OBJECT_FRACTION of the frame and at least
    _SECOND_OBJECT x the largest (specks of noise are neither)."""
    counts = []
    for mask in _object_masks(video):
        sizes = [size for size in _regions(mask)[1].values() if size >= _MIN_OBJECT_FRACTION * mask.size]
        counts.append(sum(size >= _SECOND_OBJECT * max(sizes) for size in sizes) if sizes else 0)
    return counts


def object_centroids(video: np.ndarray) -> List[Optional[np.ndarray]]:
    """Each frame's object centroid (x, y), or None where no object is found; the background as read_clip's."""
    out: List[Optional[np.ndarray]] = []
    for mask in _object_masks(video):
        if mask.sum() < _MIN_OBJECT_FRACTION * mask.size:
            out.append(None)
            continue
        ys, xs = np.nonzero(_largest_region(mask))
        out.append(np.array([xs.mean(), ys.mean()]))
    return out


def _near(a: Optional[np.ndarray], b: Optional[np.ndarray], side: int) -> bool:
    return a is not None and b is not None and float(np.linalg.norm(a - b)) <= _NEAR * side


def judge_conditioned(mode: str, prompt: str, video: np.ndarray, given: np.ndarray,
                      windows: Sequence[int] = ()) -> Dict[str, bool]:
    """Whether a clip generated around given frames does what the mode asks, from pixels:
    - first_frame: the first generated frame (index 1) has the object where the given first frame has it
      (`start`), and the clip shows the prompt's colour, shape and motion;
    - first_last: it starts where the first given frame has it and ends (the last generated frame) where the last
      has it (`given` holds both), moving as the prompt says;
    - extend: `given` is the source clip, `video` it extended, `windows` the frames where each generated window's
      new frames begin: `continuous` when every frame shows one object, no step of it at a window boundary is over
      _JUMP x the largest inside a window (+ 1 pixel), and no step anywhere leaps further than _NEAR of the frame's
      side; and the extension moves as the prompt says (the source's motion for any other prompt)."""
    wanted = parse_prompt(prompt) or {}
    side = min(video.shape[1], video.shape[2])
    seen = read_clip(video)
    if mode == "first_frame":
        return {"start": _near(object_centroids(video[1:2])[0], object_centroids(given[:1])[0], side),
                "colour": seen.colour == wanted.get("colour"), "shape": seen.shape == wanted.get("shape"),
                "motion": seen.motion == wanted.get("motion")}
    if mode == "first_last":
        ends = object_centroids(given[[0, -1]])
        generated = object_centroids(video[[1, -2]])
        return {"start": _near(generated[0], ends[0], side), "end": _near(generated[1], ends[1], side),
                "colour": seen.colour == wanted.get("colour"), "motion": seen.motion == wanted.get("motion")}
    if mode == "extend":
        points = object_centroids(video)
        steps = {t: float(np.linalg.norm(points[t] - points[t - 1])) for t in range(1, len(points))
                 if points[t] is not None and points[t - 1] is not None}
        boundary = [steps.get(t, np.inf) for t in windows]
        inside = [s for t, s in steps.items() if t not in windows]
        continuous = (bool(boundary) and max(boundary) <= _JUMP * max(inside or [0.0]) + 1.0
                      and max(steps.values()) <= _NEAR * side and set(object_counts(video)) == {1})
        extension = video[len(given) - 1:]
        # The source's own motion can be under the pixel read_clip needs (half of a slow clip); the prompt says it.
        motion = wanted.get("motion") or read_clip(given).motion
        return {"continuous": continuous, "motion": read_clip(extension).motion == motion}
    raise ValueError(f"no judge for mode {mode!r}: {', '.join(MODE_ATTRIBUTES)}")
