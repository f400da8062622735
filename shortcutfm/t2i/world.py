"""A procedural captioned-image world with known ground truth: the text-to-image proving ground's data.

A *scene* is a background colour and one or two objects, each in its own quadrant of a 32x32 RGB image, with a
shape, a colour and a size. Everything is drawn from a seed, so the world is unlimited and reproducible:

* :func:`render` draws a scene (anti-aliased, with a small per-image jitter of place and size) as a
  ``(3, S, S)`` float image in [0, 1];
* :func:`caption` writes it in words from one of several templates ("a small red circle at the top left
  and a large blue square at the bottom right on a white background", ...);
* :func:`parse_caption` reads a caption back into its scene (the inverse of :func:`caption` for every
  template), so a prompt file alone says what the image should show;
* :func:`is_held_out` puts a fixed tenth of all scenes (by a hash of the scene, not of its wording) out of
  training: :func:`random_scenes` with ``split="train"`` never draws them, so held-out prompts are new
  combinations of known words.

Pure numpy; no torch, no diffusers.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import numpy as np

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (0.9, 0.12, 0.1), "green": (0.1, 0.75, 0.2), "blue": (0.15, 0.3, 0.95), "yellow": (0.95, 0.85, 0.1)}
SIZES = {"small": 0.27, "large": 0.42}  # object half-extent as a fraction of the quadrant's side
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
BACKGROUNDS = {"black": (0.05, 0.05, 0.05), "gray": (0.5, 0.5, 0.5), "white": (0.95, 0.95, 0.95)}
#: the per-object attributes a caption states (the background is the scene's)
OBJECT_ATTRIBUTES = ("shape", "colour", "size", "position")
IMAGE_SIZE = 32
HELD_OUT_EVERY = 10  # one scene in ten is held out
TWO_OBJECT_PROBABILITY = 0.5
SUPERSAMPLE = 4
JITTER = 0.12  # largest centre jitter as a fraction of the quadrant side (less where the object would leave it)

TEMPLATES = (
    "{objects} on a {background} background",
    "a {background} background with {objects}",
    "{objects}, {background} background",
)
OBJECT_TEMPLATE = "a {size} {colour} {shape} at the {position}"


@dataclass(frozen=True, order=True)
class WorldObject:
    position: str
    shape: str
    colour: str
    size: str

    def __post_init__(self) -> None:
        for name, value, allowed in (("position", self.position, POSITIONS), ("shape", self.shape, SHAPES),
                                     ("colour", self.colour, tuple(COLOURS)), ("size", self.size, tuple(SIZES))):
            if value not in allowed:
                raise ValueError(f"object {name} {value!r} is not one of {list(allowed)}")


@dataclass(frozen=True)
class Scene:
    """A background and one or two objects in distinct quadrants (kept sorted by position)."""

    background: str
    objects: tuple[WorldObject, ...]

    def __post_init__(self) -> None:
        if self.background not in BACKGROUNDS:
            raise ValueError(f"background {self.background!r} is not one of {list(BACKGROUNDS)}")
        if not 1 <= len(self.objects) <= 2:
            raise ValueError(f"a scene holds one or two objects, got {len(self.objects)}")
        if len({o.position for o in self.objects}) != len(self.objects):
            raise ValueError("two objects of a scene share a quadrant")
        object.__setattr__(self, "objects", tuple(sorted(self.objects, key=lambda o: POSITIONS.index(o.position))))

    def key(self) -> str:
        """Canonical text of the scene (independent of the caption template)."""
        parts = [self.background] + [f"{o.position}:{o.shape}:{o.colour}:{o.size}" for o in self.objects]
        return "|".join(parts)

    def object_at(self, position: str) -> WorldObject | None:
        return next((o for o in self.objects if o.position == position), None)


def is_held_out(scene: Scene) -> bool:
    """Whether ``scene`` belongs to the held-out tenth (a hash of :meth:`Scene.key`; fixed for all time)."""
    digest = hashlib.sha256(scene.key().encode()).digest()
    return int.from_bytes(digest[:4], "little") % HELD_OUT_EVERY == 0


def _random_scene(rng: np.random.Generator) -> Scene:
    count = 2 if rng.random() < TWO_OBJECT_PROBABILITY else 1
    positions = rng.choice(len(POSITIONS), size=count, replace=False)
    objects = tuple(
        WorldObject(POSITIONS[p], SHAPES[rng.integers(len(SHAPES))], tuple(COLOURS)[rng.integers(len(COLOURS))],
                    tuple(SIZES)[rng.integers(len(SIZES))])
        for p in positions
    )
    return Scene(tuple(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))], objects)


def random_scenes(count: int, seed: int, split: str = "train") -> list[Scene]:
    """``count`` scenes drawn from ``seed``: only training scenes (``split="train"``), only held-out ones
    (``"heldout"``) or any (``"all"``)."""
    if split not in ("train", "heldout", "all"):
        raise ValueError(f'split must be "train", "heldout" or "all", got {split!r}')
    rng = np.random.default_rng(seed)
    scenes: list[Scene] = []
    while len(scenes) < count:
        scene = _random_scene(rng)
        if split == "all" or (split == "heldout") == is_held_out(scene):
            scenes.append(scene)
    return scenes


def caption(scene: Scene, template: int = 0) -> str:
    """The scene in words, with template ``template`` (0 .. len(TEMPLATES) - 1)."""
    objects = " and ".join(OBJECT_TEMPLATE.format(**o.__dict__) for o in scene.objects)
    return TEMPLATES[template % len(TEMPLATES)].format(objects=objects, background=scene.background)


_WORD = lambda options: "|".join(re.escape(o) for o in options)  # noqa: E731
_OBJECT_RE = re.compile(
    rf"a ({_WORD(SIZES)}) ({_WORD(COLOURS)}) ({_WORD(SHAPES)}) at the ({_WORD(POSITIONS)})"
)
_BACKGROUND_RE = re.compile(rf"\b({_WORD(BACKGROUNDS)}) background\b")


def parse_caption(text: str) -> Scene:
    """The scene a caption of this world describes (ValueError naming the caption if it is not one)."""
    objects = tuple(WorldObject(position, shape, colour, size) for size, colour, shape, position in _OBJECT_RE.findall(text))
    backgrounds = _BACKGROUND_RE.findall(text)
    if not objects or len(backgrounds) != 1:
        raise ValueError(f"caption {text!r} does not describe a scene of the t2i world (see shortcutfm.t2i.world)")
    return Scene(backgrounds[0], objects)


def vocabulary() -> list[str]:
    """Every word the captions use (for word-level tokenizers)."""
    words: set[str] = set()
    for text in list(TEMPLATES) + [OBJECT_TEMPLATE, " and "]:
        words.update(re.sub(r"\{\w+\}", " ", text).replace(",", " , ").split())
    for options in (SHAPES, COLOURS, SIZES, POSITIONS, BACKGROUNDS):
        for option in options:
            words.update(option.split())
    return sorted(words)


def _shape_mask(shape: str, xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, half: float) -> np.ndarray:
    dx, dy = xx - cx, yy - cy
    if shape == "circle":
        return dx * dx + dy * dy <= half * half
    if shape == "square":
        side = half * 0.88  # the same area-ish as the circle
        return (np.abs(dx) <= side) & (np.abs(dy) <= side)
    # an upward triangle: apex at the top, base at the bottom
    top, bottom = cy - half, cy + half * 0.8
    inside_y = (yy >= top) & (yy <= bottom)
    width_at = (yy - top) / (bottom - top) * half * 1.05
    return inside_y & (np.abs(dx) <= width_at)


def render(scene: Scene, rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
    """The scene as a ``(3, size, size)`` float32 image in [0, 1]; ``rng`` draws the jitter of each object."""
    fine = size * SUPERSAMPLE
    coords = (np.arange(fine) + 0.5) / SUPERSAMPLE
    xx, yy = np.meshgrid(coords, coords)
    image = np.empty((fine, fine, 3), dtype=np.float32)
    image[:] = BACKGROUNDS[scene.background]
    quadrant = size / 2
    for obj in scene.objects:
        row, col = divmod(POSITIONS.index(obj.position), 2)
        half = SIZES[obj.size] * quadrant * rng.uniform(0.92, 1.08)
        room = max(0.0, min(JITTER * quadrant, quadrant / 2 - half - 0.5))  # the object stays in its quadrant
        cx = (col + 0.5) * quadrant + rng.uniform(-room, room)
        cy = (row + 0.5) * quadrant + rng.uniform(-room, room)
        image[_shape_mask(obj.shape, xx, yy, cx, cy, half)] = COLOURS[obj.colour]
    pooled = image.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE, 3).mean(axis=(1, 3))
    return np.ascontiguousarray(pooled.transpose(2, 0, 1))


def render_many(scenes: list[Scene], seed: int, size: int = IMAGE_SIZE) -> np.ndarray:
    """``(N, 3, size, size)`` images of ``scenes``, the jitter drawn from ``seed``."""
    rng = np.random.default_rng(seed)
    return np.stack([render(scene, rng, size) for scene in scenes]) if scenes else np.zeros((0, 3, size, size), np.float32)


def captions_for(scenes: list[Scene], seed: int) -> list[str]:
    """One caption per scene, the template drawn from ``seed``."""
    rng = np.random.default_rng(seed)
    return [caption(scene, int(rng.integers(len(TEMPLATES)))) for scene in scenes]


def write_image_folder(folder, scenes: list[Scene], seed: int) -> list[str]:
    """Write ``scenes`` as ``NNNNNN.png`` images with same-stem ``.txt`` captions (what ``prepare --images``
    reads); returns the captions. Needs Pillow."""
    from pathlib import Path

    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    images = render_many(scenes, seed)
    texts = captions_for(scenes, seed + 1)
    for index, (image, text) in enumerate(zip(images, texts)):
        pixels = np.clip(np.rint(image.transpose(1, 2, 0) * 255), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{index:06d}.png")
        (folder / f"{index:06d}.txt").write_text(text + "\n")
    return texts
