"""The toy world: procedural, captioned, flat-shaded videos in which every stage of the recipe runs on a CPU.

One or two shapes (circle, square, triangle) in named colours move at constant speed on a named
background. The world's `motion` rule decides what happens at a border: "bounce" (the first world:
objects bounce off it, so a caption's direction holds only until the first bounce) or "wrap" (the frame
is a torus: an object leaving one border re-enters at the opposite one, cut in two while it crosses, and
moves the named way for the whole video). A clip is a pure function of (seed, index); it renders any
number of frames from any start frame, and the world is stationary, so a long video has the same
statistics as a short one. Each clip carries its caption ("a red circle moving left on a dark blue
background"; other phrasings of the same scene: `hiar.captions`) and its ground-truth parameters.
`measure_frame` recovers, from any RGB frame, the background colour and each object's colour, area,
centroid and (on request) shape by nearest-palette segmentation: the ground-truth fidelity metric of
the evaluation.
"""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np

from hiar.captions import parse_caption, template_caption

# Palettes (RGB). Object colours are far from each other and from every background.
OBJECT_COLOURS = {
    "red": (220, 40, 40), "green": (40, 190, 70), "blue": (60, 110, 240), "yellow": (240, 220, 40),
    "white": (245, 245, 245), "orange": (250, 140, 20), "purple": (170, 70, 220), "cyan": (40, 220, 220),
}
BACKGROUNDS = {
    "black": (10, 10, 10), "dark blue": (20, 30, 90), "dark gray": (70, 70, 70), "dark green": (15, 70, 30),
    "dark purple": (60, 20, 70),
}
SHAPES = ("circle", "square", "triangle")
UNIT_AREA = {"circle": math.pi, "square": 4.0, "triangle": 2.0}  # area of a shape of half-extent 1
# Unit direction vectors (x right, y down) and their names in captions.
DIRECTIONS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
Motion = Literal["bounce", "wrap"]  # what an object does at a border (video.toy_motion, the codec's motion)
MOTIONS = get_args(Motion)


@dataclass(frozen=True)
class ToyObject:
    shape: str
    colour: str
    size: float  # half-extent in pixels (circle radius, half side, half base/height of the triangle)
    x: float  # centre of the bounding box at frame 0
    y: float
    direction: str
    speed: float  # pixels per frame

    @property
    def area(self) -> float:
        return UNIT_AREA[self.shape] * self.size ** 2

    def centre(self, frame: float, height: int, width: int, motion: Motion = "bounce") -> tuple[float, float]:
        """Bounding-box centre at `frame`: bouncing off the borders (a triangle wave in each axis) or, with
        motion "wrap", modulo the frame (a sawtooth: the frame is a torus)."""
        dx, dy = DIRECTIONS[self.direction]
        x, y = self.x + dx * self.speed * frame, self.y + dy * self.speed * frame
        if motion == "wrap":
            return x % width, y % height
        return _bounce(x, self.size, width), _bounce(y, self.size, height)

    def centroid(self, frame: float, height: int, width: int, motion: Motion = "bounce") -> tuple[float, float]:
        """Centre of mass (the triangle's lies a third of its height below the box centre; on the torus,
        modulo the height)."""
        x, y = self.centre(frame, height, width, motion)
        y += self.size / 3 if self.shape == "triangle" else 0.0
        return x, y % height if motion == "wrap" else y


def _bounce(p: float, margin: float, extent: int) -> float:
    span = extent - 2 * margin
    u = (p - margin) % (2 * span)
    return margin + (u if u <= span else 2 * span - u)


def torus_offset(d: np.ndarray | float, extent: float) -> np.ndarray | float:
    """The shortest signed offset equal to d modulo extent, in [-extent / 2, extent / 2)."""
    return (d + extent / 2) % extent - extent / 2


def torus_distance(a: tuple[float, float], b: tuple[float, float], height: int, width: int) -> float:
    """How far apart two (x, y) points of a frame are the shortest way round the torus (the world that
    wraps); in the one that bounces, where a step is never half the frame, the plain distance."""
    return math.hypot(torus_offset(b[0] - a[0], width), torus_offset(b[1] - a[1], height))


