"""Embedded default data: procedurally generated image-caption scenes (no download, no files).

A scene holds one or two flat shapes on a dark, slightly noisy background. Every object has four
attributes -- shape x colour x size x position on a 3x3 grid -- and the caption names them with
varied wording (several templates, synonyms, optional attributes), so captions are mostly unique and
matching images to captions is a real contrastive problem. Images are rendered with PIL at a native
resolution (default 64 px); the model's transform resizes them, so a low-resolution training phase
(RECLIP) really loses detail.

Every sample is a pure function of `(seed, split, index)`: its generator is
`numpy.random.default_rng([seed, split_id, index])`, so datasets need no storage, any worker can
produce any sample, and the train and validation splits are disjoint by construction (different
`split_id` streams).

Besides the training scenes this module builds the matching evaluation data:
* four zero-shot classification tasks (shape, colour, size, position), one object per image with the
  other attributes random and labels balanced (`synthetic_zeroshot_tasks`);
* a held-out retrieval split of captioned scenes (`synthetic_retrieval_split`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from amorlip.data.types import RetrievalSplit, ZeroShotTask

# ----------------------------------------------------------------------------------------------------
# Attribute vocabulary. The first word of each synonym list is the canonical name (used by zero-shot).
# ----------------------------------------------------------------------------------------------------

SHAPES: list[str] = ["circle", "square", "triangle", "star", "cross", "diamond"]
SHAPE_WORDS: dict[str, list[str]] = {
    "circle": ["circle", "disc", "round dot"],
    "square": ["square", "block"],
    "triangle": ["triangle"],
    "star": ["star", "five-pointed star"],
    "cross": ["cross", "plus sign"],
    "diamond": ["diamond", "rhombus"],
}

COLORS: list[str] = ["red", "green", "blue", "yellow"]
COLOR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (225, 35, 35),
    "green": (40, 185, 55),
    "blue": (45, 85, 235),
    "yellow": (240, 225, 40),
    "purple": (150, 55, 205),
    "orange": (250, 140, 15),
    "white": (245, 245, 245),
    "cyan": (40, 215, 225),
}
COLOR_WORDS: dict[str, list[str]] = {
    "red": ["red", "crimson"],
    "green": ["green"],
    "blue": ["blue"],
    "yellow": ["yellow"],
    "purple": ["purple", "violet"],
    "orange": ["orange"],
    "white": ["white"],
    "cyan": ["cyan", "turquoise"],
}

SIZES: list[str] = ["small", "medium", "large"]
SIZE_HALF_EXTENT: dict[str, float] = {"small": 0.12, "medium": 0.18, "large": 0.25}
"""Half-width of an object as a fraction of the canvas (ratios 1.5 and 1.39: distinct even at 32 px, where a
small object is still ~8 px wide)."""
SIZE_WORDS: dict[str, list[str]] = {
    "small": ["small", "little", "tiny"],
    "medium": ["medium", "medium-sized", "mid-sized"],
    "large": ["large", "big", "huge"],
}

POSITIONS: list[str] = [
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
]
"""3x3 grid, row-major: position p sits in row p // 3, column p % 3."""
_CELL_CENTER = (0.25, 0.5, 0.75)
_POS_PHRASES: dict[str, list[str]] = {
    # canonical "in the {position}" first: the zero-shot prompts use it ("a shape in the {}.")
    "top left": ["in the top left", "at the top left", "in the upper left corner"],
    "top": ["in the top", "at the top", "in the top middle"],
    "top right": ["in the top right", "at the top right", "in the upper right corner"],
    "left": ["in the left", "on the left", "at the left side"],
    "center": ["in the center", "in the middle", "at the centre"],
    "right": ["in the right", "on the right", "at the right side"],
    "bottom left": ["in the bottom left", "at the bottom left", "in the lower left corner"],
    "bottom": ["in the bottom", "at the bottom", "in the bottom middle"],
    "bottom right": ["in the bottom right", "at the bottom right", "in the lower right corner"],
}
for _p in POSITIONS:
    _POS_PHRASES[_p].append(f"in the {_p} part of the image")

SPLIT_IDS: dict[str, int] = {"train": 0, "val": 1}
_ZEROSHOT_SPLIT_BASE = 100  # zero-shot task t draws from split id 100 + t

