"""MINI-PROBE: how much a mini model uses its captions, without sampling.

Sampling 20 steps and scoring adherence (``adherence_bench.py``) is the real test but is slow
and, while a model is weak, flat: recipes that differ inside the transformer all score ~12%. This
probe reads the transformer's one-step predictions on held-out scenes instead:

* the flow-matching loss at fixed noise levels with the right captions and with the captions
  shuffled across the batch (the trainer's own noising, latents and text encoding). The gap is
  what the captions are worth; at sigma = 1 the input is pure noise, so everything the model knows
  about the scene there comes from the caption.
* the x0 the model predicts from pure noise (sigma = 1), decoded and checked for the background
  facts (``mini_lab.adherence``). That prediction is the model's conditional mean: for these
  scenes the background is fixed by the caption (stripes and checks start with the first colour at
  the top left), so a model that reads its captions and knows where each token sits gets it right.
* the "flat floor": the sigma = 1 loss of a model that predicts each image's mean latent (its
  average colour) at every token. A model at the floor reads the colours but places nothing; only
  a model that knows where its tokens sit gets below it.
* the spatial R^2 of the sigma = 1 x0: the share of each scene's spatial variation (its latent
  minus its mean latent) that the prediction reproduces, averaged over scenes. 0 is a flat
  picture of the right average colour; 1 would be the scene's exact layout (which jitter rules out).
* per sigma, the shape facts of the one-step x0 (``x_t - sigma * v``, decoded): with the right
  captions, scored against the scene; and with every caption's shapes rotated (circle -> square
  -> triangle -> circle), scored against the rotated scene, which is how far the prediction follows
  the shape words rather than the picture (HISTORY.md, round 9); and from a picture with
  every object drawn as a circle (the round blob sampling makes), right captions, scored against
  the scene: how far the model redraws a blob as the stated shape (round 10).

    python examples/mini_model/caption_probe.py --model src/cleardit/mini/weights \
        out/mini-sweep/model-r3-b8-u0.4
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1] / "bench")]  # mini_lab, and bench/common.py
from common import machine_header, print_table  # noqa: E402
from mini_lab import trainer as T  # noqa: E402
from mini_lab.adherence import adherence  # noqa: E402
from mini_lab.dataset import BASIC_SHAPES, model_range, render  # noqa: E402

from cleardit.argtypes import positive_int  # noqa: E402


def probe(folder: str, n: int, sigmas: list[float], batch: int = 16) -> dict:
    """Losses per sigma (right / shuffled captions) and the background facts of the sigma = 1 x0."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    vae, tr = pipe.vae, pipe.transformer
    sf, sh = vae.config.scaling_factor, vae.config.shift_factor
    scenes = T.heldout_scenes(n)
    base = int(pipe.vae.config.sample_size)
    rotated_scenes = [_rotate_shapes(s) for s in scenes]
    losses = {s: {"right": [], "shuffled": []} for s in sigmas}
    checks = {s: {"right": [], "rotated": [], "from circles": []} for s in sigmas}  # one-step x0s
    flat_floor = 0.0
    spatial_r2 = []
    with torch.no_grad():
        for start in range(0, n, batch):
            sc = scenes[start : start + batch]
            b = len(sc)
            x0 = _latents(vae, sc, base)
            x0_circles = _latents(vae, [_all_circles(s) for s in sc], base)
            flat_floor += float(_centred(x0).pow(2).mean()) * b
            g = torch.Generator().manual_seed(start)
            noise = torch.randn(x0.shape, generator=g)
            captions = [s.caption() for s in sc]
            shuffled = captions[1:] + captions[:1]  # every image gets another scene's caption
            rotated = rotated_scenes[start : start + batch]
            for sigma in sigmas:
                target, _ = T.pack_latents(noise - x0)
                variants = (
                    ("right", captions, x0),
                    ("shuffled", shuffled, x0),
                    ("rotated", [r.caption() for r in rotated], x0),
                    ("from circles", captions, x0_circles),
                )
                for key, caps, picture in variants:
                    xt = (1 - sigma) * picture + sigma * noise
                    packed, ids = T.pack_latents(xt)
                    emb, pooled = T.encode_text(pipe, caps)
                    pred = tr(
                        hidden_states=packed,
                        timestep=torch.full((b,), sigma),
                        guidance=torch.full((b,), 3.5) if tr.config.guidance_embeds else None,
                        pooled_projections=pooled,
                        encoder_hidden_states=emb,
                        txt_ids=torch.zeros(emb.shape[1], 3),
                        img_ids=ids,
                        return_dict=False,
                    )[0]
                    if key == "shuffled":
                        losses[sigma][key].append(float((pred - target).pow(2).mean()) * b)
                        continue
                    # the one-step x0, checked against the scene its caption states
                    x0_step = xt - sigma * _unpack(pred, x0.shape)
                    img = vae.decode(x0_step / sf + sh).sample.clamp(-1, 1)
                    stated = rotated if key == "rotated" else sc
                    checks[sigma][key] += [
                        adherence(im, s, shapes=BASIC_SHAPES) for s, im in zip(stated, img, strict=True)
                    ]
                    if key == "right":
                        losses[sigma][key].append(float((pred - target).pow(2).mean()) * b)
                        if sigma == 1.0:
                            spatial_r2 += _spatial_r2(x0_step, x0)
    facts = {
        s: {k: T.summarize_adherence(v)["by_fact_percent"] for k, v in d.items()} for s, d in checks.items()
    }
    at_1 = facts[1.0]["right"] if 1.0 in facts else {}
    out = {
        "loss": {s: {k: sum(v) / n for k, v in d.items()} for s, d in losses.items()},
        "flat_floor": flat_floor / n,
        "x0_spatial_r2": float(np.mean(spatial_r2)) if spatial_r2 else None,
        "x0_bg_colours": at_1.get("background colours"),
        "x0_bg_pattern": at_1.get("background pattern"),
        "x0_shapes": {s: {k: v["shape"] for k, v in d.items()} for s, d in facts.items()},
    }
    return out