@dataclass(frozen=True)
class ToyClip:
    background: str
    objects: tuple[ToyObject, ...]
    height: int = 64
    width: int = 64
    motion: Motion = "bounce"

    @property
    def caption(self) -> str:
        """The template caption (`hiar.captions.phrase(clip.spec(), style, key)` gives the others)."""
        return template_caption(self.spec())

    def spec(self) -> dict:
        """What a caption says of the clip: background and each object's colour, shape and direction."""
        return {"background": self.background,
                "objects": [{"colour": o.colour, "shape": o.shape, "direction": o.direction} for o in self.objects]}

    def params(self) -> dict:
        return dataclasses.asdict(self)

    @staticmethod
    def from_params(params: dict) -> ToyClip:
        return ToyClip(params["background"], tuple(ToyObject(**o) for o in params["objects"]),
                       params["height"], params["width"], params.get("motion", "bounce"))

    def render(self, num_frames: int, start: int = 0) -> np.ndarray:
        """Frames start .. start + num_frames - 1 as uint8 [F, H, W, 3]."""
        ys, xs = np.mgrid[0:self.height, 0:self.width] + 0.5  # pixel centres
        frames = np.empty((num_frames, self.height, self.width, 3), np.uint8)
        for i in range(num_frames):
            frame = frames[i]
            frame[:] = BACKGROUNDS[self.background]
            for obj in self.objects:  # later objects are drawn over earlier ones
                cx, cy = obj.centre(start + i, self.height, self.width, self.motion)
                dx, dy = xs - cx, ys - cy
                if self.motion == "wrap":  # each pixel's nearest copy of the object on the torus
                    dx, dy = torus_offset(dx, self.width), torus_offset(dy, self.height)
                frame[_inside(obj.shape, dx, dy, obj.size)] = OBJECT_COLOURS[obj.colour]
        return frames