ZEROSHOT_TEMPLATES: dict[str, list[str]] = {
    "shape": ["a {}.", "a photo of a {}.", "a picture of a {}.", "a drawing of a {}.", "there is a {}."],
    "colour": ["a {} shape.", "a {} object.", "a photo of a {} shape.", "something {}.", "a drawing of a {} thing."],
    "size": ["a {} shape.", "a {} object.", "a photo of a {} shape.", "a drawing of a {} thing."],
    "position": [
        "a shape in the {}.",
        "an object in the {}.",
        "a photo of a shape in the {}.",
        "a shape in the {} part of the image.",
    ],
}
ZEROSHOT_CLASSES: dict[str, list[str]] = {"shape": SHAPES, "colour": COLORS, "size": SIZES, "position": POSITIONS}
ZEROSHOT_TASK_NAMES: list[str] = list(ZEROSHOT_CLASSES)


@dataclass(frozen=True)
class SceneObject:
    """One object of a scene, as attribute indices into SHAPES / COLORS / SIZES / POSITIONS."""

    shape: int
    color: int
    size: int
    position: int


# ----------------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------------


def _star(n_points: int, inner: float) -> np.ndarray:
    ang = -np.pi / 2 + np.arange(2 * n_points) * np.pi / n_points
    rad = np.where(np.arange(2 * n_points) % 2 == 0, 1.0, inner)
    return np.stack([rad * np.cos(ang), rad * np.sin(ang)], axis=1)


_POLYGONS: dict[str, np.ndarray] = {
    # unit outlines (x right, y down) inside [-1, 1]^2
    "square": np.array([[-0.85, -0.85], [0.85, -0.85], [0.85, 0.85], [-0.85, 0.85]]),
    "triangle": np.array([[0.0, -1.0], [1.0, 0.8], [-1.0, 0.8]]),
    "star": _star(5, 0.45),
    "cross": np.array(
        [[-0.3, -1], [0.3, -1], [0.3, -0.3], [1, -0.3], [1, 0.3], [0.3, 0.3],
         [0.3, 1], [-0.3, 1], [-0.3, 0.3], [-1, 0.3], [-1, -0.3], [-0.3, -0.3]]
    ),
    "diamond": np.array([[0.0, -1.0], [0.7, 0.0], [0.0, 1.0], [-0.7, 0.0]]),
}


def _draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject, rng: np.random.Generator, size: int) -> None:
    """Draw one object; position, size, rotation and colour get a small random jitter."""
    row, col = divmod(obj.position, 3)
    cx = (_CELL_CENTER[col] + rng.uniform(-0.03, 0.03)) * size
    cy = (_CELL_CENTER[row] + rng.uniform(-0.03, 0.03)) * size
    r = SIZE_HALF_EXTENT[SIZES[obj.size]] * rng.uniform(0.94, 1.06) * size
    jitter = rng.integers(-15, 16, size=3).tolist()
    fill = tuple(min(255, max(0, c + j)) for c, j in zip(COLOR_RGB[COLORS[obj.color]], jitter))
    shape = SHAPES[obj.shape]
    theta = rng.uniform(-0.14, 0.14)  # up to ~8 degrees: a square never turns into a diamond
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        return
    c, s = np.cos(theta), np.sin(theta)
    pts = _POLYGONS[shape] @ np.array([[c, s], [-s, c]]) * r + np.array([cx, cy])
    draw.polygon([tuple(p) for p in pts.tolist()], fill=fill)


def render_scene(objects: Sequence[SceneObject], rng: np.random.Generator, size: int = 64) -> Image.Image:
    """Render `objects` on a dark noisy background of random tint (RGB, `size` x `size`)."""
    base = rng.integers(2, 62, size=3, dtype=np.uint8)  # background tint in [10, 70) +- 8 noise, no clipping
    noise = rng.integers(0, 17, size=(size, size, 1), dtype=np.uint8)
    img = Image.fromarray(noise + base, "RGB")
    draw = ImageDraw.Draw(img)
    for obj in objects:
        _draw_object(draw, obj, rng, size)
    return img


# ----------------------------------------------------------------------------------------------------
# Captions
# ----------------------------------------------------------------------------------------------------


def _pick(rng: np.random.Generator, words: Sequence[str], p_canonical: float = 0.7) -> str:
    """The canonical word (first) with probability p_canonical, else a uniformly chosen synonym."""
    if len(words) == 1 or rng.random() < p_canonical:
        return words[0]
    return words[int(rng.integers(1, len(words)))]


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def _with_article(phrase: str) -> str:
    return f"{_article(phrase)} {phrase}"


