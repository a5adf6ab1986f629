"""One press of the page's Generate button: the controls' values become a ``GenerateConfig`` and go
through ``cleardit.pipelines.generate``, the same path as ``cleardit generate``; what comes back is
put in the page's terms (images, timing and FLOPs text, gallery entries). No gradio here.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..attention.flops import format_flops
from ..pipelines.config import GenerateConfig
from ..pipelines.generate import GenerationResult, generate
from .model import LoadedModel

# what a user can get wrong; anything else is a fault of the server and is logged with its traceback
USER_ERRORS = (ValueError, TypeError, FileNotFoundError)


@dataclass(frozen=True)
class PageRequest:
    """The page's controls. Numbers arrive as floats (or None for an empty box: the model's default)."""

    prompt: str
    width: float | None = None
    height: float | None = None
    radius: float | None = None
    steps: float | None = None
    seed: float | None = 0
    highres: bool = False
    strength: float = 0.3
    clear_weights: str | None = None
    compare: bool = False


@dataclass(frozen=True)
class GalleryEntry:
    """One image of the session: its PNG (carrying the parameters as ``cleardit generate`` writes
    them), a one-line caption and those parameters."""

    path: Path
    caption: str
    parameters: dict


@dataclass
class PageResult:
    """What the page shows for one request."""

    image: Path  # CLEAR, or full attention at radius 0
    full_image: Path | None  # compare: full attention on the same seed
    stats: str  # markdown: time per image and per step, attention FLOPs, speedup, PSNR / MS-SSIM
    entries: list[GalleryEntry]  # newest first
    summary: str  # generate's summary line, for the server's log


def page_message(text: str) -> str:
    """A library error in the page's words: command-line options become the controls' names
    (``--clear-weights`` -> ``clear weights``)."""
    return re.sub(r"(?<![\w/.-])--([a-z][a-z-]*)", lambda m: m.group(1).replace("-", " "), text)


def whole_number(value, name: str) -> int | None:
    """``value`` from a number box as an int; None (an empty box) stays None."""
    if value is None or value == "":
        return None
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"{name} must be a whole number, got {value:g}")
        return int(value)
    return value


def to_config(request: PageRequest, output: str | os.PathLike, on_step=None) -> GenerateConfig:
    """The ``GenerateConfig`` of a request (checked by GenerateConfig itself; the size and the weights
    file are checked by ``generate`` against the model)."""
    if not request.prompt or not request.prompt.strip():
        raise ValueError("the prompt is empty; type one or pick an example prompt")
    seed = whole_number(request.seed, "seed")
    weights = (request.clear_weights or "").strip() or None
    return GenerateConfig(
        height=whole_number(request.height, "height"),
        width=whole_number(request.width, "width"),
        steps=whole_number(request.steps, "steps"),
        seed=0 if seed is None else seed,
        radius=whole_number(request.radius, "radius"),
        clear_weights=weights,
        highres=bool(request.highres),
        strength=request.strength,
        compare=bool(request.compare),
        output=output,
        quiet=True,
        on_step=on_step,
    )


def run_request(
    model: LoadedModel,
    request: PageRequest,
    output: str | os.PathLike,
    on_step: Callable[[int, int], None] | None = None,
) -> PageResult:
    """Generate what ``request`` asks for with the loaded model, writing its PNGs into ``output``.

    Raises one of ``USER_ERRORS`` for a bad request, with a message that names the value and the fix.
    """
    config = to_config(request, output, on_step)
    result = generate(request.prompt.strip(), config, model=model.pipe, info=model.info)
    entries = [_entry(result.paths[0], result.seconds)]
    full_image = None
    if result.compare is not None:
        full_image = result.full_paths[0]
        entries.insert(0, _entry(full_image, result.compare.full_seconds))
    return PageResult(
        image=result.paths[0],
        full_image=full_image,
        stats=stats_text(result),
        entries=entries,
        summary=result.summary,
    )


def attention_name(parameters: dict) -> str:
    """ "CLEAR r=8" (with its pooled factor) or "full attention", from an image's parameters."""
    if parameters["attention"] != "clear":
        return "full attention"
    down = f" df={parameters['down_factor']}" if parameters.get("down_factor") else ""
    return f"CLEAR r={parameters['radius']}{down}"


def _db(value: float) -> str:
    return "inf dB (identical)" if math.isinf(value) else f"{value:.2f} dB"


def stats_text(result: GenerationResult) -> str:
    """Markdown: time per image and per step and attention FLOPs per step of each attention, and when
    comparing the speedup, the FLOPs saved, PSNR and MS-SSIM between the two images."""
    parameters = result.metadata[0]
    n_images = len(result.images)
    lines = [
        f"**{attention_name(parameters)}**: {result.seconds / n_images:.2f} s per image, "
        f"{result.seconds_per_step:.3f} s per step ({result.steps} steps), "
        f"{format_flops(result.attention_flops)} of attention per step"
    ]
    compare = result.compare
    if compare is not None:
        fewer = 100 * (1 - compare.flops_clear / compare.flops_full)
        quality = f"PSNR {_db(compare.psnr[0])}"
        if compare.ms_ssim is not None:
            quality += f", MS-SSIM {compare.ms_ssim[0]:.4f}"
        lines += [
            f"**full attention**: {compare.full_seconds / n_images:.2f} s per image, "
            f"{compare.full_seconds / result.steps:.3f} s per step, "
            f"{format_flops(compare.flops_full)} of attention per step",
            f"**{compare.speedup:.2f}x speedup**, {fewer:.1f}% fewer attention FLOPs; {quality}",
        ]
    if parameters["highres"]:
        lines.append(f"Times include stage 1 at {parameters['stage1_size']} px (full attention).")
    return "\n\n".join(lines)


def _entry(path: Path, seconds: float) -> GalleryEntry:
    from PIL import Image

    with Image.open(path) as image:  # the parameters as the download carries them
        parameters = json.loads(image.text["parameters"])
    caption = (
        f"{attention_name(parameters)} · {parameters['width']}x{parameters['height']} · "
        f"seed {parameters['seed']} · {parameters['steps']} steps · {seconds:.2f} s · {parameters['prompt']}"
    )
    return GalleryEntry(path=path, caption=caption, parameters=parameters)
