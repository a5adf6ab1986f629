"""``cleardit flops --family NAME`` / ``--config config.json``: published model geometry and overrides."""

import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest

from cleardit.cli import main
from cleardit.model_presets import CONFIG_CLASSES, PRESETS, geometry_from_config

ROOT = Path(__file__).resolve().parents[1]

# The documented geometry (README.md, "Model presets"), written out here independently of the module:
# heads, head dim, layers over text + image, image-only layers, pixels per token side, text tokens.
DOCUMENTED = {
    "flux.1-dev": (24, 128, 57, 0, 16, 512, "black-forest-labs/FLUX.1-dev"),
    "flux.2-dev": (48, 128, 56, 0, 16, 512, "black-forest-labs/FLUX.2-dev"),
    "qwen-image": (24, 128, 60, 0, 16, 512, "Qwen/Qwen-Image"),
    "z-image": (30, 128, 30, 2, 16, 512, "Tongyi-MAI/Z-Image-Turbo"),
    "sd3.5-large": (38, 64, 38, 0, 16, 333, "stabilityai/stable-diffusion-3.5-large"),
}
# Video: heads, head dim, layers of video self-/joint attention, pixels per token side, frames per latent
# frame, text tokens in that attention, the pipeline's default frames, repository.
VIDEO_DOCUMENTED = {
    "wan2.1-14b": (40, 128, 40, 16, 4, 0, 81, "Wan-AI/Wan2.1-T2V-14B-Diffusers"),
    "wan2.1-1.3b": (12, 128, 30, 16, 4, 0, 81, "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"),
    "wan2.2-ti2v-5b": (24, 128, 30, 32, 4, 0, 81, "Wan-AI/Wan2.2-TI2V-5B-Diffusers"),
    "hunyuanvideo-1.5": (16, 128, 54, 16, 4, 1256, 121, "hunyuanvideo-community/HunyuanVideo-1.5-480p_t2v"),
    "ltx-2": (32, 128, 48, 32, 8, 0, 121, "Lightricks/LTX-2"),
}


