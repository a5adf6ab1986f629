"""The options several cleardit command lines share, each declared once (one name, type and help
text): ``--model``, ``--radius``, ``--down-factor``, ``--backend``, ``--device``, ``--dtype``.

Each ``add_*_option(parser, ...)`` adds one option to an argparse parser or argument group and
returns its action. The value types live in :mod:`cleardit.argtypes`.
"""

from __future__ import annotations

import argparse

from .argtypes import nonneg_int, positive_int

MODEL_HELP = (
    "diffusers pipeline folder or cached Hugging Face id, e.g. black-forest-labs/FLUX.1-dev "
    "(default: the shipped mini model)"
)


def add_model_option(parser, *, role: str | None = None) -> argparse.Action:
    """``--model``: the pipeline to load (default None: the shipped mini model). ``role`` names what
    the model is for in this command (``"the teacher"``)."""
    return parser.add_argument("--model", default=None, help=f"{role}: {MODEL_HELP}" if role else MODEL_HELP)


def add_radius_option(
    parser,
    *,
    default: int | None = None,
    required: bool = False,
    many: bool = False,
    zero_means_full: bool = False,
    default_help: str | None = None,
) -> argparse.Action:
    """``--radius``: the CLEAR radius in tokens (an image token attends to the image tokens closer
    than this); a whole number >= 1, or >= 0 with ``zero_means_full`` (0 = original full attention,
    or a job's own explanation of why 0 is refused). ``many``: one or more radii. ``default_help``
    says what the default is when it is not simply ``default``."""
    if many:
        text = "CLEAR radii in tokens, e.g. --radius 4 8 16"
    else:
        text = "CLEAR radius in tokens: image tokens attend to the image tokens closer than this"
    if zero_means_full:
        text += "; 0 = original full attention"
    if required:
        text += " (required)"
    elif default_help or default is not None:
        text += f" (default: {default_help or default})"
    return parser.add_argument(
        "--radius",
        type=nonneg_int if zero_means_full else positive_int,
        nargs="+" if many else None,
        metavar="R",
        default=default,
        required=required,
        help=text,
    )


def add_down_factor_option(parser) -> argparse.Action:
    """``--down-factor``: the pooled branch's factor (default None: no pooled keys)."""
    return parser.add_argument(
        "--down-factor",
        type=positive_int,
        default=None,
        metavar="DF",
        help="CLEAR pooled branch: every image query also sees one pooled key per DF x DF block "
        "(e.g. 4 for the reference's *_down_4 releases; default: none)",
    )


def add_backend_option(parser) -> argparse.Action:
    """``--backend``: the attention backend (default ``auto``)."""
    return parser.add_argument(
        "--backend", default="auto", help="attention backend: auto (default), reference, tiled, flex, triton"
    )


def add_device_option(parser) -> argparse.Action:
    """``--device`` (default ``auto``: CUDA if available)."""
    return parser.add_argument(
        "--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto, cuda if available)"
    )


def add_dtype_option(parser) -> argparse.Action:
    """``--dtype`` (default ``auto``: bf16 on CUDA, fp32 elsewhere)."""
    return parser.add_argument(
        "--dtype", default="auto", help="fp32, bf16, fp16 or auto (default: auto, bf16 on cuda, fp32 on cpu)"
    )
