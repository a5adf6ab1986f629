"""STEP-GPU (shared/BENCHMARKS.md): one denoising step of the FLUX.1-dev architecture.

diffusers' FluxTransformer2DModel with FLUX.1-dev's published config and RANDOM bf16 weights made
on the GPU (timing does not depend on weight values): full attention (diffusers' own processor)
vs CLEAR r=16 vs attention replaced by a no-op (the floor: everything but attention).

Full attention at 8K costs ~48 PFLOP per step, so by default grids of 8K use a model of the same
block shapes with 2 double + 4 single blocks (the 1:2 mix of the real 19 + 38); the script says
so in its table. `--full-depth` forces the 57-block model everywhere.

--dry-run runs the same code on the CPU with a tiny config (used by the tests).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Timer, alternate, machine_header, print_table  # noqa: E402

import cleardit  # noqa: E402
from cleardit.attention import TokenLayout, attention_flops  # noqa: E402
from cleardit.cli_options import add_backend_option, add_radius_option  # noqa: E402
from cleardit.config import DEFAULT_RADIUS  # noqa: E402
from cleardit.models.tiny import FLUX_DEV_CONFIG, TINY_CONFIG, flux_inputs  # noqa: E402


class NoAttention:
    """The floor: projections, norms and RoPE as usual, then the attention op itself skipped (out = v)."""

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None
    ):
        from diffusers.models.embeddings import apply_rotary_emb

        from cleardit.models.flux import project_qkv

        query, key, value = project_qkv(attn, hidden_states, encoder_hidden_states)
        query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
        key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        out = value.flatten(2, 3)
        if encoder_hidden_states is None:
            return out
        t = encoder_hidden_states.shape[1]
        return attn.to_out[1](attn.to_out[0](out[:, t:])), attn.to_add_out(out[:, :t])


def build_model(config: dict, device: torch.device, dtype: torch.dtype):
    from diffusers import FluxTransformer2DModel

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = FluxTransformer2DModel(**config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval().requires_grad_(False)


def time_contenders(model, inputs, radius, backend, timer, reps) -> dict[str, float]:
    """Median step time of full attention, CLEAR and the no-attention floor, run alternately."""
    layers = [b.attn for b in [*model.transformer_blocks, *model.single_transformer_blocks]]
    original = [attn.processor for attn in layers]
    handle = None

    def use(mode):
        nonlocal handle
        if handle is not None:
            handle.restore()
            handle = None
        for attn, proc in zip(layers, original, strict=True):
            attn.set_processor(NoAttention() if mode == "noop" else proc)
        if mode == "clear":
            handle = cleardit.linearize(model, radius=radius, backend=backend)

    def step(mode):
        use(mode)
        with torch.no_grad():
            model(**inputs)

    try:
        return alternate(
            {m: (lambda m=m: step(m)) for m in ("full", "clear", "noop")}, timer, reps=reps, warmup=1
        )
    finally:
        use("full")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="2048,4096,8192", help="square image sizes in pixels")
    add_radius_option(ap, default=DEFAULT_RADIUS)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--full-depth", action="store_true", help="57 blocks at every size")
    ap.add_argument("--dry-run", action="store_true", help="tiny config on the CPU (tests)")
    add_backend_option(ap)
    args = ap.parse_args(argv)

    if args.dry_run:
        device, dtype = torch.device("cpu"), torch.float32
        sizes, base = [16 * 12, 16 * 20], dict(TINY_CONFIG)
    else:
        if not torch.cuda.is_available():
            print("STEP-GPU needs a CUDA device (use --dry-run on the CPU)")
            return 2
        device, dtype = torch.device("cuda"), torch.bfloat16
        sizes, base = [int(s) for s in args.sizes.split(",")], dict(FLUX_DEV_CONFIG)
    print(machine_header(device))
    rows = []
    model_cache = {}
    for size in sizes:
        grid = size // 16
        reduced = not args.full_depth and not args.dry_run and size >= 8192
        cfg = dict(base, num_layers=2, num_single_layers=4) if reduced else base
        key = (cfg["num_layers"], cfg["num_single_layers"])
        if key not in model_cache:
            model_cache.clear()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            model_cache[key] = build_model(cfg, device, dtype)
        model = model_cache[key]
        text_len = 512 if not args.dry_run else 8
        inputs = flux_inputs(model, grid, grid, text_len=text_len, device=device, dtype=dtype)
        timer = Timer(device)
        times = time_contenders(model, inputs, args.radius, args.backend, timer, args.reps)
        layers = cfg["num_layers"] + cfg["num_single_layers"]
        heads, d = cfg["num_attention_heads"], cfg["attention_head_dim"]
        layout = TokenLayout(text_len, grid, grid)
        flop_cut = attention_flops(layout, None, heads, d) / attention_flops(layout, args.radius, heads, d)
        rows.append(
            [
                f"{size}px ({grid}^2)" + (" [2+4 blocks]" if reduced else f" [{layers} blocks]"),
                f"{times['full'] * 1e3:.1f}",
                f"{times['clear'] * 1e3:.1f}",
                f"{times['noop'] * 1e3:.1f}",
                f"{times['full'] / times['clear']:.2f}x",
                f"{times['clear'] / times['noop']:.2f}",
                f"{flop_cut:.0f}x",
            ]
        )
        del inputs
    header = [
        "size",
        "full ms",
        f"CLEAR r={args.radius} ms",
        "no-attn ms",
        "speedup",
        "CLEAR/floor",
        "FLOP cut",
    ]
    print_table(header, rows)
    last = rows[-1]
    print(
        f"headline: at {last[0]} CLEAR r={args.radius} is {last[4]} faster than full attention; "
        f"CLEAR step / no-attention floor = {last[5]}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