def flops_json(capsys, *argv) -> dict:
    assert main(["flops", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("family", list(DOCUMENTED))
def test_every_preset_gives_the_documented_geometry(capsys, family):
    heads, head_dim, layers, image_only, ppt, text_len, repo = DOCUMENTED[family]
    data = flops_json(capsys, "--family", family, "--height", "2048", "--width", "1024")
    assert (data["heads"], data["head_dim"], data["layers"], data["image_only_layers"]) == (
        heads,
        head_dim,
        layers,
        image_only,
    )
    assert (data["pixels_per_token"], data["text_len"]) == (ppt, text_len)
    assert data["grid"] == [2048 // ppt, 1024 // ppt]
    source = f"https://huggingface.co/{repo}/blob/main/transformer/config.json"
    assert data["source"] == source
    # FLOPs: 4 * head_dim * heads * pairs per layer, every layer counted
    assert data["flops_per_layer_full"] == 4 * head_dim * heads * data["pairs_full"]
    assert data["flops_model_full"] == (
        layers * data["flops_per_layer_full"] + image_only * data["flops_per_image_only_layer_full"]
    )
    assert data["flops_model_clear"] < data["flops_model_full"]
    # the family name is case-insensitive, and the table names the model and its source
    assert main(["flops", "--family", family.upper()]) == 0
    out = capsys.readouterr().out
    assert source in out and f"{heads} heads x {head_dim}" in out


def test_every_preset_source_is_cited_in_the_docs():
    readme = (ROOT / "README.md").read_text()
    for name, preset in PRESETS.items():
        assert preset.source in readme, f"README.md does not cite {name}'s source {preset.source}"
        assert f"`{name}`" in readme
        assert preset.vae_source is None or preset.vae_source in readme
    assert set(PRESETS) == set(DOCUMENTED) | set(VIDEO_DOCUMENTED)


def test_default_stays_flux1_dev(capsys):
    default = flops_json(capsys, "--height", "4096", "--width", "4096")
    assert default == flops_json(capsys, "--family", "flux.1-dev", "--height", "4096", "--width", "4096")
    assert (default["heads"], default["head_dim"], default["layers"], default["text_len"]) == (
        24,
        128,
        57,
        512,
    )
    assert main(["flops"]) == 0
    assert "px per token side" not in capsys.readouterr().out  # the default table is unchanged


def test_z_image_noise_refiner_is_clear_without_text(capsys):
    data = flops_json(capsys, "--family", "z-image", "--height", "512", "--width", "768", "--radius", "4")
    image = 32 * 48
    assert data["pairs_image_only_full"] == image * image  # no text tokens in those layers
    assert data["pairs_full"] == (image + 512) ** 2
    assert 0 < data["pairs_image_only_clear"] < data["pairs_clear"] - 512 * (image + 512)
    heads_d = 4 * 30 * 128
    assert (
        data["flops_model_clear"]
        == 30 * heads_d * data["pairs_clear"] + 2 * heads_d * data["pairs_image_only_clear"]
    )
    assert main(["flops", "--family", "z-image"]) == 0
    out = capsys.readouterr().out
    assert "30 layers with text + 2 image-only layers" in out and "whole model (32)" in out


def test_config_of_a_tiny_flux_gives_its_heads_and_layers(capsys, tmp_path):
    from cleardit.models.tiny import tiny_flux_transformer

    tiny_flux_transformer().save_config(tmp_path)  # 2 heads x 16, 2 double + 2 single blocks
    for where in (tmp_path, tmp_path / "config.json"):
        data = flops_json(capsys, "--config", str(where), "--height", "256", "--width", "128")
        assert (data["heads"], data["head_dim"], data["layers"], data["image_only_layers"]) == (2, 16, 4, 0)
        assert data["pixels_per_token"] == 16 and data["grid"] == [16, 8]  # VAE 8 x the 2x2 packing
        assert data["text_len"] == 512  # the FLUX.1 pipeline's default
        assert "FluxTransformer2DModel" in data["model"]
    # a pipeline folder: its transformer/config.json
    (tmp_path / "pipe" / "transformer").mkdir(parents=True)
    (tmp_path / "pipe" / "transformer" / "config.json").write_text((tmp_path / "config.json").read_text())
    assert flops_json(capsys, "--config", str(tmp_path / "pipe"))["layers"] == 4


def test_config_of_tiny_sd3_and_z_image_counts_image_only_layers(capsys, tmp_path):
    from diffusers import SD3Transformer2DModel, ZImageTransformer2DModel

    sd3 = SD3Transformer2DModel(
        sample_size=16,
        patch_size=1,
        in_channels=4,
        out_channels=4,
        num_layers=3,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=8,
        caption_projection_dim=16,
        pooled_projection_dim=8,
        pos_embed_max_size=32,
        dual_attention_layers=(0, 1),
        qk_norm="rms_norm",
    )
    sd3.save_config(tmp_path / "sd3")
    data = flops_json(capsys, "--config", str(tmp_path / "sd3"), "--height", "1000", "--width", "200")
    assert (data["heads"], data["head_dim"], data["layers"], data["image_only_layers"]) == (2, 8, 3, 2)
    assert data["pixels_per_token"] == 8 and data["grid"] == [125, 25]  # patch 1: 8 px per token
    assert data["text_len"] == 77 + 256

    zimage = ZImageTransformer2DModel(
        in_channels=4,
        dim=64,
        n_layers=3,
        n_refiner_layers=1,
        n_heads=4,
        n_kv_heads=4,
        cap_feat_dim=16,
        axes_dims=[4, 6, 6],
        axes_lens=[64, 32, 32],
    )
    zimage.save_config(tmp_path / "zimage")
    geometry = geometry_from_config(tmp_path / "zimage" / "config.json")
    assert (geometry.heads, geometry.head_dim, geometry.layers, geometry.image_only_layers) == (4, 16, 3, 1)
    assert (geometry.pixels_per_token, geometry.text_len) == (16, 512)


def test_config_keys_left_out_take_the_diffusers_defaults(tmp_path):
    import diffusers

    for class_name, kind in CONFIG_CLASSES.items():
        signature = inspect.signature(getattr(diffusers, class_name).__init__).parameters
        for key, value in kind.defaults.items():
            default = signature[key].default
            assert (list(default) if isinstance(default, tuple) else default) == (
                list(value) if isinstance(value, tuple) else value
            ), f"{class_name}.{key}"
    # SD3.5-Large's published config.json has no dual_attention_layers key: none, like the class default
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "_class_name": "SD3Transformer2DModel",
                "attention_head_dim": 64,
                "num_attention_heads": 38,
                "num_layers": 38,
                "patch_size": 2,
                "qk_norm": "rms_norm",
            }
        )
    )
    geometry = geometry_from_config(tmp_path)
    assert (geometry.heads, geometry.head_dim, geometry.layers, geometry.image_only_layers) == (38, 64, 38, 0)
    assert geometry.pixels_per_token == 16


