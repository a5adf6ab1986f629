"""Compare training recipes of the mini model: train several variants side by side, then score each.

Each variant is ``python examples/mini_model/train.py`` with ``--set`` overrides (one process per variant,
all at once, so a GPU machine runs a sweep in minutes). Afterwards every variant's pipeline is
scored on held-out prompts at the base size with full attention, for each classifier-free
guidance scale asked for. Prints a table and writes ``sweep.json`` into ``--out``.

    python examples/mini_model/recipe_sweep.py --device cuda --out out/sweep       # the variants below
    python examples/mini_model/recipe_sweep.py --quick --out out/sweep-quick       # smoke run on a CPU
    python examples/mini_model/recipe_sweep.py --variants r3-b8-u0.4 r3-b16-u0.4 --threads 1 \
        --vae-from src/cleardit/mini/weights --minutes-budget 25.5 --cfg-scales 1  # round 3, 2 cores

``--vae-from FOLDER`` hands the trainer a trained VAE (``train.py --vae-from``), so
every variant starts at the DiT stage: the VAE stage is the same in all of them and costs ~11 minutes
on 2 cores.

A variant that the time budget stopped early shows it in the table's "DiT steps" column (done / planned).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # mini_lab
from mini_lab.trainer import BASE_HEAVY_MIX, FULL_MIX, PLAIN_SECOND_PHASE  # noqa: E402

from cleardit.argtypes import nonneg_int, positive_float, positive_int  # noqa: E402
from cleardit.atomic import atomic_write_text  # noqa: E402

# name -> TrainConfig overrides (JSON values, as ``--set`` takes them). Round 1 (batch, steps,
# learning rate, resolution mix, frozen text encoders at FLUX's noise shift) is in HISTORY.md;
# all of it stayed below 11%. Round 2 varies the noise-level shift.
VARIANTS: dict[str, dict] = {
    f"shift{b:g}": {"shift_base": b, "shift_max": b + 0.7} for b in (0.5, 1.5, 2.0, 2.5, 3.0)
}
VARIANTS.update(
    {
        "b16x2400": {"batch": 16, "dit_steps": 2400},
        "b16x2400-lr2e-3": {"batch": 16, "dit_steps": 2400, "dit_lr": 2e-3},
        "b16x2400-lr2e-3-base": {"batch": 16, "dit_steps": 2400, "dit_lr": 2e-3, "dit_mix": [[1, 1, 1]]},
        "b16x2400-lr2e-3-frozen-text": {
            "batch": 16,
            "dit_steps": 2400,
            "dit_lr": 2e-3,
            "train_text_encoders": False,
        },
        "b16x4800-lr2e-3": {"batch": 16, "dit_steps": 4800, "dit_lr": 2e-3},
        "b8x4800-lr2e-3": {"batch": 8, "dit_steps": 4800, "dit_lr": 2e-3},
    }
)
# Round 3 (2 CPU cores, 2 variants at once with one thread each, the shipped VAE): the DiT stage
# at a base-heavy resolution mix, varying the batch, the share of uniform noise levels and the
# transformer's init (adaLN-Zero).
_BASE_HEAVY = [[1, 1, 0.75], [1.5, 1.5, 0.1], [1, 2, 0.05], [2, 1, 0.05], [2, 2, 0.05]]
VARIANTS.update(
    {
        "r3-b8-u0.4": {"batch": 8, "dit_steps": 1750, "dit_mix": _BASE_HEAVY},
        "r3-b16-u0.4": {"batch": 16, "dit_steps": 900, "dit_mix": _BASE_HEAVY},
        "r3-b8-u0": {"batch": 8, "dit_steps": 1550, "dit_mix": _BASE_HEAVY, "sigma_uniform_share": 0.0},
        "r3-b8-u0.15": {"batch": 8, "dit_steps": 1550, "dit_mix": _BASE_HEAVY, "sigma_uniform_share": 0.15},
        "r3-b8-zero": {"batch": 8, "dit_steps": 1750, "dit_mix": _BASE_HEAVY, "zero_init": True},
        "r3-b8-zero-lr2e-3": {
            "batch": 8,
            "dit_steps": 1750,
            "dit_mix": _BASE_HEAVY,
            "zero_init": True,
            "dit_lr": 2e-3,
        },
    }
)
# Round 5 (one H200, all at once, the shipped VAE): the shipped recipe at 8x its compute through the
# batch (a GPU trains a 256-image batch about as fast as a 32-image one; the scenes are rendered by
# worker processes), with two learning rates; and sigma ~ 1 training at that batch: does layout
# appear on the full scene mix with more data per step? (Read it with caption_probe.py.)
VARIANTS.update(
    {
        "r5-b256": {"batch": 256},
        "r5-b256-lr2e-3": {"batch": 256, "dit_lr": 2e-3},
        "r5-b128x2400-lr2e-3": {"batch": 128, "dit_steps": 2400, "dit_lr": 2e-3},
        "r5-s1-b256": {
            "batch": 256,
            "dit_mix": [[1, 1, 1]],
            "logit_mean": 8.0,
            "sigma_uniform_share": 0.0,
            "caption_dropout": 0.0,
        },
    }
)
# Round 5b: sigma ~ 1 at CPU-sized batches, 3,000 planned steps (the budget stops them early; the
# loss curve shows whether and when the loss leaves the flat floor).
_SIGMA1 = VARIANTS["r5-s1-b256"]
VARIANTS.update(
    {
        "r5-s1-b16-lr2e-3": {**_SIGMA1, "batch": 16, "dit_steps": 3000, "dit_lr": 2e-3},
        "r5-s1-b32-lr2e-3": {**_SIGMA1, "batch": 32, "dit_steps": 3000, "dit_lr": 2e-3},
        "r5-s1-b64-lr2e-3": {**_SIGMA1, "batch": 64, "dit_steps": 3000, "dit_lr": 2e-3},
        "r5-s1-b32": {**_SIGMA1, "batch": 32, "dit_steps": 3000},
    }
)
# Rounds 1-6 varied the recipe of the model shipped before round 7; pin it under their overrides so
# they mean what HISTORY.md reports now that the defaults have a layout phase.
RECIPE_BEFORE_ROUND_7 = {
    "dit_steps": 1200,
    "dit_lr": 8e-4,
    "caption_dropout": 0.1,
    "layout_steps": 0,
    "layout_resolution": None,
    "layout_batch": None,
    "mixed_precision": "no",
    "dit_mix": FULL_MIX,
    **PLAIN_SECOND_PHASE,
}
VARIANTS = {name: {**RECIPE_BEFORE_ROUND_7, **v} for name, v in VARIANTS.items()}
# Round 7: a layout phase at 64 px (the recipe shipped from round 7 to round 11), and the same without bf16.
RECIPE_ROUND_7 = {
    "dit_steps": 2000,
    "layout_steps": 900,
    "dit_mix": FULL_MIX,
    **PLAIN_SECOND_PHASE,
    "mixed_precision": "bf16",
}
VARIANTS.update({"r7-shipped": RECIPE_ROUND_7, "r7-fp32": {**RECIPE_ROUND_7, "mixed_precision": "no"}})
# Round 8: the round-7 recipe with the object-weighted loss, and the full run of round 8.
VARIANTS.update(
    {
        "r8-objw4": {**RECIPE_ROUND_7, "object_loss_weight": 4, "mixed_precision": "auto"},
        "r8-base-heavy-objw4": {
            **RECIPE_ROUND_7,
            "dit_steps": 1450,
            "layout_steps": 800,
            "dit_mix": BASE_HEAVY_MIX,
            "object_loss_weight": 4,
            "mixed_precision": "auto",
        },
    }
)
# Round 9: the round-8 run with each batch trained twice (new noise) and a base-size tail; the
# steps fit a 58-minute budget in fp32 on 2 AVX2 cores (HISTORY.md, round 9).
VARIANTS["r9-reuse2-tail150"] = {
    **VARIANTS["r8-base-heavy-objw4"],
    "vae_steps": 1500,
    "dit_steps": 1270,
    "latent_reuse": 2,
    "base_tail_steps": 150,
}
# Round 10: the round-9 run with shape-swapped inputs, the default 2,000 VAE steps and 50 more
# second-phase steps (that CPU ran faster that day; HISTORY.md, round 10).
VARIANTS["r10-swap0.3"] = {
    **VARIANTS["r9-reuse2-tail150"],
    "vae_steps": 2000,
    "dit_steps": 1370,
    "shape_swap": 0.3,
}
# Round 11: the shapes came from swapped inputs on a model with a full second phase behind it, so
# here the swap runs only in a base-size tail of 560 steps after 900 plain second-phase steps
# (HISTORY.md, round 11; run there with --vae-from src/cleardit/mini/weights).
VARIANTS["r11-swap-tail"] = {
    **VARIANTS["r9-reuse2-tail150"],
    "vae_steps": 2000,
    "dit_steps": 2210,
    "layout_steps": 750,
    "base_tail_steps": 560,
    "shape_swap": 0.3,
    "shape_swap_last_steps": 560,
}
# Round 12: round 11's run cut to fit 60 minutes of DiT training on 2 AVX2 cores: 500 plain
# second-phase steps instead of 900, and a 470-step swap tail (HISTORY.md, round 12).
VARIANTS["r12-swap-tail-fit60"] = {
    **VARIANTS["r11-swap-tail"],
    "dit_steps": 1720,
    "base_tail_steps": 470,
    "shape_swap_last_steps": 470,
}
# Round 14: round 11's recipe with 1,050 plain second-phase steps and a 700-step swap tail, the
# shipped defaults since round 14 (55.4 min from scratch on 2 AVX-512 BF16 cores; HISTORY.md).
VARIANTS["r14-swap-tail700"] = {
    **VARIANTS["r11-swap-tail"],
    "dit_steps": 2500,
    "base_tail_steps": 700,
    "shape_swap_last_steps": 700,
}
QUICK_VARIANTS: dict[str, dict] = {"quick-a": {}, "quick-b": {"dit_lr": 2e-3}}


def train_variant(name: str, overrides: dict, args) -> dict:
    out = Path(args.out)
    cmd = [
        sys.executable,
        str(HERE / "train.py"),
        "--device",
        args.device,
        "--work-dir",
        str(out / f"work-{name}"),
        "--output",
        str(out / f"model-{name}"),
        "--eval-images",
        "0",
        "--minutes-budget",
        str(args.minutes_budget),
        "--threads",
        str(args.threads),
        "--quiet",
        "--resume",
    ]
    if args.quick:
        cmd.append("--quick")
    if args.vae_from:
        cmd += ["--vae-from", str(args.vae_from)]
    if args.render_workers:
        cmd += ["--render-workers", str(args.render_workers)]
    for key, value in overrides.items():
        cmd += ["--set", f"{key}={json.dumps(value)}"]
    for item in args.set:
        cmd += ["--set", item]
    t0 = time.monotonic()
    env = dict(os.environ, OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.monotonic() - t0
    (out / f"train-{name}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        print(f"{name}: training failed: {proc.stderr[-1500:]}", flush=True)
        return {"name": name, "error": f"training exited {proc.returncode}: {proc.stderr[-2000:]}"}
    log = json.loads((out / f"model-{name}" / "training_log.json").read_text())
    dit = log["stages"]["dit"]
    score = subprocess.run(
        [
            sys.executable,
            __file__,
            "--score",
            str(out / f"model-{name}"),
            "--device",
            args.device,
            "--eval-images",
            str(args.eval_images),
            "--eval-steps",
            str(args.eval_steps),
            "--cfg-scales",
            *map(str, args.cfg_scales),
            "--threads",
            str(args.threads),
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    if score.returncode != 0:
        return {"name": name, "error": f"scoring exited {score.returncode}: {score.stderr[-2000:]}"}
    result = {
        "name": name,
        "overrides": overrides,
        "train_seconds": seconds,
        "dit_steps_done": dit["steps_done"],
        "dit_planned": dit["planned_steps"],
        "dit_final_loss": dit["loss_curve"][-1][1] if dit["loss_curve"] else None,
        "dit_steps_per_second": dit["steps_per_second"],
        "scores": json.loads(score.stdout.strip().splitlines()[-1]),
    }
    print(json.dumps(result), flush=True)  # each variant as soon as it is done
    return result


def score_model(folder: str, args) -> dict:
    """{scale: adherence summary} on held-out base-size prompts, full attention."""
    import torch
    from mini_lab.adherence import adherence
    from mini_lab.dataset import BASIC_SHAPES
    from mini_lab.trainer import heldout_scenes, summarize_adherence

    from cleardit.pipelines import generate
    from cleardit.pipelines.loading import load_pipeline, read_model_info

    torch.set_num_threads(args.threads)
    scenes = heldout_scenes(args.eval_images)
    pipe = load_pipeline(Path(folder), torch.device(args.device), torch.float32, progress=False)
    info = read_model_info(folder)
    out = {}
    for scale in args.cfg_scales:
        result = generate(
            [s.caption() for s in scenes],
            model=pipe,
            info=info,
            radius=0,
            steps=args.eval_steps,
            true_cfg=scale,
            seed=0,
            quiet=True,
        )
        summary = summarize_adherence(
            [adherence(im, s, shapes=BASIC_SHAPES) for im, s in zip(result.images, scenes, strict=True)]
        )
        out[str(scale)] = {
            "percent": summary["percent"],
            "strict_percent": summary["strict_percent"],
            "by_fact_percent": summary["by_fact_percent"],
        }
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="out/mini-sweep", help="work dirs, models, logs and sweep.json")
    p.add_argument("--device", default="cpu")
    p.add_argument("--variants", nargs="*", default=None, help="names to run (default: all)")
    p.add_argument("--quick", action="store_true", help="tiny step counts (a smoke run)")
    p.add_argument("--set", action="append", default=[], help="FIELD=VALUE added to every variant")
    p.add_argument("--minutes-budget", type=positive_float, default=55.0, help="per variant (trainer's)")
    p.add_argument(
        "--vae-from", metavar="FOLDER", help="every variant starts at the DiT stage with this pipeline's VAE"
    )
    p.add_argument("--threads", type=positive_int, default=2, help="CPU threads per process")
    p.add_argument(
        "--render-workers",
        type=nonneg_int,
        default=0,
        help="scene-rendering processes per variant (GPU runs)",
    )
    p.add_argument("--jobs", type=positive_int, default=None, help="variants at once (default: all)")
    p.add_argument("--eval-images", type=positive_int, default=50)
    p.add_argument("--eval-steps", type=positive_int, default=20)
    p.add_argument("--cfg-scales", type=positive_float, nargs="+", default=[1.0, 2.5, 4.0, 6.0])
    p.add_argument("--score", metavar="FOLDER", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if any(s < 1 for s in args.cfg_scales):
        p.error(f"--cfg-scales must be >= 1, got {args.cfg_scales}")
    if args.score:
        print(json.dumps(score_model(args.score, args)))
        return 0
    table = QUICK_VARIANTS if args.quick else VARIANTS
    names = args.variants or list(table)
    unknown = [n for n in names if n not in table]
    if unknown:
        p.error(f"unknown variant(s) {unknown}; known: {sorted(table)}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=args.jobs or len(names)) as pool:
        results = list(pool.map(lambda n: train_variant(n, table[n], args), names))
    atomic_write_text(Path(args.out) / "sweep.json", json.dumps(results, indent=2) + "\n")
    scales = [str(s) for s in args.cfg_scales]
    print("| variant | DiT steps | final loss | train min | " + " | ".join(f"cfg {s}" for s in scales) + " |")
    print("|---" * (4 + len(scales)) + "|")
    for r in results:
        if "error" in r:
            print(f"| {r['name']} | error: {r['error'][:200]} |")
            continue
        steps = f"{r['dit_steps_done']}/{r['dit_planned']}"
        sc = r["scores"]
        cells = [f"{sc[s]['percent']:.1f}% ({sc[s]['strict_percent']:.0f}%)" for s in scales]
        print(
            f"| {r['name']} | {steps} | {r['dit_final_loss']:.4f} | {r['train_seconds'] / 60:.1f} | "
            + " | ".join(cells)
            + " |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
