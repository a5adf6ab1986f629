#!/usr/bin/env python
"""ATTN-GPU: one CLEAR attention call on the GPU, the fused Triton kernels against dense and flex.

Problem (docs: /work/shared/BENCHMARKS.md): bf16, 24 heads, d = 128, 512 text tokens, image grids
128^2 (2K), 256^2 (4K), 512^2 (8K), radius 8 / 16 / 32. Contenders, run alternately after a warm-up:
  * triton : cleardit's fused block-sparse kernels, image tokens in tile-major order (8 x 16 tiles)
  * sdpa   : dense F.scaled_dot_product_attention (flash backend), no mask: the quadratic baseline
  * flex   : torch FlexAttention (compiled) with the raster-order block mask of the same rule
             (128-token blocks, mask_mod from the rule), as the reference implementation does.
Useful TFLOP/s = 4 * d * heads * (allowed pairs) / time (x3.5 with --fwd-bwd); for dense SDPA all
N^2 pairs count. Correctness is checked first at a small size against the fp32 reference; a wrong
kernel aborts the run. The last line is the headline.

  python bench/attention_gpu.py              # full run (~3 min on an H100 with compiles)
  python bench/attention_gpu.py --quick      # 2K and 4K, r = 8 and 16
  python bench/attention_gpu.py --fwd-bwd    # time forward + backward
  python bench/attention_gpu.py --dry-run    # tiny sizes on the CPU (Triton interpreter): CI check
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="grids 128 and 256, radii 8 and 16, 3 repetitions")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU with TRITON_INTERPRET=1")
    p.add_argument("--fwd-bwd", action="store_true", help="time forward + backward instead of forward")
    p.add_argument("--grids", type=int, nargs="+", help="square image grid sides (tokens)")
    p.add_argument("--radii", type=int, nargs="+", help="radii (tokens)")
    p.add_argument("--heads", type=int, default=24)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--text", type=int, default=512)
    p.add_argument("--reps", type=int, default=None, help="alternating repetitions per contender")
    p.add_argument("--no-flex", action="store_true", help="skip FlexAttention")
    for name in ("fwd-n", "dq-n", "dkv-m"):
        p.add_argument(f"--{name}", type=int, help="triton chunk size override (tuning)")
    return p.parse_args(argv)


def machine_info(torch, device) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = "missing"
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton interpreter)"
    return f"machine: {cpu}, {os.cpu_count()} cores | torch {torch.__version__} | triton {tv} | device: {dev}"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    try:
        import cleardit  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(ROOT / "src"))

    import torch
    import torch.nn.functional as F

    from cleardit.attention import TokenLayout, clear_attention, count_pairs, initial_pool_weight
    from cleardit.attention import triton_kernels as tk

    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not args.dry_run:
        print("no CUDA device: run with --dry-run for the CPU check", file=sys.stderr)
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16
    if args.dry_run:
        heads, d, text, grids, radii, reps = 2, 16, 16, [(8, 16)], [3], 2
        flex_block = 16
    else:
        heads, d, text = args.heads, args.head_dim, args.text
        grids = [(g, g) for g in (args.grids or ([128, 256] if args.quick else [128, 256, 512]))]
        radii = args.radii or ([8, 16] if args.quick else [8, 16, 32])
        reps = args.reps or (3 if args.quick else 5)
        flex_block = 128
    tile = tk.preferred_tile(d)
    mode = "forward+backward" if args.fwd_bwd else "forward"
    flop_factor = 3.5 if args.fwd_bwd else 1.0

    print(machine_info(torch, device))
    print(
        f"ATTN-GPU ({mode}): {dtype}, heads={heads}, d={d}, text={text}, grids={grids}, radii={radii}, "
        f"triton tile={tile}, flex block={flex_block}, reps={reps}"
    )
    t_start = time.perf_counter()

    def sync():
        if cuda:
            torch.cuda.synchronize()

    # ---- contenders ----------------------------------------------------------------------------
    chunks = {"fwd_n": args.fwd_n, "dq_n": args.dq_n, "dkv_m": args.dkv_m}

    def triton_fn(layout, radius):
        def run(q, k, v):
            out, _ = tk.triton_clear_attention(q, k, v, layout, radius, None, None, d**-0.5, False, **chunks)
            return out

        return run

    def sdpa_fn():
        def run(q, k, v):
            if cuda:
                from torch.nn.attention import SDPBackend, sdpa_kernel

                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    return F.scaled_dot_product_attention(q, k, v)
            return F.scaled_dot_product_attention(q, k, v)

        return run

    flex = None
    if args.dry_run:
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
    if args.dry_run and args.fwd_bwd:
        print("flex skipped: FlexAttention has no backward on the CPU")
    elif not args.no_flex:
        try:
            from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

            flex = torch.compile(flex_attention, dynamic=False) if cuda else flex_attention
        except Exception as exc:  # pragma: no cover - depends on the torch build
            print(f"FlexAttention unavailable: {exc!r}")

    # ONE mask_mod for every grid and radius: its rule lives in captured 0-dim tensors that are set
    # before each call, so a new radius never recompiles (only a new sequence length does)
    rule_t, rule_w, rule_r2 = (torch.zeros((), dtype=torch.int64, device=device) for _ in range(3))

    def set_rule(layout, radius):
        rule_t.fill_(layout.text_len)
        rule_w.fill_(layout.width)
        rule_r2.fill_(radius * radius)

    def mask_mod(b, h, q_idx, kv_idx):
        qi, ki = q_idx - rule_t, kv_idx - rule_t
        qy, ky = qi // rule_w, ki // rule_w
        qx, kx = qi - qy * rule_w, ki - ky * rule_w
        return (
            (q_idx < rule_t) | (kv_idx < rule_t) | ((qy - ky) * (qy - ky) + (qx - kx) * (qx - kx) < rule_r2)
        )

    def flex_block_mask(layout, radius, exact_check=False):
        """The raster-order block mask of the rule, built from block geometry (create_block_mask would
        materialise N x N booleans: 69 GB at 8K); at small sizes compared with create_block_mask."""
        n, b = layout.seq_len, flex_block
        blocks = tk.image_blocks(layout.height, layout.width, None, b)
        ok = layout.text_first and layout.text_len % b == 0 and all(s == b for *_, s in blocks)
        set_rule(layout, radius)
        if not ok or exact_check:
            ref = create_block_mask(mask_mod, None, None, n, n, device=device, BLOCK_SIZE=b)
            if not ok:
                return ref
        nt, ni = layout.text_len // b, len(blocks)
        cls = torch.full((nt + ni, nt + ni), 2, dtype=torch.int8, device=device)
        cls[nt:, nt:] = tk.classify_block_pairs(torch.tensor(blocks, device=device), radius)

        def lists(sel):
            num = sel.sum(-1).to(torch.int32)
            order = torch.argsort((~sel).to(torch.int8), dim=-1, stable=True).to(torch.int32)
            return num[None, None], order[None, None].contiguous()

        num, idx = lists(cls == 1)
        fnum, fidx = lists(cls == 2)
        bm = BlockMask.from_kv_blocks(
            num, idx, fnum, fidx, BLOCK_SIZE=b, mask_mod=mask_mod, seq_lengths=(n, n)
        )
        if exact_check:
            for name in ("kv_num_blocks", "full_kv_num_blocks"):
                assert torch.equal(getattr(bm, name).cpu(), getattr(ref, name).cpu()), name
            for num_name, name in (
                ("kv_num_blocks", "kv_indices"),
                ("full_kv_num_blocks", "full_kv_indices"),
            ):
                counts = getattr(bm, num_name)[0, 0].cpu()
                a, e = getattr(bm, name)[0, 0].cpu(), getattr(ref, name)[0, 0].cpu()
                for row in range(counts.numel()):
                    c = int(counts[row])
                    assert torch.equal(a[row, :c].sort().values, e[row, :c].sort().values), (name, row)
        return bm

    def flex_fn(layout, radius):
        bm = flex_block_mask(layout, radius)

        def run(q, k, v):
            set_rule(layout, radius)
            return flex(q, k, v, block_mask=bm, scale=d**-0.5)

        return run

    # ---- correctness first ---------------------------------------------------------------------
    def check(name, fn, layout, radius, tol, grads, pool_weight=None):
        """fn(q, k, v) -> out vs the fp32 reference (and the gradients of q, k, v when grads)."""
        g = torch.Generator().manual_seed(0)
        shape = (1, 2, layout.seq_len, d)
        q, k, v = (torch.randn(shape, generator=g).to(device, dtype) for _ in range(3))
        leaves = [t.clone().requires_grad_(grads) for t in (q, k, v)]
        ref_leaves = [t.float().requires_grad_(grads) for t in (q, k, v)]
        pw = None if pool_weight is None else pool_weight.to(device)
        ref = clear_attention(*ref_leaves, layout, radius, pool_weight=pw, backend="reference")
        out = fn(*leaves)
        err = (out.float() - ref).abs().max().item()
        msg = f"check {name:6s} {layout.height}x{layout.width} T={layout.text_len} df={layout.down_factor} "
        msg += f"r={radius}: out err {err:.2e}"
        bad = not err <= tol
        if grads:
            w = torch.randn(ref.shape, generator=g).to(device)
            (ref * w).sum().backward()
            (out.float() * w).sum().backward()
            pairs = zip(leaves, ref_leaves, strict=True)
            gerr = max((a.grad.float() - b.grad).abs().max().item() for a, b in pairs)
            msg += f", grad err {gerr:.2e}"
            bad = bad or not gerr <= 4 * tol
        print(msg + (" FAILED" if bad else " ok"))
        return not bad

    if args.dry_run:
        small = [(TokenLayout(8, 9, 11, tile=tile), 3)]
        pooled = TokenLayout(8, 8, 8, down_factor=4, tile=tile)
        flex_small = (TokenLayout(16, 8, 16), 3)
    else:
        small = [(TokenLayout(16, 40, 36, tile=tile), 8), (TokenLayout(16, 33, 50, tile=tile), 16)]
        pooled = TokenLayout(16, 36, 40, down_factor=4, tile=tile)
        flex_small = (TokenLayout(128, 16, 64), 8)
    # the backward kernels are checked even when only the forward is timed
    good = all(check("triton", triton_fn(lay, r), lay, r, 3e-2, True) for lay, r in small)
    pw = initial_pool_weight(4) + 0.05 * torch.randn(4, 4, generator=torch.Generator().manual_seed(1))

    def pooled_fn(q, k, v):
        return clear_attention(q, k, v, pooled, 5, pool_weight=pw.to(device), backend="triton")

    good = check("triton", pooled_fn, pooled, 5, 3e-2, True, pool_weight=pw) and good
    if flex is not None:
        lay, r = flex_small
        try:
            flex_block_mask(lay, r, exact_check=True)
            good = check("flex", flex_fn(lay, r), lay, r, 3e-2, args.fwd_bwd) and good
        except Exception as exc:  # a broken flex must not hide the triton numbers
            print(f"flex disabled: {exc!r}"[:500])
            flex = None
    if not good:
        print("ABORT: a contender disagrees with the reference")
        return 1

    # ---- timing --------------------------------------------------------------------------------
    def timed(fn, q, k, v, iters):
        grad = torch.ones_like(q) if args.fwd_bwd else None

        def once():
            out = fn(q, k, v)
            if grad is not None:  # autograd.grad: no accumulation into .grad between calls
                torch.autograd.grad(out, (q, k, v), grad)

        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                once()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / iters
        t0 = time.perf_counter()
        for _ in range(iters):
            once()
        return (time.perf_counter() - t0) * 1e3 / iters

    rows = []  # (grid, radius, name, ms, useful TFLOP/s)
    for gh, gw in grids:
        layout = TokenLayout(text, gh, gw, tile=tile)  # triton: tile-major; sdpa/flex: raster, same N
        n = layout.seq_len
        g = torch.Generator(device=device).manual_seed(0)
        shape = (1, heads, n, d)
        q, k, v = (
            torch.randn(shape, device=device, dtype=dtype, generator=g).requires_grad_(args.fwd_bwd)
            for _ in range(3)
        )
        contenders = [("sdpa", None, sdpa_fn())]
        for r in radii:
            contenders.append(("triton", r, triton_fn(layout, r)))
            if flex is not None:
                contenders.append(("flex", r, flex_fn(layout.with_tile(None), r)))
        iters = {}
        for name, r, fn in contenders:  # warm-up (compiles, plans), then calibrate ~25 ms per sample
            timed(fn, q, k, v, 1)
            sync()
            t1 = timed(fn, q, k, v, 1)
            iters[(name, r)] = 1 if args.dry_run else max(1, min(200, int(25.0 / max(t1, 1e-3))))
        samples = {(name, r): [] for name, r, _ in contenders}
        for rep in range(reps):
            order = contenders if rep % 2 == 0 else contenders[::-1]
            for name, r, fn in order:
                samples[(name, r)].append(timed(fn, q, k, v, iters[(name, r)]))
        for name, r, _ in contenders:
            ms = statistics.median(samples[(name, r)])
            pairs = n * n if name == "sdpa" else count_pairs(layout, r)
            tflops = flop_factor * 4 * d * heads * pairs / (ms * 1e-3) / 1e12
            rows.append(((gh, gw), r, name, ms, tflops))
            # progressive output, so a run cut short by a time limit still reports what it measured
            print(f"measured {gh}x{gw} r={r} {name}: {ms:.3f} ms, {tflops:.4g} useful TFLOP/s", flush=True)
        del q, k, v
        if cuda:
            torch.cuda.empty_cache()

    # ---- table ---------------------------------------------------------------------------------
    def find(grid, name, r):
        for row in rows:
            if row[0] == grid and row[2] == name and row[1] == r:
                return row
        return None

    print()
    print(f"{'grid':>9} {'N':>7} {'r':>3} {'contender':>9} {'ms':>10} {'useful TFLOP/s':>15} "
          f"{'of dense TFLOP/s':>15} {'speedup vs flex':>15} {'speedup vs sdpa':>15}")  # fmt: skip
    vs_flex, vs_sdpa = [], []
    for grid, r, name, ms, tf in rows:
        dense = find(grid, "sdpa", None)
        fl = find(grid, "flex", r) if name != "sdpa" else None
        frac = tf / dense[4]
        sp_flex = f"{fl[3] / ms:.2f}x" if fl is not None and name == "triton" else "-"
        sp_sdpa = f"{dense[3] / ms:.2f}x" if name != "sdpa" else "-"
        if name == "triton":
            vs_sdpa.append(dense[3] / ms)
            if fl is not None:
                vs_flex.append(fl[3] / ms)
        n = text + grid[0] * grid[1]
        print(f"{grid[0]:>4}x{grid[1]:<4} {n:>7} {r if r else '-':>3} {name:>9} {ms:>10.3f} {tf:>15.4g} "
              f"{frac:>15.1%} {sp_flex:>15} {sp_sdpa:>15}")  # fmt: skip
    geo = lambda xs: math.exp(sum(map(math.log, xs)) / len(xs)) if xs else float("nan")
    big = grids[-1]
    r_head = 16 if 16 in radii else radii[len(radii) // 2]
    tri, dense, fl = find(big, "triton", r_head), find(big, "sdpa", None), find(big, "flex", r_head)
    print(f"\ntotal wall time {time.perf_counter() - t_start:.0f} s ({mode})")
    head = (
        f"HEADLINE: {mode} at {big[0]}x{big[1]} r={r_head}: triton reaches {tri[4] / dense[4]:.0%} of dense "
        f"SDPA's useful TFLOP/s ({tri[4]:.0f} vs {dense[4]:.0f}), {dense[3] / tri[3]:.1f}x faster than SDPA"
    )
    if fl is not None:
        head += f", {fl[3] / tri[3]:.2f}x faster than flex"
    head += f"; geomean over all configs: {geo(vs_sdpa):.1f}x vs SDPA"
    if vs_flex:
        head += f", {geo(vs_flex):.2f}x vs flex"
    print(head)
    return 0


if __name__ == "__main__":
    sys.exit(main())
