"""The synthetic world of the tiny world model: scenes, their captions and pictures, and scoring.

A scene is one to three objects (a shape, a colour, a size and a place on a 3x3 grid) on a
background (a colour, plain or with a pattern). Captions name all of that; what they leave to the
seed is each object's exact position in its place and how its pattern lies (stripes across or down,
and where stripes and dots start), so that a picture is more than its caption, as a real one is.
``render`` draws it exactly and keeps every object's mask; ``caption`` names everything in it.
The scoring half reads *generated* pictures back: each pixel takes the nearest colour of the
world's palette, objects are the connected regions of one object colour, their shape is the
outline that covers them best (``classify_shape``), and the background is the most common
background colour with its pattern. Everything is numpy (and scipy's connected components);
nothing here imports torch or ComfyUI.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

IMAGE_SIZE = 128  # pixels; TAESD makes it a 16x16 latent

OBJECT_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (240, 215, 40),
    "purple": (145, 55, 200),
    "orange": (245, 135, 25),
}
# Background colours, each with the second colour of its stripes and dots; none near an object colour.
BACKGROUND_COLOURS: dict[str, tuple[tuple[int, int, int], tuple[int, int, int]]] = {
    "white": ((235, 235, 235), (175, 175, 175)),
    "gray": ((120, 120, 120), (70, 70, 70)),
    "pink": ((245, 175, 195), (190, 125, 145)),
    "brown": ((115, 75, 40), (165, 130, 95)),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 17, "large": 25}  # radius in pixels: the object fits a square of twice that
PATTERNS = ("plain", "striped", "dotted")  # "plain" is left out of captions
# Patterns sit on the 8 px cells of the 16x16 latent, so that even a VAE that keeps only each cell's
# mean colour keeps them: 8 px stripes, and dots inside every other cell in both directions. A
# pattern lies in one of PATTERN_PHASES ways: stripes down or across, starting in the first or the
# second cell; dots in any of the four cells of their 2x2 period.
STRIPE_PERIOD = 16
DOT_PERIOD, DOT_RADIUS = 16, 4
PATTERN_PHASES = 4

# The 3x3 grid of places (row, column) and how captions say them.
PLACES: dict[tuple[int, int], str] = {
    (0, 0): "at the top left", (0, 1): "at the top", (0, 2): "at the top right",
    (1, 0): "on the left", (1, 1): "in the middle", (1, 2): "on the right",
    (2, 0): "at the bottom left", (2, 1): "at the bottom", (2, 2): "at the bottom right",
}
CELL = IMAGE_SIZE / 3
JITTER = 9  # pixels an object's centre may move from its cell's centre
MAX_OBJECTS = 3
OBJECT_COUNT_WEIGHTS = (0.5, 0.3, 0.2)  # one, two, three objects: single objects are the most common

# Scoring thresholds.
MIN_OBJECT_AREA = 120  # pixels: smaller regions of an object colour are noise, not objects
MAX_COLOUR_DISTANCE = 90.0  # RGB distance beyond which a pixel matches no palette colour
STRIPED_MIN_SPREAD = 0.35  # std over columns (or rows) of the share of pattern pixels: 0.5 for stripes, 0.25 for dots
PATTERN_MIN_SHARE = 0.06  # share of pattern pixels in the background below which it is plain


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    place: tuple[int, int]  # grid (row, column)
    centre: tuple[int, int]  # pixels (x, y)

    @property
    def radius(self) -> int:
        return SIZES[self.size]

    @property
    def words(self) -> str:
        return f"{self.size} {self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    background: str
    pattern: str
    phase: int = 0  # how the pattern lies (0 .. PATTERN_PHASES - 1; background_image), not captioned


# --- making scenes ---------------------------------------------------------------------------------

def place_centre(place: tuple[int, int], radius: int, offset: tuple[float, float] = (0.0, 0.0)) -> tuple[int, int]:
    """The pixel centre of an object in a grid cell, moved by ``offset`` and kept inside the image."""
    row, column = place
    low, high = radius + 2, IMAGE_SIZE - radius - 3
    x = int(round(min(max((column + 0.5) * CELL + offset[0], low), high)))
    y = int(round(min(max((row + 0.5) * CELL + offset[1], low), high)))
    return x, y


def make_object(shape: str, colour: str, size: str, place: tuple[int, int], offset: tuple[float, float] = (0.0, 0.0)) -> SceneObject:
    return SceneObject(shape, colour, size, place, place_centre(place, SIZES[size], offset))


def overlaps(a: SceneObject, b: SceneObject, margin: int = 3) -> bool:
    """Whether the squares the two objects fit in come within ``margin`` pixels of each other."""
    reach = a.radius + b.radius + margin
    return abs(a.centre[0] - b.centre[0]) < reach and abs(a.centre[1] - b.centre[1]) < reach


def sample_scene(rng: np.random.Generator, objects: int | None = None) -> Scene:
    """A random scene: objects of distinct colours in distinct, non-overlapping places."""
    count = objects or int(rng.choice(np.arange(1, MAX_OBJECTS + 1), p=OBJECT_COUNT_WEIGHTS))
    while True:
        colours = rng.choice(list(OBJECT_COLOURS), size=count, replace=False)
        cells = rng.choice(len(PLACES), size=count, replace=False)
        chosen = []
        for colour, cell in zip(colours, cells):
            offset = tuple(rng.uniform(-JITTER, JITTER, size=2))
            chosen.append(make_object(str(rng.choice(SHAPES)), str(colour), str(rng.choice(list(SIZES))), list(PLACES)[cell], offset))
        if not any(overlaps(a, b) for i, a in enumerate(chosen) for b in chosen[i + 1:]):
            break
    return Scene(tuple(chosen), str(rng.choice(list(BACKGROUND_COLOURS))), str(rng.choice(PATTERNS)), int(rng.integers(PATTERN_PHASES)))


def caption(scene: Scene, places: bool = True) -> str:
    """E.g. "a small red circle at the top left and a large blue square in the middle on a striped gray
    background" (without ``places``: "a small red circle and a large blue square on a ...")."""
    things = " and ".join(f"a {o.words}" + (f" {PLACES[o.place]}" if places else "") for o in scene.objects)
    pattern = "" if scene.pattern == "plain" else f"{scene.pattern} "
    return f"{things} on a {pattern}{scene.background} background"