_NEXT_SHAPE = {"circle": "square", "square": "triangle", "triangle": "circle"}


def _latents(vae, scenes, side: int) -> torch.Tensor:
    """Scaled VAE latents (posterior means) of the scenes rendered at ``side`` px."""
    x = torch.from_numpy(model_range(np.stack([render(s, side) for s in scenes])))
    latents = vae.encode(x).latent_dist.mode()
    return (latents - vae.config.shift_factor) * vae.config.scaling_factor


def _all_circles(scene):
    """The scene with every object drawn as a circle."""
    return scene.with_shapes(["circle"] * len(scene.objects))


def _rotate_shapes(scene):
    """The scene with every object's shape replaced by the next basic shape."""
    return scene.with_shapes([_NEXT_SHAPE[o.shape] for o in scene.objects])


def _centred(t: torch.Tensor) -> torch.Tensor:
    """Latents (b, c, h, w) minus each image's per-channel spatial mean: the layout, not the colour."""
    return t - t.mean((2, 3), keepdim=True)


def _spatial_r2(pred: torch.Tensor, x0: torch.Tensor) -> list[float]:
    """Per image: 1 - |pred - x0|^2 / |x0|^2 after removing each image's per-channel mean."""
    err = (_centred(pred) - _centred(x0)).pow(2).sum((1, 2, 3))
    return (1 - err / _centred(x0).pow(2).sum((1, 2, 3)).clamp_min(1e-8)).tolist()


def _unpack(packed: torch.Tensor, shape) -> torch.Tensor:
    b, c, h, w = shape
    return packed.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", nargs="+", default=[str(T.DEFAULT_OUTPUT)], help="mini pipeline folders")
    p.add_argument("--n", type=positive_int, default=64, help="held-out scenes")
    p.add_argument("--sigmas", type=float, nargs="+", default=[1.0, 0.9, 0.6])
    p.add_argument("--threads", type=positive_int, default=None)
    args = p.parse_args(argv)
    if any(not 0 < s <= 1 for s in args.sigmas):
        p.error(f"--sigmas must be in (0, 1], got {args.sigmas}")
    if args.threads:
        torch.set_num_threads(args.threads)
    for folder in args.model:
        if not (Path(folder) / "model_index.json").is_file():
            p.error(f"--model {folder}: not a pipeline folder (no model_index.json)")
    print(machine_header())
    print(f"{args.n} held-out scenes at the base size; loss = flow-matching MSE, right / shuffled captions")
    header = ["model", *[f"loss s={s:g}" for s in args.sigmas]]
    header += [f"x0(s={s:g}) shapes % right / rotated / from circles" for s in args.sigmas]
    if 1.0 in args.sigmas:
        header += ["s=1 flat floor", "x0(s=1) spatial R^2", "x0(s=1) bg colours %", "x0(s=1) bg pattern %"]
    rows = []
    for folder in args.model:
        r = probe(folder, args.n, args.sigmas)
        row = [
            folder,
            *[f"{r['loss'][s]['right']:.3f} / {r['loss'][s]['shuffled']:.3f}" for s in args.sigmas],
            *[" / ".join(f"{v:.0f}" for v in r["x0_shapes"][s].values()) for s in args.sigmas],
        ]
        if 1.0 in args.sigmas:
            row += [
                f"{r['flat_floor']:.3f}",
                f"{r['x0_spatial_r2']:.2f}",
                f"{r['x0_bg_colours']:.0f}",
                f"{r['x0_bg_pattern']:.0f}",
            ]
        rows.append(row)
    print_table(header, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