def _object_words(obj: SceneObject, rng: np.random.Generator) -> dict[str, str]:
    return {
        "shape": _pick(rng, SHAPE_WORDS[SHAPES[obj.shape]]),
        "color": _pick(rng, COLOR_WORDS[COLORS[obj.color]]),
        "size": _pick(rng, SIZE_WORDS[SIZES[obj.size]]),
        "pos": _pick(rng, _POS_PHRASES[POSITIONS[obj.position]], p_canonical=0.75),
    }


def _noun_phrase(w: dict[str, str], rng: np.random.Generator) -> str:
    """'a small red circle'; 'a red circle' (size left out, 12%) or 'a small circle' (colour left out, 12%).

    Leaving one attribute out now and then teaches the text side to represent each attribute on its own,
    which is what single-attribute zero-shot prompts ask of it.
    """
    u = rng.random()
    adjectives = [w["color"]] if u < 0.12 else [w["size"]] if u < 0.24 else [w["size"], w["color"]]
    return _with_article(" ".join([*adjectives, w["shape"]]))


def _single_caption(obj: SceneObject, rng: np.random.Generator) -> str:
    w = _object_words(obj, rng)
    pos = "" if rng.random() < 0.1 else " " + w["pos"]
    t = int(rng.integers(0, 11))
    np_ = _noun_phrase(w, rng)
    if t == 0:
        return f"{np_}{pos}"
    if t == 1:
        return f"a photo of {np_}{pos}"
    if t == 2:
        return f"an image of {np_}{pos}"
    if t == 3:
        return f"{w['pos']}, {np_}"
    if t == 4:
        return f"there is {np_}{pos}"
    if t == 5:
        return f"{np_} sitting{pos}" if pos else f"{np_} on a dark background"
    if t == 6:
        return f"a drawing of {np_}{pos}"
    if t == 7:
        return f"{_with_article(w['shape'])} that is {w['color']} and {w['size']},{pos}".rstrip(",")
    if t == 8:
        return f"{_with_article(w['size'] + ' ' + w['shape'])} coloured {w['color']}{pos}"
    if t == 9:
        return f"{np_} on a dark background{pos}"
    return f"a simple picture: {np_}{pos}"


def _pair_caption(a: SceneObject, b: SceneObject, rng: np.random.Generator) -> str:
    wa, wb = _object_words(a, rng), _object_words(b, rng)
    na, nb = _noun_phrase(wa, rng), _noun_phrase(wb, rng)
    t = int(rng.integers(0, 5))
    if t == 0:
        return f"{na} {wa['pos']} and {nb} {wb['pos']}"
    if t == 1:
        return f"two shapes: {na} {wa['pos']} and {nb} {wb['pos']}"
    if t == 2:
        return f"{na} {wa['pos']}, with {nb} {wb['pos']}"
    if t == 3:
        return f"a photo of {na} {wa['pos']} next to {nb} {wb['pos']}"
    return f"{wa['pos']} {na}, {wb['pos']} {nb}"


# ----------------------------------------------------------------------------------------------------
# Scenes
# ----------------------------------------------------------------------------------------------------


def _random_object(rng: np.random.Generator, position: int | None = None) -> SceneObject:
    return SceneObject(
        shape=int(rng.integers(len(SHAPES))),
        color=int(rng.integers(len(COLORS))),
        size=int(rng.integers(len(SIZES))),
        position=int(rng.integers(len(POSITIONS))) if position is None else position,
    )