# --- drawing ---------------------------------------------------------------------------------------

def object_mask(obj: SceneObject, size: int = IMAGE_SIZE, radius: float | None = None) -> np.ndarray:
    """bool ``[size, size]``: the pixels the object covers (``radius`` overrides its size's)."""
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    x, y = obj.centre
    r = obj.radius if radius is None else radius
    if obj.shape == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=255)
    elif obj.shape == "square":
        s = int(round(0.88 * r))  # about the circle's area
        draw.rectangle((x - s, y - s, x + s, y + s), fill=255)
    elif obj.shape == "triangle":
        draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=255)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}")
    return np.asarray(mask) > 127


def background_image(colour: str, pattern: str, phase: int = 0, size: int = IMAGE_SIZE) -> np.ndarray:
    """uint8 ``[size, size, 3]``: the background alone. ``phase`` (0..3) is (across, shift) for
    stripes, (row, column) of the dots' cell for dots, as two bits."""
    base, second = (np.array(c, dtype=np.uint8) for c in BACKGROUND_COLOURS[colour])
    ys, xs = np.mgrid[0:size, 0:size]
    high, low = divmod(phase, 2)
    if pattern == "plain":
        marked = np.zeros((size, size), dtype=bool)
    elif pattern == "striped":
        along = ys if high else xs
        marked = (along // (STRIPE_PERIOD // 2) + low) % 2 == 1
    elif pattern == "dotted":
        cell = DOT_PERIOD // 2
        dx = (xs - low * cell) % DOT_PERIOD - cell / 2 + 0.5  # centred in the chosen 8 px cell of each period
        dy = (ys - high * cell) % DOT_PERIOD - cell / 2 + 0.5
        marked = dx**2 + dy**2 <= DOT_RADIUS**2
    else:
        raise ValueError(f"unknown pattern {pattern!r}")
    return np.where(marked[..., None], second, base)


def render(scene: Scene) -> tuple[np.ndarray, list[np.ndarray]]:
    """The picture (uint8 ``[H, W, 3]``) and each object's mask (bool ``[H, W]``), in scene order."""
    image = background_image(scene.background, scene.pattern, scene.phase)
    masks = [object_mask(o) for o in scene.objects]
    for obj, mask in zip(scene.objects, masks):
        image[mask] = OBJECT_COLOURS[obj.colour]
    return image, masks


# --- reading generated pictures ------------------------------------------------------------------

_PALETTE_NAMES = list(OBJECT_COLOURS) + [f"{b}:{i}" for b in BACKGROUND_COLOURS for i in (0, 1)]
_PALETTE = np.array(list(OBJECT_COLOURS.values()) + [c for pair in BACKGROUND_COLOURS.values() for c in pair], dtype=np.float32)
UNKNOWN = -1


def palette_labels(image: np.ndarray) -> np.ndarray:
    """int ``[H, W]``: each pixel's nearest palette colour (index into the palette), or UNKNOWN."""
    distances = np.linalg.norm(image[..., None, :].astype(np.float32) - _PALETTE, axis=-1)
    labels = distances.argmin(axis=-1)
    return np.where(distances.min(axis=-1) <= MAX_COLOUR_DISTANCE, labels, UNKNOWN)


@dataclass(frozen=True)
class FoundObject:
    colour: str
    shape: str
    mask: np.ndarray  # bool [H, W]
    centre: tuple[float, float]  # (x, y)

    @property
    def place(self) -> tuple[int, int]:
        return place_of(self.centre)


def place_of(centre: tuple[float, float]) -> tuple[int, int]:
    x, y = centre
    return min(int(y // CELL), 2), min(int(x // CELL), 2)


def classify_shape(mask: np.ndarray) -> str:
    """The shape whose outline, drawn with the region's area and centred on its bounding box, covers
    the region best (IoU): robust to ragged edges, where a threshold on one measure is not."""
    ys, xs = np.nonzero(mask)
    centre = (int(round((xs.min() + xs.max()) / 2)), int(round((ys.min() + ys.max()) / 2)))
    area = float(mask.sum())
    radius = {"circle": (area / np.pi) ** 0.5, "square": area**0.5 / 2 / 0.88, "triangle": (area / 2) ** 0.5}

    def outline(shape: str) -> np.ndarray:
        return object_mask(SceneObject(shape, "red", "small", (0, 0), centre), mask.shape[0], radius[shape])

    return max(SHAPES, key=lambda shape: iou(outline(shape), mask))


def find_objects(image: np.ndarray, labels: np.ndarray | None = None) -> list[FoundObject]:
    """Every region of one object colour at least MIN_OBJECT_AREA large (holes filled), largest first."""
    labels = palette_labels(image) if labels is None else labels
    found = []
    for index, colour in enumerate(OBJECT_COLOURS):
        regions, count = ndimage.label(labels == index)
        for region in range(1, count + 1):
            mask = ndimage.binary_fill_holes(regions == region)
            if mask.sum() >= MIN_OBJECT_AREA:
                ys, xs = np.nonzero(mask)
                found.append(FoundObject(colour, classify_shape(mask), mask, (float(xs.mean()), float(ys.mean()))))
    return sorted(found, key=lambda o: -int(o.mask.sum()))


def read_background(image: np.ndarray, labels: np.ndarray | None = None) -> tuple[str | None, str | None]:
    """(colour, pattern) of the background: the most common background colour among the pixels of
    background colours, and its pattern from where its second colour lies."""
    labels = palette_labels(image) if labels is None else labels
    first = len(OBJECT_COLOURS)
    counts = [(int((labels == first + 2 * i).sum() + (labels == first + 2 * i + 1).sum()), name) for i, name in enumerate(BACKGROUND_COLOURS)]
    total, colour = max(counts)
    if total == 0:
        return None, None
    i = list(BACKGROUND_COLOURS).index(colour)
    ours = (labels == first + 2 * i) | (labels == first + 2 * i + 1)
    marked = labels == first + 2 * i + 1
    share = marked.sum() / ours.sum()
    if share < PATTERN_MIN_SHARE:
        return colour, "plain"
    spread = max((marked.sum(axis=axis) / np.maximum(ours.sum(axis=axis), 1)).std() for axis in (0, 1))  # stripes down, across
    return colour, "striped" if spread >= STRIPED_MIN_SPREAD else "dotted"


def best_match(found: list[FoundObject], obj: SceneObject) -> FoundObject | None:
    """The found object of ``obj``'s colour nearest to where ``obj`` should be, if any."""
    same = [f for f in found if f.colour == obj.colour]
    if not same:
        return None
    return min(same, key=lambda f: (f.centre[0] - obj.centre[0]) ** 2 + (f.centre[1] - obj.centre[1]) ** 2)


def caption_following(image: np.ndarray, scene: Scene) -> dict[str, float]:
    """How well a picture generated from ``caption(scene)`` shows it, each in 0..1:
    colour (each named object colour is there), shape and place (of those found), background
    colour and pattern."""
    labels = palette_labels(image)
    found = find_objects(image, labels)
    matches = [best_match(found, o) for o in scene.objects]
    present = [(o, m) for o, m in zip(scene.objects, matches) if m is not None]
    colour, pattern = read_background(image, labels)
    return {
        "colour": len(present) / len(scene.objects),
        "shape": float(np.mean([m.shape == o.shape for o, m in present])) if present else 0.0,
        "place": float(np.mean([m.place == o.place for o, m in present])) if present else 0.0,
        "background": float(colour == scene.background),
        "pattern": float(pattern == scene.pattern),
    }


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def psnr(a: np.ndarray, b: np.ndarray, where: np.ndarray | None = None) -> float:
    """PSNR (dB, 8-bit range) between two pictures, over the pixels ``where`` is True (all by default);
    capped at 60 dB for identical pixels."""
    difference = a.astype(np.float64) - b.astype(np.float64)
    if where is not None:
        difference = difference[where]
    mse = float(np.mean(difference**2)) if difference.size else 0.0
    return 60.0 if mse <= 1e-6 else min(60.0, 10 * np.log10(255.0**2 / mse))