def test_explicit_flags_override_the_preset(capsys, tmp_path):
    flags = ["--heads", "4", "--head-dim", "32", "--layers", "3", "--image-only-layers", "1"]
    flags += ["--text-len", "100", "--pixels-per-token", "8", "--height", "1000", "--width", "8"]
    data = flops_json(capsys, "--family", "z-image", *flags)
    assert (data["heads"], data["head_dim"], data["layers"], data["image_only_layers"]) == (4, 32, 3, 1)
    assert (data["text_len"], data["pixels_per_token"], data["grid"]) == (100, 8, [125, 1])
    assert data["overrides"] == dict(
        heads=4, head_dim=32, layers=3, image_only_layers=1, text_len=100, pixels_per_token=8
    )
    assert main(["flops", "--family", "sd3.5-large", "--text-len", "0", "--layers", "5"]) == 0
    out = capsys.readouterr().out
    assert "+ 0 text tokens" in out and "5 layers" in out
    assert "replaced on the command line: --layers 5, --text-len 0" in out
    # the same over a config file; and over the default family (today's flags keep working)
    from cleardit.models.tiny import tiny_flux_transformer

    tiny_flux_transformer().save_config(tmp_path)
    data = flops_json(capsys, "--config", str(tmp_path), "--heads", "7", "--text-len", "64")
    assert (data["heads"], data["head_dim"], data["layers"], data["text_len"]) == (7, 16, 4, 64)
    data = flops_json(capsys, "--heads", "2", "--layers", "1")
    assert (data["heads"], data["head_dim"], data["layers"], data["text_len"]) == (2, 128, 1, 512)


def test_bad_family_or_config_names_the_choices(capsys, tmp_path):
    assert main(["flops", "--family", "flux.3"]) == 2
    err = capsys.readouterr().err
    assert "unknown model family 'flux.3'" in err
    assert all(name in err for name in DOCUMENTED)

    (tmp_path / "unet.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    assert main(["flops", "--config", str(tmp_path / "unet.json")]) == 2
    err = capsys.readouterr().err
    assert "'UNet2DConditionModel' is not a transformer" in err
    assert all(name in err for name in CONFIG_CLASSES) and "--family" in err

    for bad, message in (
        ("{not json", "is not a readable JSON file"),
        ("[1, 2]", "not a JSON object"),
        (
            json.dumps({"_class_name": "FluxTransformer2DModel", "num_attention_heads": 0}),
            "num_attention_heads",
        ),
        (
            json.dumps({"_class_name": "ZImageTransformer2DModel", "dim": 100, "n_heads": 30}),
            "not a multiple",
        ),
    ):
        (tmp_path / "bad.json").write_text(bad)
        assert main(["flops", "--config", str(tmp_path / "bad.json")]) == 2
        assert message in capsys.readouterr().err

    assert main(["flops", "--config", str(tmp_path / "missing.json")]) == 2
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["flops", "--config", str(tmp_path / "empty")]) == 2
    assert "no config.json in" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # one source of geometry at a time
        main(["flops", "--family", "z-image", "--config", str(tmp_path / "unet.json")])
    assert "not allowed with argument" in capsys.readouterr().err


def test_size_must_be_a_multiple_of_the_models_pixels_per_token(capsys, tmp_path):
    assert main(["flops", "--family", "sd3.5-large", "--height", "1000"]) == 2
    assert (
        "--height 1000 is not a multiple of 16 (SD3.5-Large: 16 pixels per token side); use 992 or 1008"
        in (capsys.readouterr().err)
    )
    assert main(["flops", "--family", "qwen-image", "--pixels-per-token", "32", "--width", "1000"]) == 2
    assert "--width 1000 is not a multiple of 32 (Qwen-Image: 32 pixels per token side); use 992 or 1024" in (
        capsys.readouterr().err
    )
    assert main(["flops", "--family", "qwen-image", "--pixels-per-token", "8", "--width", "1000"]) == 0
    capsys.readouterr()
    # a config's factor: Z-Image with patch 1 has 8 px per token, so 1000 px is 125 tokens
    (tmp_path / "config.json").write_text(
        json.dumps({"_class_name": "ZImageTransformer2DModel", "all_patch_size": [1]})
    )
    data = flops_json(capsys, "--config", str(tmp_path), "--height", "1000", "--width", "8")
    assert data["pixels_per_token"] == 8 and data["grid"] == [125, 1]
    assert main(["flops", "--config", str(tmp_path), "--height", "12"]) == 2
    err = capsys.readouterr().err
    assert "--height 12 is not a multiple of 8" in err and "use 8 or 16" in err