def _inside(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return (np.abs(dx) <= r) & (np.abs(dy) <= r)
    # upright isosceles triangle: apex at the top of the box, base (width 2r) at the bottom
    return (dy >= -r) & (dy <= r) & (np.abs(dx) <= (dy + r) / 2)


def sample_clip(seed: int, index: int, height: int = 64, width: int = 64, max_objects: int = 2,
                motion: Motion = "bounce") -> ToyClip:
    """Clip `index` of the world with this seed: a pure function of its arguments. The motion rule changes
    nothing else: the same (seed, index) has the same scene and start in both worlds."""
    if motion not in MOTIONS:
        raise ValueError(f"motion {motion!r}: one of {MOTIONS}")
    rng = random.Random(f"toyworld/{seed}/{index}")
    background = rng.choice(sorted(BACKGROUNDS))
    colours = rng.sample(sorted(OBJECT_COLOURS), k=rng.randint(1, max_objects))  # distinct colours
    objects = []
    for colour in colours:
        size = rng.uniform(5.0, 9.0)
        objects.append(ToyObject(shape=rng.choice(SHAPES), colour=colour, size=size,
                                 x=rng.uniform(size, width - size), y=rng.uniform(size, height - size),
                                 direction=rng.choice(sorted(DIRECTIONS)), speed=rng.uniform(0.75, 2.5)))
    return ToyClip(background, tuple(objects), height, width, motion)


def clip_to_video(frames: np.ndarray) -> np.ndarray:
    """uint8 [F, H, W, 3] -> float32 [F, 3, H, W] in [-1, 1], the codecs' input."""
    return frames.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1


# -- measurement --------------------------------------------------------------------------------------

_PALETTE_NAMES = [*BACKGROUNDS, *OBJECT_COLOURS]
_PALETTE = np.array([*BACKGROUNDS.values(), *OBJECT_COLOURS.values()], dtype=np.float32)  # [P, 3]


@dataclass(frozen=True)
class MeasuredObject:
    colour: str
    area: int  # pixels
    centroid: tuple[float, float]  # (x, y) in pixels
    shape: str | None = None  # `classify_shape` of its pixels, when measure_frame is asked for shapes
    shape_iou: float | None = None
    core: int | None = None  # with shapes: pixels whose 3x3 neighbourhood is all this colour (`core_area`)


@dataclass(frozen=True)
class FrameMeasurement:
    background: str
    background_error: float  # mean RGB distance of the background pixels to the named colour
    objects: tuple[MeasuredObject, ...]  # by decreasing area


def measure_frame(frame: np.ndarray, min_area: int = 6, max_distance: float = 90.0,
                  shapes: bool = False, motion: Motion = "bounce") -> FrameMeasurement:
    """Segment an RGB frame (uint8 [H, W, 3]) by nearest palette colour.

    The background is the background colour covering most pixels; every object colour covering at least
    `min_area` pixels is an object, with its area, centroid and, with `shapes`, its `classify_shape`.
    Pixels farther than `max_distance` from every palette colour count as neither (generated frames are
    not exactly flat). In the world that wraps (`motion` "wrap") the frame is a torus: an object cut by a border is
    measured whole, as `torus_roll` rejoins it, and its centroid is taken modulo the frame.
    """
    pixels = frame.reshape(-1, 3).astype(np.float32)
    distance = np.linalg.norm(pixels[:, None, :] - _PALETTE[None], axis=-1)  # [H*W, P]
    label = distance.argmin(axis=1)
    label[distance.min(axis=1) > max_distance] = -1
    counts = np.bincount(label[label >= 0], minlength=len(_PALETTE))
    nb = len(BACKGROUNDS)
    bg = int(counts[:nb].argmax())
    bg_pixels = label == bg
    bg_error = float(distance[bg_pixels, bg].mean()) if bg_pixels.any() else float("inf")
    ys, xs = np.divmod(np.arange(len(label)), frame.shape[1])
    objects = []
    for p in range(nb, len(_PALETTE)):
        if counts[p] >= min_area:
            mask = (label == p).reshape(frame.shape[:2])
            roll = torus_roll(mask) if motion == "wrap" else (0, 0)
            mask = np.roll(mask, (-roll[0], -roll[1]), (0, 1))
            my, mx = np.nonzero(mask)
            centroid = (float(mx.mean() + 0.5), float(my.mean() + 0.5))
            shape = (*classify_shape(mask, centroid), core_area(mask)) if shapes else (None, None, None)
            centroid = ((centroid[0] + roll[1]) % frame.shape[1], (centroid[1] + roll[0]) % frame.shape[0])
            objects.append(MeasuredObject(_PALETTE_NAMES[p], int(counts[p]), centroid, *shape))
    objects.sort(key=lambda o: -o.area)
    return FrameMeasurement(_PALETTE_NAMES[bg], bg_error, tuple(objects))


def torus_roll(mask: np.ndarray) -> tuple[int, int]:
    """(rows, columns) to roll a mask (bool [H, W]) back by so that no object in it straddles a border:
    on each axis where both border lines are occupied, the widest empty band is moved to the border.
    (0, 0) for a mask that touches no two opposite borders, so a whole object is measured as before."""
    def along(occupied: np.ndarray) -> int:
        if not (occupied[0] and occupied[-1]):
            return 0
        edges = np.flatnonzero(np.diff(occupied.astype(np.int8)))  # i: occupied[i] != occupied[i + 1]
        gaps = [(b - a, b + 1) for a, b in zip(edges[::2], edges[1::2])]  # (length, first occupied after)
        return max(gaps)[1] if gaps else 0

    return along(mask.any(1)), along(mask.any(0))


# Below this overlap with its best-fitting shape an object has no recognisable shape. Rendered objects
# overlap their own shape by 0.86 or more in 95% of frames (less where another object hides part of
# them); an 8x2 ellipse overlaps a circle of its area by about 0.4.
SHAPE_MIN_IOU = 0.6


def core_area(mask: np.ndarray) -> int:
    """Pixels of a mask (bool [H, W]) whose 3x3 neighbourhood lies inside it: an object has a core, the
    one- or two-pixel rims a blurred edge leaves in a blended colour (cyan over dark green reads green)
    have almost none."""
    inner = mask[1:-1, 1:-1].copy()
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            inner &= mask[1 + dy:mask.shape[0] - 1 + dy, 1 + dx:mask.shape[1] - 1 + dx]
    return int(inner.sum())


def classify_shape(mask: np.ndarray, centroid: tuple[float, float]) -> tuple[str | None, float]:
    """The world's shape that best overlaps an object's pixels (bool [H, W]) and that overlap (IoU);
    None for the shape when even the best overlaps less than SHAPE_MIN_IOU (a blob, a fragment).

    Each candidate is drawn as the world draws it, upright, with the object's area (its half-extent from
    UNIT_AREA) and centroid, so only the outline decides: a circle fills pi/4 of its box, a square all of
    it, a triangle half, with its mass a third of its height below the box centre.
    """
    area = mask.sum()
    ys, xs = np.mgrid[0:mask.shape[0], 0:mask.shape[1]] + 0.5  # pixel centres
    best: tuple[str | None, float] = (None, 0.0)
    for shape in SHAPES:
        r = math.sqrt(area / UNIT_AREA[shape])
        dy = r / 3 if shape == "triangle" else 0.0  # centroid below the box centre
        drawn = _inside(shape, xs - centroid[0], ys - (centroid[1] - dy), r)
        iou = float((drawn & mask).sum() / max((drawn | mask).sum(), 1))
        if iou > best[1]:
            best = (shape, iou)
    return best if best[1] >= SHAPE_MIN_IOU else (None, best[1])


def caption_fidelity(frames: np.ndarray, caption: str, measured: list[FrameMeasurement] | None = None,
                     motion: Motion = "bounce") -> dict:
    """How well a video (uint8 [F, H, W, 3]) shows its toy caption, frame by frame (`measured`: the
    frames' `measure_frame`, when the caller has it; `motion`: the world's rule at a border).

    background: fraction of frames whose measured background is the prompted one; objects: fraction of
    frames showing every prompted object colour; speed: median centroid displacement per frame (pixels)
    of each prompted colour, over consecutive frames where it is seen.
    """
    wanted = parse_caption(caption)
    if wanted is None:
        raise ValueError(f"not a toy-world caption: {caption!r}")
    colours = [o["colour"] for o in wanted["objects"]]
    measured = measured or [measure_frame(f, motion=motion) for f in frames]
    tracks = {c: [next((o.centroid for o in m.objects if o.colour == c), None) for m in measured] for c in colours}
    height, width = frames.shape[1:3]

    def step(a: tuple[float, float], b: tuple[float, float]) -> float:
        return torus_distance(a, b, height, width) if motion == "wrap" else math.dist(a, b)

    speeds = {}
    for c, track in tracks.items():
        steps = [step(a, b) for a, b in zip(track, track[1:]) if a is not None and b is not None]
        speeds[c] = float(np.median(steps)) if steps else float("nan")
    return {"background": float(np.mean([m.background == wanted["background"] for m in measured])),
            "objects": float(np.mean([all(t[i] is not None for t in tracks.values()) for i in range(len(frames))])),
            "speed": speeds}


# A clip passes when its prompted background and every prompted object colour are measured in at least
# half of its frames; it moves when every prompted object's median centroid step is within the world's
# speeds (0.75 to 2.5 px a frame, with a 0.25 px margin).
SPEED_RANGE = (0.5, 2.75)


def speed_census(speeds: list[float]) -> dict:
    """Fractions of measured objects (median steps from `caption_fidelity`) within the world's speeds,
    faster (a flickering or fragmented object's centroid jumps), slower (still) and never seen."""
    n = max(len(speeds), 1)
    seen = [s for s in speeds if not math.isnan(s)]
    return {"in_range": sum(SPEED_RANGE[0] <= s <= SPEED_RANGE[1] for s in seen) / n,
            "faster": sum(s > SPEED_RANGE[1] for s in seen) / n,
            "slower": sum(s < SPEED_RANGE[0] for s in seen) / n, "unseen": (len(speeds) - len(seen)) / n}


def fidelity_verdict(fidelity: dict) -> dict:
    """`caption_fidelity`'s result -> {colours_ok, moves}."""
    return {"colours_ok": fidelity["background"] >= 0.5 and fidelity["objects"] >= 0.5,
            "moves": all(SPEED_RANGE[0] <= s <= SPEED_RANGE[1] for s in fidelity["speed"].values())}
