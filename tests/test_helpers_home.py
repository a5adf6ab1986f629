"""The shared top-level helpers: image grids, image metrics (and the other one-home helpers)."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from cleardit import image_metrics as IM
from cleardit.image_grid import image_grid, write_image_grid


def _noise(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# ---- image_grid ---------------------------------------------------------------------------------


def test_grid_takes_arrays_images_and_files_and_lays_out_every_text(tmp_path):
    Image.fromarray(_noise(40, 50, 1)).save(tmp_path / "a.png")
    rows = [[_noise(32, 32), Image.fromarray(_noise(16, 16, 2))], [tmp_path / "a.png"]]
    plain = image_grid(rows, cell=(32, 32))
    labelled = image_grid(
        rows,
        cell=(32, 32),
        column_labels=["left", "right"],
        row_labels=["first row", "second"],
        captions=["a caption long enough to wrap at the width of this small grid", "b"],
        footer=["a footer line that is much wider than the two panels of the grid"],
    )
    assert plain.mode == "RGB" and plain.height >= 2 * 32 and plain.width >= 2 * 32
    assert labelled.width > plain.width and labelled.height > plain.height
    # panels are pasted unchanged at their cell size: find the first one in the plain grid
    arr = np.asarray(plain)
    first = _noise(32, 32)
    hits = [
        (y, x)
        for y in range(arr.shape[0] - 31)
        for x in range(arr.shape[1] - 31)
        if (arr[y, x] == first[0, 0]).all()
    ]
    assert any((arr[y : y + 32, x : x + 32] == first).all() for y, x in hits)


def test_grid_thumb_never_enlarges_and_checks_label_counts(tmp_path):
    small, big = _noise(20, 30), _noise(300, 200)
    grid = image_grid([[small, big]], thumb=100, font_size=11)
    assert grid.height < 100 + 40  # the big one shrunk to fit 100 px, the small one kept its size
    with pytest.raises(ValueError, match="column_labels"):
        image_grid([[small, small]], column_labels=["only one"])
    with pytest.raises(ValueError, match="captions"):
        image_grid([[small]], captions=["a", "b"])
    path = write_image_grid(tmp_path / "sub" / "g.png", [[small]], column_labels=["x"])
    assert path.read_bytes()[:4] == b"\x89PNG"


# ---- image_metrics ------------------------------------------------------------------------------


def test_psnr_hand_values_and_identical_images():
    ref = torch.zeros(2, 3, 4, 4, dtype=torch.float64)
    test = ref.clone()
    test[0] += 0.1
    test[1] += 0.5
    assert IM.psnr(ref, test).tolist() == pytest.approx([20.0, 20 * math.log10(2)], abs=1e-12)
    assert IM.psnr(ref, ref).tolist() == [math.inf, math.inf]
    a, b = _noise(24, 20), _noise(24, 20, 3)
    mse = np.mean((a / 255.0 - b / 255.0) ** 2)
    assert IM.psnr_images(Image.fromarray(a), Image.fromarray(b)) == pytest.approx(
        10 * math.log10(1 / mse), abs=1e-12
    )


def test_ms_ssim_standard_refuses_small_images_and_adapted_fits_them():
    pytest.importorskip("torchmetrics")
    from torchmetrics.functional.image import multiscale_structural_similarity_index_measure as tm

    a, b = _noise(64, 80), _noise(64, 80, 4)
    ta = torch.from_numpy(a).permute(2, 0, 1)[None].double() / 255
    tb = torch.from_numpy(b).permute(2, 0, 1)[None].double() / 255
    with pytest.raises(ValueError, match="176"):
        IM.ms_ssim(ta, tb)
    n, k, sigma = IM.ms_ssim_settings(64, 80)
    betas = tuple(x / sum(IM.MS_SSIM_BETAS[:n]) for x in IM.MS_SSIM_BETAS[:n])
    want = tm(tb, ta, data_range=1.0, kernel_size=k, sigma=sigma, betas=betas)
    assert float(IM.ms_ssim(ta, tb, adapt=True)[0]) == float(want)
    value, note = IM.ms_ssim_images(Image.fromarray(a), Image.fromarray(b))
    assert value == float(want) and f"{n} scales" in note
    big = torch.rand(1, 3, 176, 180, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert float(IM.ms_ssim(big, big)[0]) == pytest.approx(1.0, abs=1e-12)
    assert IM.ms_ssim_note(176, 180) == "MS-SSIM: standard 5 scales, 11-px window"


# ---- training: learning rate and configuration checks ------------------------------------------


def test_learning_rate_warmup_constant_and_cosine():
    from cleardit.training import learning_rate

    assert [learning_rate(1.0, s, warmup=4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert learning_rate(2.0, 0) == 2.0  # no warm-up, no decay
    cos = [learning_rate(1.0, s, warmup=2, total=12, hold=4) for s in range(14)]
    assert cos[:5] == [0.5, 1.0, 1.0, 1.0, 1.0]
    assert cos[8] == pytest.approx(0.1 + 0.9 * 0.5)  # halfway from step 4 to 12
    assert cos[12] == cos[13] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(cos[4:], cos[5:], strict=False))


def test_config_differences_names_every_key_and_treats_lists_as_tuples():
    from cleardit.training import config_differences

    assert config_differences({"a": (1, 2), "b": 3}, {"a": [1, 2], "b": 3}) is None
    text = config_differences(
        {"a": 1, "b": 2}, {"a": 5, "c": 3}, stored_as="work dir has", requested_as="asked"
    )
    assert text.split("; ") == [
        "a: work dir has 1, asked 5",
        "b: work dir has 2, asked <missing>",
        "c: work dir has <missing>, asked 3",
    ]


# ---- prompt lists, environment, FLOPs -----------------------------------------------------------


def test_prompt_files_and_lists(tmp_path):
    from cleardit.prompt_list import prompt_list, read_prompts

    (tmp_path / "p.txt").write_text(" a cat \n\n  \nb dog\n", encoding="utf-8")
    assert read_prompts(tmp_path / "p.txt") == ["a cat", "b dog"]
    (tmp_path / "e.txt").write_text("\n \n")
    with pytest.raises(ValueError, match="has no prompts"):
        read_prompts(tmp_path / "e.txt")
    with pytest.raises(ValueError, match="cannot read the file"):
        read_prompts(tmp_path / "missing.txt")
    assert prompt_list("one") == ["one"] and prompt_list(("a", "b")) == ["a", "b"]
    for bad in ([], ["a", 3], ["a", "  "]):
        with pytest.raises(ValueError):
            prompt_list(bad)
    assert prompt_list(["two\nlines"]) == ["two\nlines"]
    with pytest.raises(ValueError, match="one line"):
        prompt_list(["two\nlines"], one_line=True)


def test_hf_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    from cleardit.environment import hf_cache_dir, resolve_device

    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert hf_cache_dir() == tmp_path / ".cache" / "huggingface" / "hub"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hf_cache_dir() == tmp_path / "xdg" / "huggingface" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hf_cache_dir() == tmp_path / "home" / "hub"
    monkeypatch.setenv("HUGGINGFACE_HUB_CACHE", str(tmp_path / "old"))
    assert hf_cache_dir() == tmp_path / "old"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "new"))
    assert hf_cache_dir() == tmp_path / "new"
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="is not a device"):
        resolve_device("nonsense")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            resolve_device("cuda")


def test_format_flops_units():
    from cleardit.attention.flops import format_flops

    assert format_flops(847.73e12) == "847.73 TFLOPs"
    assert format_flops(48_320.42e12) == "48,320.42 TFLOPs"
    assert format_flops(3.48e9) == "3.48 GFLOPs" and format_flops(384.31e6) == "384.31 MFLOPs"
    assert format_flops(2_000) == "2.00 kFLOPs" and format_flops(12) == "12 FLOPs"