def _far_cells(p: int) -> list[int]:
    """Cells at Chebyshev distance 2 from p (two objects there never overlap, whatever their sizes)."""
    r, c = divmod(p, 3)
    return [q for q in range(9) if max(abs(q // 3 - r), abs(q % 3 - c)) == 2]


def sample_scene(rng: np.random.Generator, p_two: float = 0.25) -> list[SceneObject]:
    """One object, or (with probability p_two) two objects in far-apart grid cells (never overlapping)."""
    first = _random_object(rng)
    far = _far_cells(first.position)
    if not far or rng.random() >= p_two:
        return [first]
    second = _random_object(rng, position=far[int(rng.integers(len(far)))])
    return [first, second]


def scene_caption(objects: Sequence[SceneObject], rng: np.random.Generator) -> str:
    if len(objects) == 1:
        return _single_caption(objects[0], rng)
    return _pair_caption(objects[0], objects[1], rng)


def _rng(seed: int, split_id: int, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, split_id, index])


class SyntheticScenes(Dataset):
    """Map-style image-caption dataset: `ds[i] -> (PIL.Image RGB, caption)`, a pure function of (seed, split, i).

    `split` is "train" or "val" (disjoint sample streams). `objects(i)` gives the scene's attributes.
    """

    def __init__(self, size: int, seed: int = 0, split: str = "train", render_size: int = 64, p_two: float = 0.25):
        if split not in SPLIT_IDS:
            raise ValueError(f"split must be one of {list(SPLIT_IDS)}, got {split!r}")
        if size < 1:
            raise ValueError(f"size must be positive, got {size}")
        self.size, self.seed, self.split, self.render_size, self.p_two = size, seed, split, render_size, p_two
        self._split_id = SPLIT_IDS[split]

    def __len__(self) -> int:
        return self.size

    def _generate(self, index: int) -> tuple[list[SceneObject], str, np.random.Generator]:
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.size} samples")
        rng = _rng(self.seed, self._split_id, index)
        objects = sample_scene(rng, self.p_two)
        caption = scene_caption(objects, rng)
        return objects, caption, rng

    def objects(self, index: int) -> list[SceneObject]:
        return self._generate(index)[0]

    def caption(self, index: int) -> str:
        """The caption alone (no rendering)."""
        return self._generate(index)[1]

    def __getitem__(self, index: int) -> tuple[Image.Image, str]:
        objects, caption, rng = self._generate(int(index))
        return render_scene(objects, rng, self.render_size), caption


class SyntheticAttributeTask(Dataset):
    """Zero-shot items `(PIL.Image, label)`: one object whose attribute `task` is class `i % n_classes`
    (balanced labels), all other attributes random."""

    def __init__(self, task: str, n: int, seed: int = 0, render_size: int = 64):
        if task not in ZEROSHOT_CLASSES:
            raise ValueError(f"unknown synthetic task {task!r}; choose one of {ZEROSHOT_TASK_NAMES}")
        self.task, self.n, self.seed, self.render_size = task, n, seed, render_size
        self.n_classes = len(ZEROSHOT_CLASSES[task])
        self._split_id = _ZEROSHOT_SPLIT_BASE + ZEROSHOT_TASK_NAMES.index(task)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        index = int(index)
        if not 0 <= index < self.n:
            raise IndexError(f"index {index} out of range for {self.n} items")
        rng = _rng(self.seed, self._split_id, index)
        label = index % self.n_classes
        obj = _random_object(rng)
        field = {"shape": "shape", "colour": "color", "size": "size", "position": "position"}[self.task]
        obj = SceneObject(**{**obj.__dict__, field: label})
        return render_scene([obj], rng, self.render_size), label


def synthetic_zeroshot_tasks(n_per_task: int, seed: int = 0, render_size: int = 64) -> list[ZeroShotTask]:
    """The four attribute tasks (shape, colour, size, position) with `n_per_task` balanced items each."""
    return [
        ZeroShotTask(
            name=f"synthetic-{name}",
            classnames=list(ZEROSHOT_CLASSES[name]),
            templates=list(ZEROSHOT_TEMPLATES[name]),
            dataset=SyntheticAttributeTask(name, n_per_task, seed, render_size),
        )
        for name in ZEROSHOT_TASK_NAMES
    ]


def synthetic_retrieval_split(n: int, seed: int = 0, render_size: int = 64) -> RetrievalSplit:
    """`n` held-out captioned scenes (split "val": disjoint from the training stream by construction)."""
    return RetrievalSplit(name="synthetic-val", dataset=SyntheticScenes(n, seed=seed, split="val", render_size=render_size))


# ----------------------------------------------------------------------------------------------------
# The `synthetic` data source (`amorlip.data.sources`)


def train_stream(cfg: Any, batch_size: int, seed: int, rank: int = 0, world_size: int = 1, pin_memory: bool = False,
                 needs_indices: bool = True) -> Any:
    """The training stream of `data.source synthetic` (`cfg` a `DataConfig`): `data.dataset_size` scenes, else
    `data.synthetic_size`, indexed by row."""
    from amorlip.data.mapstyle import map_stream

    size = cfg.dataset_size or cfg.synthetic_size
    render = int(getattr(cfg, "synthetic_render_size", 64))
    dataset = SyntheticScenes(size, seed=seed, split="train", render_size=render)
    return map_stream(dataset, cfg, batch_size, seed, rank, world_size, name="synthetic", pin_memory=pin_memory)


def synthetic_eval_data(cfg: Any, seed: int) -> tuple[list[ZeroShotTask], RetrievalSplit]:
    """The synthetic attribute tasks and held-out retrieval split (usable whatever the training source)."""
    render = int(getattr(cfg, "synthetic_render_size", 64))
    return (synthetic_zeroshot_tasks(cfg.eval_size, seed, render),
            synthetic_retrieval_split(cfg.val_size, seed, render))
