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
