"""Programmatic prompt adherence for the procedural dataset: does an image show what its caption says?

Each caption states facts; each is measured on the image with colour-distance thresholds (not exact
matches) so the blur and colour drift of a small VAE pass while wrong images fail:

* per object (``a small red circle at the top left``):
  1. *present*: a blob of roughly that colour whose box centre lies in the stated grid cell,
  2. *shape*: among the candidate shapes (all SHAPES by default), the stated one best matches the
     blob: IoU with each shape's mask drawn in the blob's bounding box, minus a penalty when the
     blob's vertical third moment (unchanged by blur, read from the soft object coverage) differs
     from the shape's; this keeps a blurred small triangle from passing for a circle,
  3. *size*: the blob's box side, relative to min(H, W), on the stated side of the small/large
     midpoint.
  Shape and size count as failed when the object is absent.
* background, read inside a thin margin (``BACKGROUND_MARGIN``): *colours* (most background
  pixels are the stated colours or, for a gradient, their blends, and each colour covers a fair
  share) and *pattern* (plain = uniform; gradient = the blend runs from the first colour to the
  second along the stated direction; stripes = pure rows (horizontal) or columns (vertical)
  alternating at least three times; checks = neither rows nor columns pure but a product of a row
  and a column pattern). The pattern is read with the stated colours, so it fails when they are
  absent. Band counts are not stated, so not checked.

Images are analysed at ``ANALYSIS_SIDE`` pixels on their short side whatever their resolution.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cache, lru_cache
from itertools import product

import numpy as np

from .dataset import COLORS, SHAPES, SIZES, Scene, parse_caption, shape_sdf

ANALYSIS_SIDE = 128
OBJECT_COLOR_THRESHOLD = 75.0  # max RGB distance of an object pixel to its palette colour (pairs >= 144)
# Looser threshold used to outline a found blob (its blurred edges); stays below the distance
# every object colour keeps from background blends (MIN_OBJECT_BG_DISTANCE).
OUTLINE_COLOR_THRESHOLD = 100.0
BACKGROUND_COLOR_THRESHOLD = 75.0  # max RGB distance of a background pixel to its colours / blend
# Background facts are read inside this margin (pixels at ANALYSIS_SIDE): a VAE decoder's zero
# padding tints the outermost pixels, which failed "plain" on the round trip of true scenes.
BACKGROUND_MARGIN = 6
SIZE_SPLIT = float(np.sqrt(SIZES["small"] * SIZES["large"]))  # ~0.197 of min(H, W)
MIN_BLOB_SIDE, MAX_BLOB_SIDE = 0.06, 0.42  # plausible object box side, fraction of min(H, W)
MIN_BLOB_FILL = 0.3  # blob area / box area (triangle 0.5, cross 0.56, circle 0.79)
MIN_SHAPE_SCORE = 0.45
SKEW_WEIGHT = 0.15

_PALETTE = np.asarray(list(COLORS.values()), dtype=np.float32)
_NAMES = list(COLORS)


@dataclass
class AdherenceResult:
    """``facts``: (statement, satisfied) per measured fact; ``score``: fraction satisfied;
    ``details``: the measurements behind each decision (for debugging and reports)."""

    facts: list[tuple[str, bool]]
    details: dict = field(default_factory=dict)

    @property
    def score(self) -> float:
        return sum(ok for _, ok in self.facts) / max(len(self.facts), 1)

    @property
    def all_ok(self) -> bool:
        return all(ok for _, ok in self.facts)

    def failed(self) -> list[str]:
        return [f for f, ok in self.facts if not ok]


# -- image handling --------------------------------------------------------------------------


def to_uint8_image(image) -> np.ndarray:
    """HxWx3 uint8 from a PIL image, a uint8 HxWx3 array, a float HxWx3 array in [0, 1] (diffusers'
    ``output_type="np"``) or a torch tensor 3xHxW in [-1, 1] (the dataset's format)."""
    if hasattr(image, "convert") and hasattr(image, "size"):  # PIL
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    if type(image).__module__.startswith("torch"):
        t = image.detach().float().cpu()
        if t.ndim != 3 or t.shape[0] != 3:
            raise ValueError(f"a torch image must be 3xHxW in [-1, 1], got shape {tuple(t.shape)}")
        arr = ((t.permute(1, 2, 0).numpy() + 1.0) * 127.5).round()
        return np.clip(arr, 0, 255).astype(np.uint8)
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(
            f"expected an HxWx3 image (uint8, or float in [0, 1]), got shape {arr.shape}; "
            "torch tensors must be 3xHxW in [-1, 1]"
        )
    if arr.dtype == np.uint8:
        return arr
    if np.issubdtype(arr.dtype, np.floating):
        return np.clip(np.rint(arr * 255.0), 0, 255).astype(np.uint8)
    raise ValueError(f"unsupported image dtype {arr.dtype}; use uint8 or float in [0, 1]")


def _analysis_image(img: np.ndarray) -> np.ndarray:
    from PIL import Image

    h, w = img.shape[:2]
    f = ANALYSIS_SIDE / min(h, w)
    size = (max(1, round(w * f)), max(1, round(h * f)))
    if size != (w, h):
        resample = Image.Resampling.BOX if f < 1 else Image.Resampling.BILINEAR
        img = np.asarray(Image.fromarray(img).resize(size, resample))
    return img.astype(np.float32)


# -- binary morphology and connected components (numpy only) ---------------------------------


def _shifted(mask: np.ndarray, fill: bool):
    p = np.pad(mask, 1, constant_values=fill)
    h, w = mask.shape
    for dy in range(3):
        for dx in range(3):
            yield p[dy : dy + h, dx : dx + w]


def _erode(mask: np.ndarray) -> np.ndarray:
    out = mask.copy()
    for s in _shifted(mask, True):
        out &= s
    return out


def _dilate(mask: np.ndarray, steps: int = 1) -> np.ndarray:
    for _ in range(steps):
        out = mask.copy()
        for s in _shifted(mask, False):
            out |= s
        mask = out
    return mask


def _label(mask: np.ndarray) -> np.ndarray:
    """4-connected components: 0 = background, else the smallest flat index + 1 in the component."""
    h, w = mask.shape
    big = h * w + 1
    ids = np.arange(1, h * w + 1, dtype=np.int64).reshape(h, w)
    lab = np.where(mask, ids, big)
    while True:
        m = lab.copy()
        np.minimum(m[1:], lab[:-1], out=m[1:])
        np.minimum(m[:-1], lab[1:], out=m[:-1])
        np.minimum(m[:, 1:], lab[:, :-1], out=m[:, 1:])
        np.minimum(m[:, :-1], lab[:, 1:], out=m[:, :-1])
        m = np.where(mask, m, big)
        # pointer jumping: adopt the label of the pixel the label points to
        flat = m.ravel()
        ptr = np.where(flat < big, flat - 1, 0)
        flat = np.where(flat < big, np.minimum(flat, flat[ptr]), big)
        m = flat.reshape(h, w)
        if np.array_equal(m, lab):
            return np.where(mask, lab, 0)
        lab = m


# -- object facts ----------------------------------------------------------------------------


def _classify(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(nearest palette index of each pixel, its distance)."""
    d2 = (img * img).sum(-1, keepdims=True) - 2.0 * (img @ _PALETTE.T) + (_PALETTE * _PALETTE).sum(-1)
    idx = d2.argmin(-1)
    best = np.take_along_axis(d2, idx[..., None], -1)[..., 0]
    return idx, np.sqrt(np.maximum(best, 0.0))


@lru_cache(maxsize=4096)
def _template(shape: str, bh: int, bw: int) -> tuple[np.ndarray, int]:
    """(mask, area) of ``shape`` drawn in a bh x bw box."""
    xs = (np.arange(bw, dtype=np.float32) + 0.5) / bw * 2 - 1
    ys = (np.arange(bh, dtype=np.float32) + 0.5) / bh * 2 - 1
    mask = shape_sdf(shape, xs[None, :], ys[:, None]) < 0
    return mask, int(mask.sum())


@cache
def _shape_moments(shape: str) -> tuple[float, float]:
    """(area, third central moment of y per unit area) of ``shape`` in a box of side 1."""
    n = 400
    mask, area = _template(shape, n, n)
    ys = (np.arange(n) + 0.5) / n
    rows = mask.sum(1).astype(np.float64)
    mean = (rows * ys).sum() / rows.sum()
    return area / n**2, float((rows * (ys - mean) ** 3).sum() / rows.sum())


def _coverage(win: np.ndarray, obj_rgb: np.ndarray, bg_rgb: list[np.ndarray]) -> np.ndarray:
    """Per-pixel fraction of object colour, reading each pixel as a blend of the object colour and
    the background colours (the blends blur makes); pixels far from every such blend get 0."""
    c1 = bg_rgb[0]
    p = win - c1
    e1 = obj_rgb - c1
    if len(bg_rgb) == 1:
        a = (p @ e1) / float(e1 @ e1)
        resid = p - a[..., None] * e1
    else:
        e2 = bg_rgb[1] - c1
        g11, g12, g22 = float(e1 @ e1), float(e1 @ e2), float(e2 @ e2)
        r1, r2 = p @ e1, p @ e2
        det = max(g11 * g22 - g12 * g12, 1e-6)
        b = np.clip((g11 * r2 - g12 * r1) / det, 0.0, 1.0)
        q = p - b[..., None] * e2
        a = (q @ e1) / g11
        resid = q - a[..., None] * e1
    alpha = np.clip(a, 0.0, 1.0)
    return np.where(np.linalg.norm(resid, axis=-1) < BACKGROUND_COLOR_THRESHOLD, alpha, 0.0)


def _shape_scores(blob: np.ndarray, mass: float, mu3: float) -> dict[str, float]:
    """How well a blob (cropped to its bounding box) matches each shape drawn in that box.

    Score = IoU with the shape's mask - SKEW_WEIGHT * mismatch of the vertical third moment
    ``mu3`` (per unit mass, of the soft object coverage of total ``mass``) with the shape's own,
    in units of the triangle's. Blur leaves third moments unchanged, so an apex-up triangle stays
    told apart from the symmetric shapes when blur has rounded it. The box may shrink by one
    pixel on any side so a stray blended edge pixel does not skew the fit.
    """
    h, w = blob.shape
    area = int(blob.sum())
    tri_mu3 = abs(_shape_moments("triangle")[1])
    out = {}
    for shape in SHAPES:
        frac, shape_mu3 = _shape_moments(shape)
        side = np.sqrt(max(mass, 1e-6) / frac)  # side of this shape with the measured mass
        out[shape] = -SKEW_WEIGHT * abs(mu3 / side**3 - shape_mu3) / tri_mu3
    best_iou = {s: 0.0 for s in SHAPES}
    for top, bottom, left, right in product((0, 1), repeat=4):
        bh, bw = h - top - bottom, w - left - right
        if bh < 3 or bw < 3:
            continue
        inner = blob[top : h - bottom, left : w - right]
        for shape in SHAPES:
            tmpl, t_area = _template(shape, bh, bw)
            inter = int(np.count_nonzero(tmpl & inner))
            best_iou[shape] = max(best_iou[shape], inter / max(area + t_area - inter, 1))
    return {s: float(best_iou[s] + out[s]) for s in SHAPES}


def _soft_moments(
    img: np.ndarray, box: tuple[int, int, int, int], obj_rgb, bg_rgb, exclude: np.ndarray
) -> tuple[float, float]:
    """(mass, vertical third central moment per unit mass) of the object's soft coverage in a
    window around its box; ``exclude`` masks other objects."""
    y0, y1, x0, x1 = box
    pad = max(5, round(0.5 * max(y1 - y0, x1 - x0)))
    h, w = img.shape[:2]
    y0, y1, x0, x1 = max(y0 - pad, 0), min(y1 + pad, h), max(x0 - pad, 0), min(x1 + pad, w)
    alpha = _coverage(img[y0:y1, x0:x1], obj_rgb, bg_rgb)
    alpha = np.where(exclude[y0:y1, x0:x1], 0.0, alpha)
    rows = alpha.sum(1)
    mass = float(rows.sum())
    if mass <= 0:
        return 0.0, 0.0
    ys = np.arange(y1 - y0) + 0.5
    mean = float((rows * ys).sum() / mass)
    return mass, float((rows * (ys - mean) ** 3).sum() / mass)


def _find_object(img: np.ndarray, nearest: np.ndarray, dist: np.ndarray, scene: Scene, k: int) -> dict | None:
    """The largest plausible blob of object ``k``'s colour centred in its cell, with its shape scores.

    Components are found on the strict colour mask opened by a 3x3 square (drops specks and thin
    blended edges), then outlined with a looser colour threshold around them (keeps blurred edges
    and thin tips). None when no blob qualifies.
    """
    obj = scene.objects[k]
    h, w = nearest.shape
    m = min(h, w)
    is_color = nearest == _NAMES.index(obj.color)
    strict = is_color & (dist < OBJECT_COLOR_THRESHOLD)
    raw = is_color & (dist < OUTLINE_COLOR_THRESHOLD)
    opened = _dilate(_erode(strict)) & strict
    if not opened.any():
        return None
    lab = _label(opened)
    row, col = obj.cell
    best = None
    for lid in np.unique(lab[lab > 0]):
        ys, xs = np.nonzero(lab == lid)
        y0, y1, x0, x1 = max(ys.min() - 2, 0), ys.max() + 3, max(xs.min() - 2, 0), xs.max() + 3
        blob = raw[y0:y1, x0:x1] & _dilate(lab[y0:y1, x0:x1] == lid, steps=2)
        bys, bxs = np.nonzero(blob)
        y0, y1, x0, x1 = y0 + bys.min(), y0 + bys.max() + 1, x0 + bxs.min(), x0 + bxs.max() + 1
        cx, cy = (x0 + x1) / 2 / w, (y0 + y1) / 2 / h
        if not (col / 3 <= cx < (col + 1) / 3 and row / 3 <= cy < (row + 1) / 3):
            continue
        side = ((y1 - y0) + (x1 - x0)) / 2 / m
        fill = len(bys) / ((y1 - y0) * (x1 - x0))
        if not (MIN_BLOB_SIDE <= side <= MAX_BLOB_SIDE and fill >= MIN_BLOB_FILL):
            continue
        if best is None or len(bys) > best["area"]:
            crop = blob[bys.min() : bys.max() + 1, bxs.min() : bxs.max() + 1]
            best = dict(
                area=int(len(bys)),
                side=float(side),
                fill=float(fill),
                center=(cx, cy),
                blob=crop,
                box=(int(y0), int(y1), int(x0), int(x1)),
            )
    if best is None:
        return None
    others = [_NAMES.index(o.color) for i, o in enumerate(scene.objects) if i != k]
    exclude = _dilate(np.isin(nearest, others) & (dist < OBJECT_COLOR_THRESHOLD))
    bg_rgb = [np.asarray(COLORS[c], dtype=np.float32) for c in scene.bg_colors]
    mass, mu3 = _soft_moments(
        img, best.pop("box"), np.asarray(COLORS[obj.color], np.float32), bg_rgb, exclude
    )
    best["mu3"] = mu3 / max(mass, 1e-6) ** 1.5  # scale-free, for reports
    best["shape_scores"] = _shape_scores(best.pop("blob"), mass, mu3)
    return best


# -- background facts ------------------------------------------------------------------------


def _profile(values: np.ndarray, valid: np.ndarray, axis: int, min_count: int = 4):
    """Mean of ``values`` over ``valid`` pixels along ``axis``: (coords, means, counts) of the
    lines with at least ``min_count`` valid pixels."""
    cnt = valid.sum(axis=axis)
    tot = np.where(valid, values, 0.0).sum(axis=axis)
    keep = cnt >= min_count
    return np.nonzero(keep)[0], tot[keep] / cnt[keep], cnt[keep]


def _rank1(a: np.ndarray, iters: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """Leading singular vectors (u, v) of ``a`` by power iteration (a full SVD is needlessly slow),
    started from its strongest row: exact after one step for a checkerboard a = u v^T."""
    v = a[int(np.argmax((a * a).sum(1)))].astype(np.float64)
    u = np.zeros(a.shape[0])
    for _ in range(iters):
        u = a @ v
        u /= max(float(np.linalg.norm(u)), 1e-12)
        v = a.T @ u
        v /= max(float(np.linalg.norm(v)), 1e-12)
    return u, v


def _sign_changes(v: np.ndarray) -> int:
    s = np.sign(v[np.abs(v) > 0.2])
    return int((s[1:] != s[:-1]).sum())


def _background_facts(
    img: np.ndarray, nearest: np.ndarray, dist: np.ndarray, scene: Scene, facts, details
) -> None:
    obj_idx = [_NAMES.index(o.color) for o in scene.objects]
    bg = ~_dilate(np.isin(nearest, obj_idx) & (dist < OBJECT_COLOR_THRESHOLD), steps=2)
    inner = np.zeros_like(bg)
    m = BACKGROUND_MARGIN
    inner[m : bg.shape[0] - m, m : bg.shape[1] - m] = True
    bg &= inner
    n_bg = max(int(bg.sum()), 1)
    kind, cols = scene.background, scene.bg_colors
    colors_text = " and ".join(cols) if kind != "gradient" else f"{cols[0]} to {cols[1]}"
    pattern_text = {
        "plain": "plain",
        "gradient": f"a {scene.orientation} gradient",
        "stripes": f"{scene.orientation} stripes",
        "checks": "checkered",
    }[kind]
    c1 = np.asarray(COLORS[cols[0]], dtype=np.float32)
    d = {}
    if kind == "plain":
        near = np.linalg.norm(img - c1, axis=-1) < BACKGROUND_COLOR_THRESHOLD
        d["near_frac"] = float((near & bg).sum() / n_bg)
        color_ok = d["near_frac"] >= 0.75
        med = np.median(img[bg], axis=0) if bg.any() else np.zeros(3, np.float32)
        d["uniform_frac"] = float(((np.linalg.norm(img - med, axis=-1) < 50) & bg).sum() / n_bg)
        dev = 0.0
        for axis in (0, 1):
            for ch in range(3):
                _, prof, _ = _profile(img[..., ch], bg, axis)
                if prof.size:
                    dev = max(dev, float(np.abs(prof - med[ch]).max()))
        d["profile_dev"] = dev
        pattern_ok = d["uniform_frac"] >= 0.8 and dev < 30
    else:
        c2 = np.asarray(COLORS[cols[1]], dtype=np.float32)
        # every background pixel is a blend of c1 and c2 (a gradient by design, blurred edges of
        # stripes and checks): project on the segment c1 -> c2
        ab = c2 - c1
        tc = np.clip(((img - c1) @ ab) / float(ab @ ab), 0.0, 1.0)
        near = np.linalg.norm(img - (c1 + tc[..., None] * ab), axis=-1) < BACKGROUND_COLOR_THRESHOLD
        v = near & bg
        d["near_frac"] = float(v.sum() / n_bg)
        if kind == "gradient":
            d["low_frac"] = float((v & (tc < 0.3)).sum() / n_bg)
            d["high_frac"] = float((v & (tc > 0.7)).sum() / n_bg)
            color_ok = d["near_frac"] >= 0.75 and d["low_frac"] >= 0.1 and d["high_frac"] >= 0.1
            along, across = (0, 1) if scene.orientation == "vertical" else (1, 0)
            # profile over lines perpendicular to the direction of change
            coords, prof, _ = _profile(tc, v, axis=across)
            _, cross_prof, _ = _profile(tc, v, axis=along)
            if prof.size >= 3 and np.std(prof) > 1e-6:
                d["corr"] = float(np.corrcoef(coords, prof)[0, 1])
                d["rise"] = float(prof[-1] - prof[0])
            else:
                d["corr"], d["rise"] = 0.0, 0.0
            d["cross_std"] = float(np.std(cross_prof)) if cross_prof.size else 1.0
            pattern_ok = d["corr"] >= 0.9 and d["rise"] >= 0.5 and d["cross_std"] <= 0.12
        else:
            s = np.where(tc < 0.5, 1.0, -1.0)
            d["frac1"] = float((v & (s > 0)).sum() / n_bg)
            d["frac2"] = float((v & (s < 0)).sum() / n_bg)
            color_ok = d["near_frac"] >= 0.75 and d["frac1"] >= 0.15 and d["frac2"] >= 0.15
            _, rows, rcnt = _profile(s, v, axis=1)  # one value per row
            _, colp, ccnt = _profile(s, v, axis=0)  # one value per column
            d["row_purity"] = float((np.abs(rows) * rcnt).sum() / max(rcnt.sum(), 1)) if rows.size else 0.0
            d["col_purity"] = float((np.abs(colp) * ccnt).sum() / max(ccnt.sum(), 1)) if colp.size else 0.0
            if kind == "stripes":
                pure, mixed, prof = (
                    ("row_purity", "col_purity", rows)
                    if scene.orientation == "horizontal"
                    else ("col_purity", "row_purity", colp)
                )
                d["changes"] = _sign_changes(prof)
                pattern_ok = d[pure] >= 0.8 and d[mixed] <= 0.5 and d["changes"] >= 2
            else:
                sm = np.where(v, s, 0.0)
                u, vt = _rank1(sm)
                model = np.sign(u)[:, None] * np.sign(vt)[None, :]
                d["rank1_agree"] = float(abs((model * sm).sum()) / max(int(v.sum()), 1))
                rows_any, cols_any = v.any(1), v.any(0)
                d["changes"] = min(_sign_changes(np.sign(u[rows_any])), _sign_changes(np.sign(vt[cols_any])))
                pattern_ok = (
                    d["row_purity"] <= 0.5
                    and d["col_purity"] <= 0.5
                    and d["rank1_agree"] >= 0.8
                    and d["changes"] >= 2
                )
        pattern_ok = pattern_ok and color_ok
    facts.append((f"the background is {colors_text}", bool(color_ok)))
    facts.append((f"the background is {pattern_text}", bool(pattern_ok)))
    details["background"] = d


# -- public API ------------------------------------------------------------------------------


def adherence(image, scene: Scene | str, shapes: Sequence[str] = SHAPES) -> AdherenceResult:
    """Measure every fact of ``scene`` (a Scene or a caption in the dataset's grammar) on ``image``.

    ``image``: PIL image, HxWx3 uint8 or float [0, 1] array, or 3xHxW torch tensor in [-1, 1].
    ``shapes``: the shapes a blob may be recognised as (pass BASIC_SHAPES for a model trained only
    on those: fewer look-alikes under blur). Per object 3 facts (present at its cell, shape, size),
    then 2 background facts.
    """
    if isinstance(scene, str):
        scene = parse_caption(scene)
    if not isinstance(scene, Scene):
        raise TypeError(f"scene must be a Scene or a caption string, got {type(scene).__name__}")
    missing = sorted({o.shape for o in scene.objects} - set(shapes))
    if missing or not set(shapes) <= set(SHAPES):
        raise ValueError(
            f"shapes={list(shapes)} must be a subset of {list(SHAPES)} containing the scene's shapes "
            f"(missing {missing})"
        )
    img = _analysis_image(to_uint8_image(image))
    nearest, dist = _classify(img)
    facts: list[tuple[str, bool]] = []
    details: dict = {"objects": []}
    for k, obj in enumerate(scene.objects):
        where = obj.phrase().split(obj.shape, 1)[1].strip()
        found = _find_object(img, nearest, dist, scene, k)
        details["objects"].append(found)
        facts.append((f"a {obj.color} object {where}", found is not None))
        shape_ok = size_ok = False
        if found is not None:
            scores = {k: v for k, v in found["shape_scores"].items() if k in shapes}
            best = max(scores, key=scores.get)
            shape_ok = best == obj.shape and scores[best] >= MIN_SHAPE_SCORE
            size_ok = (found["side"] < SIZE_SPLIT) == (obj.size == "small")
        facts.append((f"the {obj.color} object {where} is a {obj.shape}", bool(shape_ok)))
        facts.append((f"the {obj.color} object {where} is {obj.size}", bool(size_ok)))
    _background_facts(img, nearest, dist, scene, facts, details)
    return AdherenceResult(facts=facts, details=details)


def adherence_percent(
    images: Iterable, scenes: Sequence[Scene | str], strict: bool = False, shapes: Sequence[str] = SHAPES
) -> float:
    """Mean adherence score of ``images`` against ``scenes`` (or captions), in percent.

    ``strict=True``: the percentage of images with every fact satisfied instead.
    """
    images = list(images)
    if len(images) != len(scenes):
        raise ValueError(f"got {len(images)} images but {len(scenes)} scenes/captions; pass one per image")
    if not images:
        raise ValueError("adherence_percent needs at least one image")
    results = [adherence(im, sc, shapes=shapes) for im, sc in zip(images, scenes, strict=True)]
    vals = [r.all_ok if strict else r.score for r in results]
    return 100.0 * float(np.mean(vals))
