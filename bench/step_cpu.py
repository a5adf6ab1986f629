"""STEP-CPU (issue 27's CPU benchmark per family, issue 28's STEP-CPU-VIDEO): one transformer forward.

Per family: the diffusers transformer with the family's published attention heads x head dim
(cleardit.model_presets) and the other widths of its published config, 2 layers, RANDOM fp32 weights
(timing does not depend on weight values), batch 1, no grad, on the CPU. Contenders, alternated
(full, CLEAR, floor, full, ...) after one warm-up each, medians:

  full   the model as diffusers builds it (its own attention processors);
  CLEAR  cleardit.linearize(model, radius=r) (video: temporal_radius=rt), restored after each call;
  floor  everything but the attention op: torch.nn.functional.scaled_dot_product_attention, which
         every original processor ends in (diffusers' dispatch_attention_fn on its native backend,
         SD3's JointAttnProcessor2_0 directly), returns its query instead (a view: free, right shape).
         Projections, norms, RoPE, MLPs, modulation and cross-attention projections all run.

The 2 layers per family (default grid: issue 27's 96 x 128 image tokens; video: ATTN-CPU-3D's
13 x 30 x 52 latent tokens; text: the family pipeline's default length):
  flux      FLUX.1-dev   24 x 128  1 double-stream + 1 single-stream block, 512 text tokens
  flux2     FLUX.2-dev   48 x 128  1 double-stream + 1 single-stream block, 512 text tokens
  qwenimage Qwen-Image   24 x 128  2 double-stream blocks, 512 text tokens (the pipeline's maximum)
  sd3       SD3.5-Large  38 x 64   2 joint blocks (the last one context_pre_only, as in every SD3);
                                   SD3.5-Large has no dual-attention layer; 77 + 256 text tokens
  zimage    Z-Image      30 x 128  1 noise-refiner (image only) + 1 main layer over [image | caption];
                                   the text-only context refiner (1 layer) runs as well; 512 tokens
  wan       Wan 2.1-1.3B 12 x 128  2 blocks: attn1 (CLEAR in space and time) + attn2 (cross-attention
                                   to 512 UMT5 tokens, left as it is); FFN 8960
  wan14b    Wan 2.1-14B  40 x 128  the same with FFN 13824

Correctness before timing, per family, on a small model of the same class (2 heads, small widths,
every weight random) at a small grid: CLEAR with a radius beyond the grid equals full attention
(max abs error printed, must be <= 1e-4), CLEAR r (and rt) differs from it, and the floor calls the
patched op once per attention layer and changes the output.

At the published widths a 96 x 128 forward is several TFLOP of projections and MLPs: minutes per
contender on a 2-core CPU. --heads keeps the head dim and the token counts but uses fewer heads
(every width that is heads x head dim follows): a cheaper model, and NOT the family's geometry
(attention is a larger share of its forward than of the real one's); the table says which.

  python bench/step_cpu.py                             # every family at the issue's sizes (slow!)
  python bench/step_cpu.py --family flux,wan --grid 32x48 --video-grid 5x16x24
  python bench/step_cpu.py --heads 2                   # the issue's sizes, 2 heads of the real head dim
  python bench/step_cpu.py --quick                     # flux + wan, 2 heads, small grids: < 60 s
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OtherLoad, Timer, fmt_ms, machine_header, max_abs_error, print_table, spread  # noqa: E402

import cleardit  # noqa: E402
from cleardit.cli_options import add_backend_option  # noqa: E402
from cleardit.model_presets import preset  # noqa: E402
from cleardit.models.tiny import FLUX_DEV_CONFIG  # noqa: E402

CHECK_TOL = 1e-4


# --------------------------------------------------------------------------- the floor
@contextlib.contextmanager
def no_attention(counter: list[int] | None = None):
    """While active, F.scaled_dot_product_attention returns its query (the output's shape whenever
    the value's head dim equals the query's, as in every family here): the attention op is free."""
    original = F.scaled_dot_product_attention

    def floor(query, key, value, *args, **kwargs):
        if counter is not None:
            counter[0] += 1
        if value.shape[-1] != query.shape[-1]:
            raise ValueError("the floor returns the query: it needs value and query of the same head dim")
        return query

    torch.nn.functional.scaled_dot_product_attention = floor
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = original


# --------------------------------------------------------------------------- the families
@dataclass(frozen=True)
class Family:
    label: str  # the model whose geometry is used
    preset: str  # key in cleardit.model_presets (heads, head dim, text length)
    layers: str  # what the 2 layers are
    video: bool
    config: Callable[..., dict]  # (small, heads=None) -> constructor kwargs (small: the correctness model)
    build: Callable[[dict], torch.nn.Module]
    inputs: Callable[[torch.nn.Module, tuple[int, int, int], int, torch.Generator], dict]
    attention_layers: int  # attention calls per forward (the floor must replace each one)

    @property
    def text_len(self) -> int:
        return preset(self.preset).text_len or 512  # Wan: UMT5's 512 tokens by cross-attention


def _geometry(name: str, small: bool, heads: int | None) -> tuple[int, int]:
    """(heads, head dim): the published ones, ``heads`` instead of the published count if given, or
    2 x 16 for the small correctness model."""
    g = preset(name)
    return (2, 16) if small else (heads or g.heads, g.head_dim)


def _flux_config(small, heads=None):
    heads, dim = _geometry("flux.1-dev", small, heads)
    cfg = dict(
        FLUX_DEV_CONFIG, num_layers=1, num_single_layers=1, num_attention_heads=heads, attention_head_dim=dim
    )
    if small:
        cfg.update(in_channels=8, joint_attention_dim=24, pooled_projection_dim=12, axes_dims_rope=(4, 6, 6))
    return cfg


def _flux_inputs(model, grid, text_len, g):
    _, h, w = grid
    cfg = model.config
    ids = torch.zeros(h, w, 3)
    ids[..., 1] += torch.arange(h)[:, None]
    ids[..., 2] += torch.arange(w)[None, :]
    return dict(
        hidden_states=torch.randn(1, h * w, cfg.in_channels, generator=g),
        encoder_hidden_states=torch.randn(1, text_len, cfg.joint_attention_dim, generator=g),
        pooled_projections=torch.randn(1, cfg.pooled_projection_dim, generator=g),
        timestep=torch.rand(1, generator=g),
        img_ids=ids.reshape(-1, 3),
        txt_ids=torch.zeros(text_len, 3),
        guidance=torch.full((1,), 3.5),
        return_dict=False,
    )


def _flux2_config(small, heads=None):
    heads, dim = _geometry("flux.2-dev", small, heads)
    # Flux2Transformer2DModel's defaults are FLUX.2-dev's published config
    cfg = dict(num_layers=1, num_single_layers=1, num_attention_heads=heads, attention_head_dim=dim)
    if small:
        cfg.update(
            in_channels=8, joint_attention_dim=24, timestep_guidance_channels=16, axes_dims_rope=(4, 4, 4, 4)
        )
    return cfg


def _flux2_inputs(model, grid, text_len, g):
    _, h, w = grid
    cfg = model.config
    ids = torch.cartesian_prod(*(torch.arange(n) for n in (1, h, w, 1)))  # (t, h, w, l), row-major
    text_ids = torch.cartesian_prod(*(torch.arange(n) for n in (1, 1, 1, text_len)))
    return dict(
        hidden_states=torch.randn(1, h * w, cfg.in_channels, generator=g),
        encoder_hidden_states=torch.randn(1, text_len, cfg.joint_attention_dim, generator=g),
        timestep=torch.rand(1, generator=g),
        guidance=torch.full((1,), 3.5),
        img_ids=ids[None],
        txt_ids=text_ids[None],
        return_dict=False,
    )


def _qwen_config(small, heads=None):
    heads, dim = _geometry("qwen-image", small, heads)
    cfg = dict(num_layers=2, num_attention_heads=heads, attention_head_dim=dim)  # defaults: Qwen-Image's
    if small:
        cfg.update(in_channels=16, out_channels=4, joint_attention_dim=24, axes_dims_rope=(4, 6, 6))
    return cfg


def _qwen_inputs(model, grid, text_len, g):
    _, h, w = grid
    cfg = model.config
    return dict(
        hidden_states=torch.randn(1, h * w, cfg.in_channels, generator=g),
        encoder_hidden_states=torch.randn(1, text_len, cfg.joint_attention_dim, generator=g),
        encoder_hidden_states_mask=None,  # QwenImagePipeline passes None when no token is padding
        timestep=torch.full((1,), 0.6),
        img_shapes=[[(1, h, w)]],
        return_dict=False,
    )


def _sd3_config(small, heads=None):
    heads, dim = _geometry("sd3.5-large", small, heads)
    # SD3.5-Large's published config (38 x 64, caption projection 2432 = 38 x 64), 2 of its 38 blocks
    cfg = dict(
        sample_size=128, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=dim,
        num_attention_heads=heads, joint_attention_dim=4096, caption_projection_dim=heads * dim,
        pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192, qk_norm="rms_norm",
    )  # fmt: skip
    if small:
        cfg.update(in_channels=4, out_channels=4, joint_attention_dim=12, pooled_projection_dim=8)
    return cfg


def _sd3_inputs(model, grid, text_len, g):
    _, h, w = grid
    cfg = model.config
    p = cfg.patch_size
    return dict(
        hidden_states=torch.randn(1, cfg.in_channels, h * p, w * p, generator=g),
        encoder_hidden_states=torch.randn(1, text_len, cfg.joint_attention_dim, generator=g),
        pooled_projections=torch.randn(1, cfg.pooled_projection_dim, generator=g),
        timestep=torch.full((1,), 500.0),
        return_dict=False,
    )


def _zimage_config(small, heads=None):
    heads, dim = _geometry("z-image", small, heads)
    cfg = dict(dim=heads * dim, n_heads=heads, n_kv_heads=heads, n_layers=1, n_refiner_layers=1)
    if small:
        cfg.update(in_channels=4, cap_feat_dim=16, axes_dims=[4, 6, 6], axes_lens=[256, 64, 64])
    return cfg


def _zimage_inputs(model, grid, text_len, g):
    _, h, w = grid
    cfg = model.config
    return dict(
        x=[torch.randn(cfg.in_channels, 1, 2 * h, 2 * w, generator=g)],
        t=torch.full((1,), 0.6),
        cap_feats=[torch.randn(text_len, cfg.cap_feat_dim, generator=g)],
        return_dict=False,
    )


def _wan_config(name, ffn):
    def config(small, heads=None):
        heads, dim = (2, 12) if small else _geometry(name, small, heads)
        ffn_dim = ffn * heads // preset(name).heads  # --heads: the FFN keeps its ratio to the width
        cfg = dict(num_attention_heads=heads, attention_head_dim=dim, ffn_dim=ffn_dim, num_layers=2)
        cfg.update(in_channels=16, out_channels=16, text_dim=4096, freq_dim=256)  # Wan 2.1's T2V config
        if small:
            cfg.update(
                in_channels=4, out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, rope_max_seq_len=64
            )
        return cfg

    return config


def _wan_inputs(model, grid, text_len, g):
    t, h, w = grid
    cfg = model.config
    pt, ph, pw = cfg.patch_size
    return dict(
        hidden_states=torch.randn(1, cfg.in_channels, t * pt, h * ph, w * pw, generator=g),
        timestep=torch.rand(1, generator=g) * 1000,
        encoder_hidden_states=torch.randn(1, text_len, cfg.text_dim, generator=g),
        return_dict=False,
    )


def _builder(class_name):
    def build(cfg):
        import diffusers

        return getattr(diffusers, class_name)(**cfg).eval().requires_grad_(False)

    return build


FAMILIES: dict[str, Family] = {
    "flux": Family("FLUX.1-dev", "flux.1-dev", "1 double + 1 single", False,
                   _flux_config, _builder("FluxTransformer2DModel"), _flux_inputs, 2),
    "flux2": Family("FLUX.2-dev", "flux.2-dev", "1 double + 1 single", False,
                    _flux2_config, _builder("Flux2Transformer2DModel"), _flux2_inputs, 2),
    "qwenimage": Family("Qwen-Image", "qwen-image", "2 double", False,
                        _qwen_config, _builder("QwenImageTransformer2DModel"), _qwen_inputs, 2),
    "sd3": Family("SD3.5-Large", "sd3.5-large", "2 joint", False,
                  _sd3_config, _builder("SD3Transformer2DModel"), _sd3_inputs, 2),
    "zimage": Family("Z-Image", "z-image", "1 refiner + 1 main (+1 text)", False,
                     _zimage_config, _builder("ZImageTransformer2DModel"), _zimage_inputs, 3),
    "wan": Family("Wan 2.1-1.3B", "wan2.1-1.3b", "2 blocks", True,
                  _wan_config("wan2.1-1.3b", 8960), _builder("WanTransformer3DModel"), _wan_inputs, 4),
    "wan14b": Family("Wan 2.1-14B", "wan2.1-14b", "2 blocks", True,
                     _wan_config("wan2.1-14b", 13824), _builder("WanTransformer3DModel"), _wan_inputs, 4),
}  # fmt: skip
DEFAULT_FAMILIES = ["flux", "flux2", "qwenimage", "sd3", "zimage", "wan"]


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every weight random (diffusers zero-initialises some output layers: the check needs all paths)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def forward(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)[0]
    return torch.stack(out) if isinstance(out, list) else out  # Z-Image returns a list per sample


# --------------------------------------------------------------------------- checks and timing
def check(fam: Family, radius: int, rt: int | None, backend: str) -> dict:
    """On the family's small model: CLEAR beyond the grid == full; CLEAR r differs; the floor is a floor."""
    model = randomize(fam.build(fam.config(True)))
    grid = (3, 10, 12) if fam.video else (1, 12, 20)
    inputs = fam.inputs(model, grid, 8, torch.Generator().manual_seed(1))
    full = forward(model, inputs)
    far = sum(grid) + 1
    handle = cleardit.linearize(
        model, radius=far, temporal_radius=far if fam.video else None, backend=backend
    )
    beyond = forward(model, inputs)
    handle.restore()
    handle = cleardit.linearize(model, radius=radius, temporal_radius=rt, backend=backend)
    windowed = forward(model, inputs)
    handle.restore()
    calls = [0]
    with no_attention(calls):
        floor = forward(model, inputs)
    result = dict(
        beyond_error=max_abs_error(beyond, full),
        windowed_diff=max_abs_error(windowed, full),
        floor_diff=max_abs_error(floor, full),
        floor_calls=calls[0],
    )
    result["ok"] = (
        result["beyond_error"] <= CHECK_TOL
        and result["windowed_diff"] > 1e-3
        and result["floor_diff"] > 1e-3
        and calls[0] == fam.attention_layers
    )
    return result


