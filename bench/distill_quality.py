"""DISTILL-QUALITY: is distilled CLEAR closer to the teacher than training-free CLEAR? (mini model)

1. Teacher data: the mini model with full attention generates ``--train-prompts`` procedural scenes
   at ``--scale`` x its base size (``cleardit.distill.make_teacher_data``; resumable).
2. For each radius: attention-only distillation (``cleardit.distill.Distiller``; resumable).
3. On held-out prompts and seeds (scenes the mini trainer never saw, seeds the teacher data never
   used): the teacher (full attention), CLEAR before distillation (training-free) and after,
   all from the same seed, at the same size. PSNR and MS-SSIM of each CLEAR image against the
   teacher's, and prompt adherence of all three.

Writes a table, ``--json`` and a picture grid (teacher | before | after per radius).

    python bench/distill_quality.py --json out/distill_quality.json --grid docs/images/distill_grid.png
    python bench/distill_quality.py --quick        # a smoke run: tiny counts, minutes
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1] / "examples" / "mini_model"))  # mini_lab
from common import machine_header, print_table  # noqa: E402
from mini_lab.adherence import adherence  # noqa: E402
from mini_lab.dataset import BASIC_SHAPES, ProceduralDataset  # noqa: E402
from mini_lab.trainer import heldout_scenes  # noqa: E402

from cleardit.argtypes import positive_int, positive_int_list  # noqa: E402
from cleardit.distill.teacher_data import TeacherDataset, make_teacher_data  # noqa: E402
from cleardit.distill.trainer import DistillConfig, Distiller, RunOptions  # noqa: E402
from cleardit.image_grid import write_image_grid  # noqa: E402
from cleardit.image_metrics import ms_ssim_images as ms_ssim  # noqa: E402
from cleardit.image_metrics import psnr_images as psnr  # noqa: E402
from cleardit.pipelines import generate  # noqa: E402
from cleardit.pipelines.loading import base_size, load_pipeline, read_model_info, resolve_model  # noqa: E402

TRAIN_STREAM_SEED = 777  # a scene stream of its own: neither the mini trainer's nor the held-out one
EVAL_SEED0 = 100_000  # generator seeds of the evaluation images (teacher data uses 0 ..)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="pipeline folder (default: the shipped mini model)")
    ap.add_argument("--scale", type=positive_int, default=2, help="training/eval size = scale x base (2)")
    ap.add_argument("--radii", type=positive_int_list, default=None, help="CLEAR radii (default 8,4)")
    ap.add_argument("--train-prompts", type=positive_int, default=None, help="teacher samples (512)")
    ap.add_argument("--eval-prompts", type=positive_int, default=None, help="held-out prompts (24)")
    ap.add_argument("--teacher-steps", type=positive_int, default=None, help="denoising steps (20)")
    ap.add_argument("--train-steps", type=positive_int, default=None, help="distillation steps (400)")
    ap.add_argument("--batch-size", type=positive_int, default=8)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--work", type=Path, default=Path("out/distill-quality"), help="data and runs")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--grid", type=Path, default=None, help="picture grid PNG (first 4 held-out prompts)")
    ap.add_argument("--quick", action="store_true", help="16 samples, 4 prompts, 4 steps, 10 train steps")
    args = ap.parse_args(argv)
    radii = args.radii or [8, 4]
    n_train = args.train_prompts or (16 if args.quick else 512)
    n_eval = args.eval_prompts or (4 if args.quick else 24)
    steps = args.teacher_steps or (4 if args.quick else 20)
    train_steps = args.train_steps or (10 if args.quick else 400)

    folder = resolve_model(args.model)
    info = read_model_info(folder)
    pipe = load_pipeline(folder, torch.device("cpu"), torch.float32, progress=False)
    base_h, base_w = base_size(pipe, info)
    height, width = base_h * args.scale, base_w * args.scale
    print(machine_header("cpu"))
    print(
        f"model {folder}; {height}x{width} px ({args.scale}x base); {n_train} teacher samples, "
        f"{steps} steps; distillation {train_steps} steps x batch {args.batch_size}, lr {args.lr:g}; "
        f"{n_eval} held-out prompts"
    )

    # 1. teacher data
    train_ds = ProceduralDataset(n_train, seed=TRAIN_STREAM_SEED)
    t0 = time.perf_counter()
    data_dir = args.work / f"data-{height}x{width}-{n_train}-{steps}"
    make_teacher_data(
        pipe, [train_ds.caption(i) for i in range(n_train)], data_dir, resolution=(height, width), steps=steps
    )
    data = TeacherDataset(data_dir)
    data_seconds = time.perf_counter() - t0

    # 2. distillation, one run per radius
    runs = {}
    for radius in radii:
        cfg = DistillConfig(radius=radius, steps=train_steps, batch_size=args.batch_size, lr=args.lr)
        run_dir = args.work / f"r{radius}-{train_steps}"
        t0 = time.perf_counter()
        result = Distiller(cfg, data, run_dir, model=folder, resume=True, opts=RunOptions(quiet=False)).run()
        runs[radius] = {"weights": result.weights, "seconds": result.seconds, "log": result.losses}
        print(f"r={radius}: {result.steps} steps, {result.seconds:.0f} s of training -> {result.weights}")

    # 3. evaluation on held-out prompts and seeds
    scenes = heldout_scenes(n_eval, seed=1)
    prompts = [s.caption() for s in scenes]

    def images(radius=0, weights=None):
        res = generate(
            prompts,
            model=pipe,
            info=info,
            height=height,
            width=width,
            steps=steps,
            seed=EVAL_SEED0,
            radius=radius,
            clear_weights=weights,
            quiet=True,
        )
        return res.images

    def adh(imgs):
        return 100 * float(
            np.mean([adherence(im, s, shapes=BASIC_SHAPES).score for im, s in zip(imgs, scenes, strict=True)])
        )

    teacher = images(0)
    table = [["teacher (full attention)", "-", "-", f"{adh(teacher):.1f}"]]
    results = {"teacher_adherence": adh(teacher), "radii": {}}
    grid_rows = [[teacher[i]] for i in range(min(4, n_eval))]
    labels = ["teacher"]
    for radius in radii:
        entry = {}
        for name, weights in (("before", None), ("after", runs[radius]["weights"])):
            imgs = images(radius, weights)
            p = [psnr(t, c) for t, c in zip(teacher, imgs, strict=True)]
            m = [ms_ssim(t, c)[0] for t, c in zip(teacher, imgs, strict=True)]
            entry[name] = {
                "psnr": float(np.mean(p)),
                "ms_ssim": float(np.mean(m)) if all(v is not None for v in m) else None,
                "adherence": adh(imgs),
            }
            label = f"CLEAR r={radius} {'training-free' if weights is None else 'distilled'}"
            e = entry[name]
            ms = f"{e['ms_ssim']:.4f}" if e["ms_ssim"] is not None else "n/a"
            table.append([label, f"{e['psnr']:.2f}", ms, f"{e['adherence']:.1f}"])
            for i, row in enumerate(grid_rows):
                row.append(imgs[i])
            labels.append(f"r={radius} {name}")
        entry["psnr_gain_db"] = entry["after"]["psnr"] - entry["before"]["psnr"]
        entry["train_seconds"] = runs[radius]["seconds"]
        entry["final_losses"] = runs[radius]["log"][-1] if runs[radius]["log"] else None
        results["radii"][str(radius)] = entry
    print_table(["images vs teacher (same seed)", "PSNR dB", "MS-SSIM", "adherence %"], table)
    for radius in radii:
        print(
            f"r={radius}: PSNR gain from distillation {results['radii'][str(radius)]['psnr_gain_db']:+.2f} dB"
        )
    results.update(
        model=str(folder),
        height=height,
        width=width,
        teacher_samples=n_train,
        teacher_steps=steps,
        train_steps=train_steps,
        batch_size=args.batch_size,
        lr=args.lr,
        eval_prompts=n_eval,
        teacher_data_seconds=data_seconds,
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2), encoding="utf-8")
    if args.grid:
        print(f"grid -> {write_image_grid(args.grid, grid_rows, column_labels=labels)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
