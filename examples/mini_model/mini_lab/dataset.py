"""A procedural text-to-image dataset: coloured shapes on simple backgrounds, rendered at any size.

A :class:`Scene` is a background plus 1-3 objects. Every fact a caption states is measurable
(see :mod:`mini_lab.adherence`), and positions and sizes are relative to the image, so the
same scene renders the same picture at 64 px, 512 px or a non-square size.

Caption grammar (lower case, one canonical caption per scene)::

    caption    := objects " on a " background " background"
    objects    := obj | obj " and " obj | obj ", " obj " and " obj
    obj        := "a " size " " color " " shape " " place
    size       := "small" | "large"
    place      := "at the top left" | "at the top" | "at the top right" | "on the left"
                | "in the center" | "on the right" | "at the bottom left" | "at the bottom"
                | "at the bottom right"
    background := "plain " color
                | color " to " color " " orientation " gradient"
                | color " and " color " " orientation " striped"
                | color " and " color " checkered"
    orientation:= "horizontal" | "vertical"

Example: ``"a small red circle at the top left and a large blue square in the center on a
yellow and black vertical striped background"``.

Orientation words: a *vertical* gradient changes from top (first colour) to bottom (second); a
*horizontal* one from left to right. *Horizontal* stripes are horizontal bands stacked from top to
bottom; *vertical* stripes are vertical bands side by side. Stripes and checks have
``BANDS`` bands per image side, starting with the first colour at the top left.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, replace

import numpy as np

# Palette: chosen far apart in RGB (closest pair ~144) so colours survive the blur of a small VAE.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "yellow": (245, 225, 40),
    "green": (30, 160, 50),
    "cyan": (40, 210, 230),
    "blue": (30, 60, 210),
    "pink": (240, 90, 210),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
BASIC_SHAPES = ("circle", "square", "triangle")
# Side of the shape's (square) bounding box as a fraction of min(height, width).
SIZES: dict[str, float] = {"small": 0.15, "large": 0.26}
SIZE_JITTER = 0.08  # rendered side = nominal side * uniform(1 - SIZE_JITTER, 1 + SIZE_JITTER)
# 3 x 3 grid, row-major: index // 3 is the row, index % 3 the column.
POSITIONS = (
    "top left",
    "top",
    "top right",
    "left",
    "center",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
)
PLACE_PHRASES: dict[str, str] = {
    "top left": "at the top left",
    "top": "at the top",
    "top right": "at the top right",
    "left": "on the left",
    "center": "in the center",
    "right": "on the right",
    "bottom left": "at the bottom left",
    "bottom": "at the bottom",
    "bottom right": "at the bottom right",
}
BACKGROUNDS = ("plain", "gradient", "stripes", "checks")
ORIENTATIONS = ("horizontal", "vertical")
BANDS = 6  # stripes / checks per image side
MAX_OBJECTS = 3
CELL_MARGIN = 0.02  # gap (fraction of min(H, W)) kept between an object and its cell's border
# An object colour must stay this far (RGB distance) from every blend of the background colours,
# so blurred background edges and gradients never look like an object.
MIN_OBJECT_BG_DISTANCE = 100.0


def _rgb(name: str) -> np.ndarray:
    return np.asarray(COLORS[name], dtype=np.float32)


def segment_distance(color: str, a: str, b: str) -> float:
    """RGB distance from ``color`` to the segment of blends between colours ``a`` and ``b``."""
    c, ca, cb = _rgb(color), _rgb(a), _rgb(b)
    ab = cb - ca
    t = float(np.clip(np.dot(c - ca, ab) / max(float(np.dot(ab, ab)), 1e-6), 0.0, 1.0))
    return float(np.linalg.norm(c - (ca + t * ab)))


@dataclass(frozen=True)
class SceneObject:
    """One shape. ``dx``/``dy``: offset of its centre from the cell centre and ``scale``: factor on
    the nominal size, both chosen by :func:`sample_scene` (0, 0, 1 for scenes parsed from text)."""

    shape: str
    color: str
    size: str
    position: str
    dx: float = 0.0
    dy: float = 0.0
    scale: float = 1.0

    def __post_init__(self):
        _check("shape", self.shape, SHAPES)
        _check("color", self.color, COLORS)
        _check("size", self.size, SIZES)
        _check("position", self.position, POSITIONS)

    @property
    def cell(self) -> tuple[int, int]:
        """(row, column) of the object's grid cell."""
        return divmod(POSITIONS.index(self.position), 3)

    def phrase(self) -> str:
        return f"a {self.size} {self.color} {self.shape} {PLACE_PHRASES[self.position]}"