def time_family(model, inputs, radius, rt, backend, reps, warmup) -> dict[str, list[float]]:
    """Seconds per forward of full, CLEAR and floor, in turn (full CLEAR floor full ...) after
    ``warmup`` rounds; switching between them (linearize / restore / patch) is not timed."""
    timer = Timer("cpu")
    handle = None

    def run(name):
        nonlocal handle
        if name == "clear":
            handle = cleardit.linearize(model, radius=radius, temporal_radius=rt, backend=backend)
        try:
            with no_attention() if name == "floor" else contextlib.nullcontext():
                return timer(lambda: forward(model, inputs))
        finally:
            if handle is not None:
                handle.restore()
                handle = None

    samples = {name: [] for name in ("full", "clear", "floor")}
    for i in range(warmup + reps):
        for name in samples:
            seconds = run(name)
            if i >= warmup:
                samples[name].append(seconds)
    return samples


def parse_grid(text: str, dims: int, what: str) -> tuple[int, ...]:
    parts = text.lower().split("x")
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != dims or min(values) < 1:
        example = "96x128" if dims == 2 else "13x30x52"
        raise argparse.ArgumentTypeError(
            f"{what} {text!r}: expected {dims} whole numbers >= 1 like {example}"
        )
    return values


def parse_families(text: str) -> list[str]:
    names = [n.strip().lower() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in FAMILIES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown family {', '.join(unknown) or repr(text)}; choose from: {', '.join(FAMILIES)}"
        )
    return names


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--family",
        type=parse_families,
        default=None,
        help=f"comma-separated, from {', '.join(FAMILIES)} (default: {','.join(DEFAULT_FAMILIES)})",
    )
    ap.add_argument("--grid", default="96x128", help="image families: H x W tokens (default 96x128)")
    ap.add_argument(
        "--video-grid", default="13x30x52", help="video: T x H x W latent tokens (default 13x30x52)"
    )
    ap.add_argument(
        "--text-len", type=int, default=None, help="text tokens (default: each family pipeline's)"
    )
    ap.add_argument("--radius", type=int, default=8, help="CLEAR radius in tokens (default 8)")
    ap.add_argument(
        "--temporal-radius",
        type=int,
        default=2,
        help="video: CLEAR radius in latent frames (default 2; 0 = every frame)",
    )
    ap.add_argument(
        "--heads",
        type=int,
        default=None,
        help="attention heads instead of each family's published count (head dim kept; every "
        "width that is heads x head dim follows): a cheaper model, NOT the family's geometry",
    )
    ap.add_argument("--reps", type=int, default=2, help="timed rounds after the warm-up (default 2)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="flux + wan with 2 heads (--heads 2), 32x48 image / 5x16x24 video tokens, 64 text tokens, "
        "1 timed round",
    )
    ap.add_argument("--dry-run", action="store_true", help="the small check models at tiny grids (tests)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    add_backend_option(ap)
    args = ap.parse_args(argv)
    try:
        grid2 = parse_grid(args.grid, 2, "--grid")
        grid3 = parse_grid(args.video_grid, 3, "--video-grid")
    except argparse.ArgumentTypeError as exc:
        ap.error(str(exc))
    for flag, value, low in (
        ("--radius", args.radius, 1),
        ("--reps", args.reps, 1),
        ("--warmup", args.warmup, 0),
        ("--temporal-radius", args.temporal_radius, 0),
        ("--text-len", args.text_len or 1, 1),
        ("--heads", args.heads or 1, 1),
    ):
        if value < low:
            ap.error(f"{flag} must be >= {low}, got {value}")
    rt = args.temporal_radius or None
    families, text_len, reps = args.family or DEFAULT_FAMILIES, args.text_len, args.reps
    if args.quick or args.dry_run:
        families = args.family or ["flux", "wan"]
        grid2, grid3, text_len, reps = (32, 48), (5, 16, 24), text_len or 64, 1
        args.heads = args.heads or 2  # published head dim, 2 heads: the real widths take minutes here
    if args.dry_run:
        families = args.family or DEFAULT_FAMILIES
        grid2, grid3, text_len = (12, 20), (3, 10, 12), args.text_len or 8

    print(machine_header("cpu"))
    print(
        f"STEP-CPU: one 2-layer transformer forward, fp32, batch 1, random weights; CLEAR r={args.radius}"
        f" (video rt={rt if rt else 'None (every frame)'}), backend {args.backend}; "
        f"{args.warmup} warm-up + {reps} timed round(s), medians"
        + (" [dry run: the small check models]" if args.dry_run else "")
        + (
            f" [--heads {args.heads}: NOT the published head counts]"
            if args.heads and not args.dry_run
            else ""
        )
    )

    print("correctness (small model per family, every weight random):")
    checks = {}
    for name in families:
        fam = FAMILIES[name]
        c = checks[name] = check(fam, args.radius, rt if fam.video else None, args.backend)
        print(
            f"  {name:9s} CLEAR beyond the grid vs full: max abs err {c['beyond_error']:.1e}; "
            f"CLEAR r={args.radius} vs full: {c['windowed_diff']:.2e} (must differ); floor: "
            f"{c['floor_calls']}/{fam.attention_layers} attention ops replaced, output differs "
            f"by {c['floor_diff']:.2e} -> {'ok' if c['ok'] else 'FAILED'}"
        )
    if not all(c["ok"] for c in checks.values()):
        print("correctness FAILED: nothing timed")
        return 1

    rows, results = [], []
    load = OtherLoad()
    for name in families:
        fam = FAMILIES[name]
        cfg = fam.config(args.dry_run, args.heads)
        grid = grid3 if fam.video else (1, *grid2)
        text = text_len or fam.text_len
        start = time.perf_counter()
        torch.manual_seed(0)
        model = fam.build(cfg)
        inputs = fam.inputs(model, grid, text, torch.Generator().manual_seed(1))
        built = time.perf_counter() - start
        samples = time_family(model, inputs, args.radius, rt if fam.video else None, args.backend,
                              reps, args.warmup)  # fmt: skip
        del model, inputs
        med = {k: statistics.median(v) for k, v in samples.items()}
        heads = cfg.get("num_attention_heads") or cfg["n_heads"]
        dim = cfg.get("attention_head_dim") or cfg["dim"] // heads
        size = "x".join(str(n) for n in (grid if fam.video else grid[1:]))
        rows.append([
            name, f"{heads}x{dim}", fam.layers, size, text, fmt_ms(med["full"]), fmt_ms(med["clear"]),
            fmt_ms(med["floor"]), f"{med['full'] / med['clear']:.2f}x", f"{med['clear'] / med['floor']:.2f}",
            f"{max(spread(v) for v in samples.values()):.0%}" if reps > 1 else "-",
        ])  # fmt: skip
        results.append(dict(family=name, model=fam.label, heads=heads, head_dim=dim, layers=fam.layers,
                            grid=list(grid), text_len=text, radius=args.radius,
                            temporal_radius=rt if fam.video else None, build_s=built,
                            samples_s=samples, check=checks[name]))  # fmt: skip
        print(
            f"  {name}: built in {built:.0f} s; full {fmt_ms(med['full'])} ms, "
            f"CLEAR {fmt_ms(med['clear'])} ms, floor {fmt_ms(med['floor'])} ms",
            flush=True,
        )
    other = load.share()
    print()
    print_table(["family", "heads", "layers", "tokens", "text", "full ms", f"CLEAR r={args.radius} ms",
                 "floor ms", "speedup", "CLEAR/floor", "spread"], rows)  # fmt: skip
    print("spread: the largest (max - min) / median of one contender's timed rounds (machine noise)")
    if other is not None:
        print(f"other processes used {other:.0%} of the machine's CPU time during the timing")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(machine=machine_header("cpu"), results=results), indent=2))
    print(
        "headline: full / CLEAR (CLEAR / floor) per family: "
        + "; ".join(f"{r[0]} {r[8]} ({r[9]})" for r in rows)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
