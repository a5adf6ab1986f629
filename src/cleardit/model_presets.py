"""Published attention geometry of the image and video DiT families, for ``cleardit flops``.

Pure data plus a reader of diffusers transformer ``config.json`` files: no torch, no diffusers, so
``cleardit flops`` stays instant. What each number is and where it was checked is in README.md
("Model presets").

Counting rule (the same for presets and config files):

* ``layers``: attention layers over ``[text | image]`` (FLUX's double- and single-stream blocks,
  Qwen-Image's and SD3's joint blocks, Z-Image's main layers over ``[image | caption]``);
* ``image_only_layers``: attention over the image tokens alone, which CLEAR replaces without text
  (Z-Image's ``noise_refiner``, the ``attn2`` of SD3.5-Medium's ``dual_attention_layers``);
* attention over text alone (Z-Image's ``context_refiner``) is not counted: CLEAR leaves it as it
  is, and at 512 tokens it is a small fixed cost next to the image's;
* pad tokens (Z-Image pads image and caption to multiples of 32) are not counted;
* video families: ``layers`` is the video self-attention (Wan's and LTX-2's ``attn1``, with no text:
  their text is cross-attention, which CLEAR leaves as it is) or the joint attention over
  ``[video | text]`` (HunyuanVideo 1.5); a clip of F frames is ``(F - 1) / temporal_compression + 1``
  latent frames.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

# Every family here decodes with a VAE that downsamples 8x per side (FLUX.1's and Z-Image's
# AutoencoderKL, FLUX.2's AutoencoderKLFlux2, Qwen-Image's AutoencoderKLQwenImage, SD3's); a config
# file says nothing about the VAE, so --config assumes it (--pixels-per-token overrides).
VAE_FACTOR = 8


@dataclass(frozen=True)
class ModelGeometry:
    """What ``cleardit flops`` needs of a model.

    Attributes:
        name: the family (a preset) or the config file's class and path.
        heads, head_dim: attention heads and their size.
        layers: attention layers over text + image tokens.
        image_only_layers: attention layers over the image tokens alone (CLEAR without text).
        pixels_per_token: image pixels per token side (VAE factor x patch size).
        text_len: text tokens in the joint layers (the pipeline's default max_sequence_length).
        source: where the numbers come from.
        temporal_compression: video families: frames per latent frame of the VAE (a clip of F frames
            is (F - 1) / temporal_compression + 1 latent frames); None for an image family.
        default_frames: video families: the family pipeline's default num_frames.
        vae_source: video families: the VAE config the compression factors come from.
    """

    name: str
    heads: int
    head_dim: int
    layers: int
    image_only_layers: int
    pixels_per_token: int
    text_len: int
    source: str
    temporal_compression: int | None = None
    default_frames: int | None = None
    vae_source: str | None = None

    @property
    def is_video(self) -> bool:
        return self.temporal_compression is not None

    def latent_frames(self, frames: int) -> int:
        """Latent frames of a clip of ``frames`` frames; a ValueError naming the nearest frame counts
        the VAE can take (1 + k * temporal_compression) otherwise."""
        tc = self.temporal_compression
        if tc is None:
            raise ValueError(f"{self.name} is an image model: it has no frames")
        if frames < 1 or (frames - 1) % tc:
            lo = (frames - 1) // tc * tc + 1
            nearest = f"{lo + tc}" if lo < 1 else f"{lo} or {lo + tc}"
            raise ValueError(
                f"--frames {frames} is not a frame count the {self.name} VAE can take (1 + a multiple of "
                f"{tc}: 1, {1 + tc}, {1 + 2 * tc}, ...); use {nearest}"
            )
        return (frames - 1) // tc + 1

    @property
    def total_layers(self) -> int:
        return self.layers + self.image_only_layers

    def with_overrides(self, **values: int | None) -> ModelGeometry:
        """A copy with every value that is not None replaced (the command line's explicit flags)."""
        return replace(self, **{k: v for k, v in values.items() if v is not None})


def _hf(repo: str, folder: str = "transformer") -> str:
    return f"https://huggingface.co/{repo}/blob/main/{folder}/config.json"


def _video(name, heads, head_dim, layers, pixels_per_token, text_len, repo, temporal, frames):
    """A video family: its transformer and VAE configs in ``repo``, no image-only layers."""
    return ModelGeometry(
        name, heads, head_dim, layers, 0, pixels_per_token, text_len, _hf(repo),
        temporal_compression=temporal, default_frames=frames, vae_source=_hf(repo, "vae"),
    )  # fmt: skip


_HUNYUAN_15 = "hunyuanvideo-community/HunyuanVideo-1.5-480p_t2v"  # the diffusers pipeline's example

# Presets, keyed by the name --family takes (lower case). Sources: each model's published
# transformer/config.json (URL below) for heads, head dim, layers and patch size; the text length is
# the default max_sequence_length of the family's diffusers 0.42.1 pipeline __call__.
PRESETS: dict[str, ModelGeometry] = {
    # FluxTransformer2DModel: 19 double-stream + 38 single-stream blocks, 24 heads x 128, patch 1 on
    # tokens the pipeline packs 2x2 (VAE 8 x 2 = 16 px); FluxPipeline: 512 T5 tokens, padded to 512.
    "flux.1-dev": ModelGeometry(
        "FLUX.1-dev", 24, 128, 19 + 38, 0, 16, 512, _hf("black-forest-labs/FLUX.1-dev")
    ),
    # Flux2Transformer2DModel: 8 double-stream + 48 single-stream blocks, 48 heads x 128, patch 1 on
    # 2x2-packed tokens (16 px); Flux2Pipeline: 512 Mistral tokens, padded to 512.
    "flux.2-dev": ModelGeometry(
        "FLUX.2-dev", 48, 128, 8 + 48, 0, 16, 512, _hf("black-forest-labs/FLUX.2-dev")
    ),
    # QwenImageTransformer2DModel: 60 double-stream blocks, 24 heads x 128, patch 2 (16 px);
    # QwenImagePipeline: max_sequence_length 512, an upper bound (the prompt's own tokens, no padding).
    "qwen-image": ModelGeometry("Qwen-Image", 24, 128, 60, 0, 16, 512, _hf("Qwen/Qwen-Image")),
    # ZImageTransformer2DModel: dim 3840 / 30 heads = 128; 30 main layers over [image | caption] +
    # 2 noise-refiner layers (image only); the 2 context-refiner layers (caption only) are not
    # counted; patch 2 (16 px). ZImagePipeline: max_sequence_length 512, an upper bound (padding is
    # dropped). Tongyi-MAI/Z-Image (the base model) publishes the same transformer numbers.
    "z-image": ModelGeometry("Z-Image", 30, 128, 30, 2, 16, 512, _hf("Tongyi-MAI/Z-Image-Turbo")),
    # SD3Transformer2DModel: 38 joint blocks, 38 heads x 64, patch 2 (16 px); no dual_attention_layers
    # (only SD3.5-Medium has them). StableDiffusion3Pipeline: 77 CLIP tokens + 256 T5 tokens = 333.
    "sd3.5-large": ModelGeometry(
        "SD3.5-Large", 38, 64, 38, 0, 16, 77 + 256, _hf("stabilityai/stable-diffusion-3.5-large")
    ),
    # --- video families: a clip of F frames is (F - 1) / temporal compression + 1 latent frames ------
    # Arguments: heads, head dim, layers, px per token, text tokens in the layer, repository, frames per
    # latent frame, the pipeline's default frames. The hub was not reachable when these were written:
    # each number was checked against diffusers 0.42.1's class defaults and pipelines and against
    # copies of the published configs in public repositories (README.md, "Video families").
    # WanTransformer3DModel: 40 heads x 128, 40 blocks, patch (1, 2, 2); AutoencoderKLWan: 8x space,
    # 4x time (16 px per token). Text (UMT5, 512 tokens) enters by cross-attention (attn2): 0 here.
    "wan2.1-14b": _video("Wan 2.1-14B", 40, 128, 40, 16, 0, "Wan-AI/Wan2.1-T2V-14B-Diffusers", 4, 81),
    # The same architecture with 12 heads x 128 and 30 blocks.
    "wan2.1-1.3b": _video("Wan 2.1-1.3B", 12, 128, 30, 16, 0, "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", 4, 81),
    # 24 heads x 128 (dim 3072), 30 blocks, patch (1, 2, 2) on the Wan 2.2 VAE's 48-channel latents:
    # 16x space (scale_factor_spatial 16, its own 2x2 patching inside), 4x time: 32 px per token.
    "wan2.2-ti2v-5b": _video("Wan 2.2 TI2V-5B", 24, 128, 30, 32, 0, "Wan-AI/Wan2.2-TI2V-5B-Diffusers", 4, 81),
    # HunyuanVideo15Transformer3DModel: 16 heads x 128, 54 blocks of joint attention over
    # [video | image | byT5 | mllm], patch 1 x 1 x 1; AutoencoderKLHunyuanVideo15: 16x space, 4x time
    # (16 px per token). Text: at most 1000 Qwen2.5-VL + 256 byT5 tokens (padding is masked out); the
    # 729 SigLIP image tokens are masked out in text-to-video (image-to-video: --text-len 1985). The 2
    # token-refiner layers (text alone) are not counted.
    "hunyuanvideo-1.5": _video("HunyuanVideo 1.5", 16, 128, 54, 16, 1000 + 256, _HUNYUAN_15, 4, 121),
    # LTX2VideoTransformer3DModel: 32 heads x 128, 48 blocks, patch 1 x 1 x 1, vae_scale_factors
    # (8, 32, 32): AutoencoderKLLTX2Video 32x space, 8x time (32 px per token). Video self-attention
    # (attn1) has no text: text (attn2) and the audio streams are cross-attention, left as they are.
    "ltx-2": _video("LTX-2", 32, 128, 48, 32, 0, "Lightricks/LTX-2", 8, 121),
}
DEFAULT_FAMILY = "flux.1-dev"


def family_names() -> list[str]:
    return list(PRESETS)


def video_family_names() -> list[str]:
    return [name for name, geo in PRESETS.items() if geo.is_video]


def preset(name: str) -> ModelGeometry:
    """The preset ``name`` (case-insensitive); a ValueError naming the choices otherwise."""
    found = PRESETS.get(name.strip().lower())
    if found is None:
        raise ValueError(
            f"unknown model family {name!r} for --family; choose one of: {', '.join(PRESETS)} "
            "(or --config path/to/transformer/config.json)"
        )
    return found


# --- diffusers transformer config files ------------------------------------------------------------


@dataclass(frozen=True)
class _ConfigClass:
    """How to read one diffusers transformer class's config.

    ``defaults`` are the class's own __init__ defaults in diffusers 0.42.1 for the keys read here
    (a config.json may omit a key that equals its default: SD3.5-Large's has no
    dual_attention_layers), checked against diffusers by tests/test_flops_presets.py.
    """

    family: str
    defaults: dict
    text_len: int  # the family pipeline's default max_sequence_length
    packing: int  # latent pixels per token side the pipeline packs before the transformer (FLUX: 2x2)


CONFIG_CLASSES: dict[str, _ConfigClass] = {
    "FluxTransformer2DModel": _ConfigClass(
        "FLUX.1",
        dict(
            patch_size=1, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24
        ),
        512,
        2,
    ),
    "ChromaTransformer2DModel": _ConfigClass(
        "Chroma",
        dict(
            patch_size=1, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24
        ),
        512,
        2,
    ),
    "Flux2Transformer2DModel": _ConfigClass(
        "FLUX.2",
        dict(
            patch_size=1, num_layers=8, num_single_layers=48, attention_head_dim=128, num_attention_heads=48
        ),
        512,
        2,
    ),
    "QwenImageTransformer2DModel": _ConfigClass(
        "Qwen-Image",
        dict(patch_size=2, num_layers=60, attention_head_dim=128, num_attention_heads=24),
        512,
        1,
    ),
    "SD3Transformer2DModel": _ConfigClass(
        "SD3",
        dict(
            patch_size=2,
            num_layers=18,
            attention_head_dim=64,
            num_attention_heads=18,
            dual_attention_layers=(),
        ),
        77 + 256,
        1,
    ),
    "ZImageTransformer2DModel": _ConfigClass(
        "Z-Image",
        dict(all_patch_size=(2,), dim=3840, n_layers=30, n_refiner_layers=2, n_heads=30),
        512,
        1,
    ),
}


def _config_file(path: str | Path) -> Path:
    """``path`` itself, or the config.json inside it (a transformer folder or a pipeline folder)."""
    path = Path(path).expanduser()
    if path.is_dir():
        for candidate in (path / "config.json", path / "transformer" / "config.json"):
            if candidate.is_file():
                return candidate
        raise FileNotFoundError(
            f"no config.json in {path} (nor in {path / 'transformer'}); pass the transformer's config.json"
        )
    if not path.is_file():
        raise FileNotFoundError(f"--config {path}: no such file; pass a diffusers transformer config.json")
    return path


def _whole(value, key: str, where: Path, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{where}: {key} must be a whole number >= {minimum}, got {value!r}")
    return value


def geometry_from_config(path: str | Path) -> ModelGeometry:
    """Heads, head dim, layers and pixels per token of a diffusers transformer ``config.json``
    (picked by its ``_class_name``); the text length is its family pipeline's default."""
    file = _config_file(path)
    try:
        config = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"--config {file} is not a readable JSON file: {exc}") from None
    if not isinstance(config, dict):
        raise ValueError(f"--config {file} holds {type(config).__name__}, not a JSON object of settings")
    class_name = config.get("_class_name")
    kind = CONFIG_CLASSES.get(class_name)
    if kind is None:
        raise ValueError(
            f"--config {file}: _class_name {class_name!r} is not a transformer cleardit flops knows; "
            f"supported: {', '.join(CONFIG_CLASSES)} (or use --family NAME: {', '.join(PRESETS)})"
        )
    cfg = {**kind.defaults, **{k: config[k] for k in kind.defaults if k in config}}
    image_only = 0
    if class_name == "ZImageTransformer2DModel":
        heads, dim = _whole(cfg["n_heads"], "n_heads", file), _whole(cfg["dim"], "dim", file)
        if dim % heads:
            raise ValueError(f"{file}: dim {dim} is not a multiple of n_heads {heads}")
        head_dim = dim // heads
        layers = _whole(cfg["n_layers"], "n_layers", file)
        image_only = _whole(cfg["n_refiner_layers"], "n_refiner_layers", file, minimum=0)  # noise refiner
        sizes = cfg["all_patch_size"]
        if not isinstance(sizes, (list, tuple)) or not sizes:
            raise ValueError(f"{file}: all_patch_size must be a list of patch sizes, got {sizes!r}")
        patch = _whole(2 if 2 in sizes else sizes[0], "all_patch_size", file)  # the pipeline's is 2
    else:
        heads = _whole(cfg["num_attention_heads"], "num_attention_heads", file)
        head_dim = _whole(cfg["attention_head_dim"], "attention_head_dim", file)
        layers = _whole(cfg["num_layers"], "num_layers", file)
        if "num_single_layers" in kind.defaults:
            layers += _whole(cfg["num_single_layers"], "num_single_layers", file, minimum=0)
        if "dual_attention_layers" in kind.defaults:
            dual = cfg["dual_attention_layers"] or ()
            if not isinstance(dual, (list, tuple)):
                raise ValueError(
                    f"{file}: dual_attention_layers must be a list of block indices, got {dual!r}"
                )
            image_only = len(dual)  # SD3.5-Medium's attn2: image-only self-attention in those blocks
        patch = _whole(cfg["patch_size"], "patch_size", file)
    return ModelGeometry(
        name=f"{class_name} ({file})",
        heads=heads,
        head_dim=head_dim,
        layers=layers,
        image_only_layers=image_only,
        pixels_per_token=VAE_FACTOR * kind.packing * patch,
        text_len=kind.text_len,
        source=f"{file}; text length: the {kind.family} pipeline's default",
    )