def test_presets_module_imports_neither_torch_nor_diffusers():
    # loaded on its own (the cleardit package itself imports torch): json, dataclasses, pathlib only
    path = ROOT / "src" / "cleardit" / "model_presets.py"
    code = (
        "import sys, importlib.util;"
        f"spec = importlib.util.spec_from_file_location('presets', {str(path)!r});"
        "module = importlib.util.module_from_spec(spec); sys.modules['presets'] = module;"
        "spec.loader.exec_module(module);"
        "assert 'torch' not in sys.modules and 'diffusers' not in sys.modules;"
        "assert module.preset('Z-Image').image_only_layers == 2"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --- video families ---------------------------------------------------------------------------------


@pytest.mark.parametrize("family", list(VIDEO_DOCUMENTED))
def test_every_video_preset_gives_the_documented_geometry(capsys, family):
    heads, head_dim, layers, ppt, per_latent, text_len, frames, repo = VIDEO_DOCUMENTED[family]
    data = flops_json(capsys, "--family", family, "--height", "1024", "--width", "2048")
    assert (data["heads"], data["head_dim"], data["layers"], data["image_only_layers"]) == (
        heads,
        head_dim,
        layers,
        0,
    )
    assert (data["pixels_per_token"], data["text_len"], data["frames"]) == (ppt, text_len, frames)
    latent = (frames - 1) // per_latent + 1
    assert data["latent_frames"] == latent and data["temporal_radius"] is None
    assert data["grid"] == [latent, 1024 // ppt, 2048 // ppt]
    assert data["pairs_full"] == (latent * (1024 // ppt) * (2048 // ppt) + text_len) ** 2
    assert data["source"] == f"https://huggingface.co/{repo}/blob/main/transformer/config.json"
    assert PRESETS[family].vae_source == f"https://huggingface.co/{repo}/blob/main/vae/config.json"
    assert data["flops_model_full"] == layers * 4 * head_dim * heads * data["pairs_full"]


def test_video_pairs_and_flops_match_a_hand_count(capsys):
    # Wan 2.1-1.3B, 9 frames = 3 latent frames of 48x48 px = 3x3 tokens (27), r=2. The disc
    # dy^2 + dx^2 < 4 on a 3x3 frame is the 3x3 neighbourhood: 7 row pairs x 7 column pairs = 49 pairs
    # per (query frame, key frame). With rt=2, dt=+-1 keeps dy^2 + dx^2 < ceil(4 * 3 / 4) = 3, still
    # the whole neighbourhood, and dt=+-2 drops out: 3 + 2 * 2 = 7 frame pairs, 343 pairs.
    # rt=1: the frame itself, 3 frame pairs (147); every frame: 9 frame pairs (441). Full: 27^2.
    args = ["--family", "wan2.1-1.3b", "--frames", "9", "--height", "48", "--width", "48", "--radius", "2"]
    for rt, pairs in (("2", 343), ("1", 147), (None, 441)):
        data = flops_json(capsys, *args, *(["--temporal-radius", rt] if rt else []))
        assert data["grid"] == [3, 3, 3] and data["video_tokens"] == 27
        assert data["pairs_full"] == 729 and data["pairs_clear"] == pairs
        assert data["flops_per_layer_clear"] == 4 * 128 * 12 * pairs
        assert data["flops_model_clear"] == 30 * 4 * 128 * 12 * pairs
    # r=1: each token sees itself in the frames within reach: rt=2 -> 27 * 7 / 3 = 63 pairs
    data = flops_json(capsys, *args[:-1], "1", "--temporal-radius", "2")
    assert data["pairs_clear"] == 63


def test_issue_example_wan_14b_720p(capsys):
    argv = ["--family", "wan2.1-14b", "--frames", "81", "--height", "720", "--width", "1280"]
    argv += ["--radius", "16", "--temporal-radius", "4"]
    data = flops_json(capsys, *argv)
    assert data["grid"] == [21, 45, 80] and data["video_tokens"] == 75_600
    assert data["pairs_full"] == 75_600**2 and data["text_len"] == 0
    assert 0 < data["pairs_clear"] < data["pairs_full"] // 20
    assert main(["flops", *argv]) == 0
    out = capsys.readouterr().out
    assert "81 frames of 720x1280 px = 21x45x80 video tokens (75,600) + 0 text tokens" in out
    assert "temporal radius 4 latent frames" in out and "CLEAR r=16 rt=4" in out
    assert "4 frames per latent frame" in out and PRESETS["wan2.1-14b"].vae_source in out


def test_frames_the_vae_cannot_take_name_the_nearest_valid_counts(capsys):
    assert main(["flops", "--family", "wan2.1-14b", "--frames", "80"]) == 2
    err = capsys.readouterr().err
    assert "--frames 80 is not a frame count the Wan 2.1-14B VAE can take" in err
    assert "1 + a multiple of 4" in err and "use 77 or 81" in err
    assert main(["flops", "--family", "ltx-2", "--frames", "100"]) == 2
    assert "use 97 or 105" in capsys.readouterr().err
    assert main(["flops", "--family", "ltx-2", "--frames", "1"]) == 0  # one latent frame: an image
    capsys.readouterr()


def test_frames_or_temporal_radius_on_an_image_model_is_refused(capsys, tmp_path):
    for flags in (["--frames", "81"], ["--temporal-radius", "2"], ["--family", "z-image", "--frames", "5"]):
        assert main(["flops", *flags]) == 2
        err = capsys.readouterr().err
        assert "is an image model, it has no frames" in err and "--family wan2.1-14b" in err
    from cleardit.models.tiny import tiny_flux_transformer

    tiny_flux_transformer().save_config(tmp_path)
    assert main(["flops", "--config", str(tmp_path), "--temporal-radius", "3"]) == 2
    assert "--temporal-radius: FluxTransformer2DModel" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: a temporal radius is a positive whole number
        main(["flops", "--family", "wan2.1-14b", "--temporal-radius", "0"])
    capsys.readouterr()


def test_video_presets_agree_with_diffusers_defaults():
    import diffusers

    def defaults(cls, method="__init__"):
        return {
            k: p.default
            for k, p in inspect.signature(getattr(getattr(diffusers, cls), method)).parameters.items()
        }

    wan = defaults("WanTransformer3DModel")  # the class defaults are Wan 2.1-14B's
    geo = PRESETS["wan2.1-14b"]
    assert (wan["num_attention_heads"], wan["attention_head_dim"], wan["num_layers"]) == (
        geo.heads,
        geo.head_dim,
        geo.layers,
    )
    wan_vae = defaults("AutoencoderKLWan")  # Wan 2.1's VAE: 8x space, 4x time; patch (1, 2, 2)
    assert geo.pixels_per_token == wan_vae["scale_factor_spatial"] * wan["patch_size"][1]
    assert geo.temporal_compression == wan_vae["scale_factor_temporal"]
    assert geo.default_frames == defaults("WanPipeline", "__call__")["num_frames"]

    hv = defaults("HunyuanVideo15Transformer3DModel")
    hv_vae = defaults("AutoencoderKLHunyuanVideo15")
    geo = PRESETS["hunyuanvideo-1.5"]
    assert (hv["num_attention_heads"], hv["attention_head_dim"], hv["num_layers"]) == (
        geo.heads,
        geo.head_dim,
        geo.layers,
    )
    assert geo.pixels_per_token == hv_vae["spatial_compression_ratio"] * hv["patch_size"]
    assert geo.temporal_compression == hv_vae["temporal_compression_ratio"] * hv["patch_size_t"]
    assert geo.default_frames == defaults("HunyuanVideo15Pipeline", "__call__")["num_frames"]

    ltx = defaults("LTX2VideoTransformer3DModel")
    geo = PRESETS["ltx-2"]
    assert (ltx["num_attention_heads"], ltx["attention_head_dim"], ltx["num_layers"]) == (
        geo.heads,
        geo.head_dim,
        geo.layers,
    )
    temporal, spatial, _ = ltx["vae_scale_factors"]
    assert (geo.temporal_compression, geo.pixels_per_token) == (temporal, spatial * ltx["patch_size"])