@dataclass(frozen=True)
class Scene:
    """A background (``kind`` in BACKGROUNDS, its colours, an orientation for gradient/stripes)
    and 1..MAX_OBJECTS objects in distinct cells with distinct colours, none a background colour."""

    background: str
    bg_colors: tuple[str, ...]
    objects: tuple[SceneObject, ...]
    orientation: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "bg_colors", tuple(self.bg_colors))
        object.__setattr__(self, "objects", tuple(self.objects))
        _check("background", self.background, BACKGROUNDS)
        for c in self.bg_colors:
            _check("background color", c, COLORS)
        n_colors = 1 if self.background == "plain" else 2
        if len(self.bg_colors) != n_colors:
            raise ValueError(
                f"a {self.background!r} background needs {n_colors} colour(s), got {list(self.bg_colors)}"
            )
        if n_colors == 2 and self.bg_colors[0] == self.bg_colors[1]:
            raise ValueError(f"the two background colours must differ, got {list(self.bg_colors)}")
        if self.background in ("gradient", "stripes"):
            _check("orientation", self.orientation, ORIENTATIONS)
        elif self.orientation is not None:
            raise ValueError(
                f"a {self.background!r} background takes no orientation, got {self.orientation!r}"
            )
        if not 1 <= len(self.objects) <= MAX_OBJECTS:
            raise ValueError(f"a scene has 1..{MAX_OBJECTS} objects, got {len(self.objects)}")
        positions = [o.position for o in self.objects]
        colors = [o.color for o in self.objects]
        if len(set(positions)) != len(positions):
            raise ValueError(f"objects must be in distinct cells, got positions {positions}")
        if len(set(colors)) != len(colors):
            raise ValueError(f"objects must have distinct colours, got {colors}")
        clash = [c for c in colors if c in self.bg_colors]
        if clash:
            raise ValueError(f"object colour(s) {clash} equal a background colour {list(self.bg_colors)}")

    def with_shapes(self, shapes) -> Scene:
        """This scene with object i drawn as ``shapes[i]``, everything else kept."""
        shapes = list(shapes)
        if len(shapes) != len(self.objects):
            raise ValueError(
                f"the scene has {len(self.objects)} object(s); got {len(shapes)} shapes: {shapes}"
            )
        objects = tuple(replace(o, shape=s) for o, s in zip(self.objects, shapes, strict=True))
        return replace(self, objects=objects)

    # -- serialization -----------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "background": self.background,
            "bg_colors": list(self.bg_colors),
            "orientation": self.orientation,
            "objects": [asdict(o) for o in self.objects],
        }

    @classmethod
    def from_dict(cls, d: dict) -> Scene:
        return cls(
            background=d["background"],
            bg_colors=tuple(d["bg_colors"]),
            orientation=d.get("orientation"),
            objects=tuple(SceneObject(**o) for o in d["objects"]),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> Scene:
        return cls.from_dict(json.loads(text))

    def caption(self) -> str:
        return caption(self)


def _check(what: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; expected one of {list(allowed)}")


# -- captions --------------------------------------------------------------------------------


def _background_phrase(scene: Scene) -> str:
    c = scene.bg_colors
    if scene.background == "plain":
        return f"plain {c[0]}"
    if scene.background == "gradient":
        return f"{c[0]} to {c[1]} {scene.orientation} gradient"
    if scene.background == "stripes":
        return f"{c[0]} and {c[1]} {scene.orientation} striped"
    return f"{c[0]} and {c[1]} checkered"


def caption(scene: Scene) -> str:
    """The canonical caption of ``scene`` (see the module docstring for the grammar)."""
    parts = [o.phrase() for o in scene.objects]
    objs = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{objs} on a {_background_phrase(scene)} background"


_COLOR_RE = "|".join(COLORS)
_PLACE_TO_POS = {v: k for k, v in PLACE_PHRASES.items()}
_OBJ_RE = re.compile(
    rf"an? (?P<size>{'|'.join(SIZES)}) (?P<color>{_COLOR_RE}) (?P<shape>{'|'.join(SHAPES)}) "
    rf"(?P<place>{'|'.join(PLACE_PHRASES.values())})"
)
_BG_RES = [
    ("plain", re.compile(rf"plain (?P<c1>{_COLOR_RE})")),
    (
        "gradient",
        re.compile(rf"(?P<c1>{_COLOR_RE}) to (?P<c2>{_COLOR_RE}) (?P<o>horizontal|vertical) gradient"),
    ),
    (
        "stripes",
        re.compile(rf"(?P<c1>{_COLOR_RE}) and (?P<c2>{_COLOR_RE}) (?P<o>horizontal|vertical) striped"),
    ),
    ("checks", re.compile(rf"(?P<c1>{_COLOR_RE}) and (?P<c2>{_COLOR_RE}) checkered")),
]


def _normalize_text(text: str) -> str:
    t = text.lower().replace("centre", "center")
    t = re.sub(r"\s+", " ", t).strip().rstrip(".").strip()
    return re.sub(r"\s*,\s*", ", ", t)


def parse_caption(text: str) -> Scene:
    """Inverse of :func:`caption`: the Scene a caption in the grammar states (no jitter).

    Case, extra spaces, a final period and "centre" are tolerated; anything else outside the
    grammar raises ``ValueError`` naming the part that did not parse.
    """
    t = _normalize_text(text)
    m = re.fullmatch(r"(?P<objs>.+) on an? (?P<bg>.+) background", t)
    if not m:
        raise ValueError(
            f"cannot parse caption {text!r}: expected '<objects> on a <background> background', "
            "e.g. 'a small red circle at the top left on a plain blue background'"
        )
    bg_text = m.group("bg")
    matches = [(kind, rx.fullmatch(bg_text)) for kind, rx in _BG_RES]
    matches = [(kind, bm) for kind, bm in matches if bm]
    if not matches:
        raise ValueError(
            f"cannot parse background {bg_text!r} in {text!r}: expected 'plain <color>', "
            "'<color> to <color> horizontal|vertical gradient', "
            "'<color> and <color> horizontal|vertical striped' or '<color> and <color> checkered'"
        )
    kind, bm = matches[0]
    gd = bm.groupdict()
    bg_colors = (gd["c1"],) if kind == "plain" else (gd["c1"], gd["c2"])
    objs = []
    for part in re.split(r", (?:and )?| and ", m.group("objs")):
        om = _OBJ_RE.fullmatch(part.strip())
        if not om:
            raise ValueError(
                f"cannot parse object {part!r} in {text!r}: expected "
                "'a <small|large> <color> <shape> <place>' with color in "
                f"{list(COLORS)}, shape in {list(SHAPES)}, place in {list(PLACE_PHRASES.values())}"
            )
        objs.append(
            SceneObject(
                shape=om["shape"], color=om["color"], size=om["size"], position=_PLACE_TO_POS[om["place"]]
            )
        )
    return Scene(background=kind, bg_colors=bg_colors, orientation=gd.get("o"), objects=tuple(objs))


def vocabulary() -> list[str]:
    """Every word (and punctuation token) a caption can contain, sorted. The shipped tokenizers fix
    their ids in ``cleardit.mini.vocab.WORDS``, which must stay equal to this (tested)."""
    words = {"a", "an", "and", "on", "background", "to", "gradient", "striped", "checkered", "plain", ","}
    words |= set(COLORS) | set(SHAPES) | set(SIZES) | set(ORIENTATIONS)
    for phrase in PLACE_PHRASES.values():
        words |= set(phrase.split())
    return sorted(words)


# -- sampling --------------------------------------------------------------------------------


def object_colors_allowed(background: str, bg_colors: tuple[str, ...]) -> list[str]:
    """Colours an object may take on this background (not a background colour, far from blends)."""
    out = []
    for c in COLORS:
        if c in bg_colors:
            continue
        if len(bg_colors) == 2 and segment_distance(c, *bg_colors) < MIN_OBJECT_BG_DISTANCE:
            continue
        out.append(c)
    return out


def _as_rng(rng_or_seed) -> np.random.Generator:
    if isinstance(rng_or_seed, np.random.Generator):
        return rng_or_seed
    return np.random.default_rng(rng_or_seed)


def sample_scene(
    rng_or_seed=None,
    *,
    shapes: tuple[str, ...] = BASIC_SHAPES,
    backgrounds: tuple[str, ...] = BACKGROUNDS,
    max_objects: int = MAX_OBJECTS,
    jitter: bool = True,
) -> Scene:
    """A random scene. ``rng_or_seed``: a ``np.random.Generator`` or anything ``default_rng`` takes.

    ``shapes`` / ``backgrounds`` restrict the choices (all of SHAPES are measurable; the default keeps
    the three easiest). ``jitter``: small random offsets and size changes that keep every object
    inside its cell.
    """
    rng = _as_rng(rng_or_seed)
    for s in shapes:
        _check("shape", s, SHAPES)
    for b in backgrounds:
        _check("background", b, BACKGROUNDS)
    if not 1 <= max_objects <= MAX_OBJECTS:
        raise ValueError(f"max_objects must be in 1..{MAX_OBJECTS}, got {max_objects}")
    names = list(COLORS)
    kind = backgrounds[int(rng.integers(len(backgrounds)))]
    n_obj = int(rng.integers(1, max_objects + 1))
    while True:  # every background leaves >= 3 allowed colours, so this ends at the first try
        if kind == "plain":
            bg = (names[int(rng.integers(len(names)))],)
        else:
            i, j = rng.choice(len(names), size=2, replace=False)
            bg = (names[int(i)], names[int(j)])
        allowed = object_colors_allowed(kind, bg)
        if len(allowed) >= n_obj:
            break
    orientation = ORIENTATIONS[int(rng.integers(2))] if kind in ("gradient", "stripes") else None
    cells = rng.choice(len(POSITIONS), size=n_obj, replace=False)
    colors = rng.choice(len(allowed), size=n_obj, replace=False)
    objects = []
    for cell, ci in zip(cells, colors, strict=True):
        shape = shapes[int(rng.integers(len(shapes)))]
        size = ("small", "large")[int(rng.integers(2))]
        dx = dy = 0.0
        scale = 1.0
        if jitter:
            scale = float(rng.uniform(1 - SIZE_JITTER, 1 + SIZE_JITTER))
            room = max(0.0, 1 / 6 - CELL_MARGIN - SIZES[size] * scale / 2)
            dx, dy = (float(v) for v in rng.uniform(-room, room, size=2))
        objects.append(
            SceneObject(
                shape=shape,
                color=allowed[int(ci)],
                size=size,
                position=POSITIONS[int(cell)],
                dx=round(dx, 5),
                dy=round(dy, 5),
                scale=round(scale, 5),
            )
        )
    return Scene(background=kind, bg_colors=bg, orientation=orientation, objects=tuple(objects))


# -- rendering -------------------------------------------------------------------------------


def shape_sdf(shape: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Signed distance (negative inside) to ``shape`` in its normalized box [-1, 1]^2, y pointing down.

    Exact inside and near the edges, which is all anti-aliasing and mask tests need. Every shape
    touches all four sides of the box, so a shape's bounding box is the box.
    """
    ax, ay = np.abs(x), np.abs(y)
    if shape == "circle":
        return np.sqrt(x * x + y * y) - 1.0
    if shape == "square":
        return np.maximum(ax, ay) - 1.0
    if shape == "triangle":  # apex at the top centre, base along the bottom
        return np.maximum(y - 1.0, (2.0 * ax - y - 1.0) / np.sqrt(5.0))
    if shape == "diamond":
        return (ax + ay - 1.0) / np.sqrt(2.0)
    if shape == "cross":  # plus sign, arms one third of the box thick
        t = 1.0 / 3.0
        return np.minimum(np.maximum(ax - t, ay - 1.0), np.maximum(ax - 1.0, ay - t))
    raise ValueError(f"unknown shape {shape!r}; expected one of {list(SHAPES)}")


def object_box(obj: SceneObject, height: int, width: int) -> tuple[float, float, float]:
    """(centre x, centre y, half side) of the object's box in pixels."""
    m = min(height, width)
    row, col = obj.cell
    cx = (col + 0.5) * width / 3 + obj.dx * m
    cy = (row + 0.5) * height / 3 + obj.dy * m
    return cx, cy, SIZES[obj.size] * obj.scale * m / 2


def _band_coverage(n: int, bands: int, sub: int = 8) -> np.ndarray:
    """Per-pixel fraction (of ``n`` pixels) covered by the even bands of ``bands`` equal bands."""
    pos = (np.arange(n)[:, None] + (np.arange(sub)[None, :] + 0.5) / sub) * (bands / n)
    return (np.floor(pos).astype(np.int64) % 2 == 0).mean(axis=1).astype(np.float32)


def render_background(scene: Scene, height: int, width: int) -> np.ndarray:
    """float32 HxWx3 in 0..255."""
    c1 = _rgb(scene.bg_colors[0])
    if scene.background == "plain":
        return np.broadcast_to(c1, (height, width, 3)).copy()
    c2 = _rgb(scene.bg_colors[1])
    if scene.background == "gradient":
        if scene.orientation == "vertical":
            a = ((np.arange(height, dtype=np.float32) + 0.5) / height)[:, None]
            a = np.broadcast_to(a, (height, width))
        else:
            a = ((np.arange(width, dtype=np.float32) + 0.5) / width)[None, :]
            a = np.broadcast_to(a, (height, width))
        w1 = 1.0 - a
    elif scene.background == "stripes":
        if scene.orientation == "horizontal":
            w1 = np.broadcast_to(_band_coverage(height, BANDS)[:, None], (height, width))
        else:
            w1 = np.broadcast_to(_band_coverage(width, BANDS)[None, :], (height, width))
    else:
        ay = _band_coverage(height, BANDS)[:, None]
        ax = _band_coverage(width, BANDS)[None, :]
        w1 = ay * ax + (1 - ay) * (1 - ax)
    w1 = w1[..., None]
    return (w1 * c1 + (1.0 - w1) * c2).astype(np.float32)


def render(scene: Scene, height: int, width: int | None = None) -> np.ndarray:
    """The scene as uint8 ``(height, width, 3)``; edges anti-aliased from exact shape distances."""
    width = height if width is None else width
    if int(height) < 8 or int(width) < 8:
        raise ValueError(f"render needs at least 8x8 pixels, got {height}x{width}")
    height, width = int(height), int(width)
    img = render_background(scene, height, width)
    for obj, (y0, y1, x0, x1), alpha in _object_alphas(scene, height, width):
        patch = img[y0:y1, x0:x1]
        img[y0:y1, x0:x1] = alpha[..., None] * _rgb(obj.color) + (1 - alpha[..., None]) * patch
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def object_coverage(scene: Scene, height: int, width: int) -> np.ndarray:
    """float32 HxW in [0, 1]: how much of each pixel the scene's objects cover (as ``render`` draws
    them, anti-aliased edges included)."""
    cover = np.zeros((int(height), int(width)), dtype=np.float32)
    for _, (y0, y1, x0, x1), alpha in _object_alphas(scene, int(height), int(width)):
        np.maximum(cover[y0:y1, x0:x1], alpha, out=cover[y0:y1, x0:x1])
    return cover


def _object_alphas(scene: Scene, height: int, width: int):
    """(object, (y0, y1, x0, x1) window, alpha of the object in that window) per object, in order."""
    for obj in scene.objects:
        cx, cy, s = object_box(obj, height, width)
        x0, x1 = max(int(np.floor(cx - s - 2)), 0), min(int(np.ceil(cx + s + 2)), width)
        y0, y1 = max(int(np.floor(cy - s - 2)), 0), min(int(np.ceil(cy + s + 2)), height)
        xs = (np.arange(x0, x1, dtype=np.float32) + 0.5 - cx) / s
        ys = (np.arange(y0, y1, dtype=np.float32) + 0.5 - cy) / s
        d = shape_sdf(obj.shape, xs[None, :], ys[:, None]) * s  # in pixels
        yield obj, (y0, y1, x0, x1), np.clip(0.5 - d, 0.0, 1.0)


# -- dataset ---------------------------------------------------------------------------------


def _resolution(resolution) -> tuple[int, int]:
    if isinstance(resolution, int):
        return resolution, resolution
    try:
        h, w = (int(v) for v in resolution)
    except (TypeError, ValueError):
        raise ValueError(f"resolution must be an int or (height, width), got {resolution!r}") from None
    return h, w


def model_range(images: np.ndarray) -> np.ndarray:
    """uint8 images (... x H x W x 3) -> float32 (... x 3 x H x W) in [-1, 1], the models' input.

    numpy, not torch ops: no intra-op thread wake-ups per item inside DataLoader workers.
    """
    x = np.ascontiguousarray(np.moveaxis(images, -1, -3), dtype=np.float32)
    return x * np.float32(1 / 127.5) - 1


class ProceduralDataset:
    """``size`` scenes; item ``i`` = (image float tensor [-1, 1] of shape 3xHxW, caption, Scene).

    Item ``i`` depends only on (``seed``, ``i``), never on iteration order or workers.
    ``resolution``: int or (height, width). ``sample_kwargs`` go to :func:`sample_scene`.
    Use :meth:`collate` as a DataLoader ``collate_fn``.
    """

    def __init__(self, size: int, seed: int = 0, resolution=128, **sample_kwargs):
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        self.size = int(size)
        self.seed = int(seed)
        self.height, self.width = _resolution(resolution)
        self.sample_kwargs = sample_kwargs

    def __len__(self) -> int:
        return self.size

    def _index(self, i: int) -> int:
        i = int(i)
        if i < 0:
            i += self.size
        if not 0 <= i < self.size:
            raise IndexError(f"index {i} out of range for a dataset of {self.size}")
        return i

    def scene(self, i: int) -> Scene:
        i = self._index(i)
        return sample_scene(np.random.default_rng([self.seed, i]), **self.sample_kwargs)

    def caption(self, i: int) -> str:
        return caption(self.scene(i))

    def image(self, i: int) -> np.ndarray:
        """uint8 HxWx3."""
        return render(self.scene(i), self.height, self.width)

    def __getitem__(self, i: int):
        import torch

        scene = self.scene(i)
        x = model_range(render(scene, self.height, self.width))
        return torch.from_numpy(x), caption(scene), scene

    def __iter__(self):
        for i in range(self.size):
            yield self[i]

    def images_and_captions(self, indices) -> tuple[np.ndarray, list[str]]:
        """(uint8 images N x H x W x 3, captions) of items ``indices`` (compact: crosses processes)."""
        scenes = [self.scene(i) for i in indices]
        return np.stack([render(s, self.height, self.width) for s in scenes]), [caption(s) for s in scenes]

    @staticmethod
    def collate(batch):
        """(images B x 3 x H x W, list of captions, list of Scenes)."""
        import torch

        images, captions, scenes = zip(*batch, strict=True)
        return torch.stack(images), list(captions), list(scenes)
