"""Patch-parallel CLEAR on CPU with gloo: exactness vs one process, failures, byte accounting.

Each world size is launched once (forkserver with torch/diffusers preloaded, so a launch costs a
fork, not an import) and runs all its cases; the workers return errors, the tests assert.
"""

from __future__ import annotations

import os
import re
import signal
import time

import pytest
import torch
import torch.multiprocessing as mp

import cleardit
from cleardit.attention import TokenLayout, clear_attention
from cleardit.parallel import (
    CommCounter,
    ParallelLaunchError,
    StripPlan,
    spawn,
    step_comm_bytes,
    strip_clear_attention,
)
from tests.helpers import make_inputs

START = "forkserver"
PRELOAD = [
    "torch",
    "diffusers",
    "cleardit",
    "cleardit.parallel",
    "cleardit.models.flux",
    "cleardit.models.strips",
]

# (text_len, height, width, text_first, down_factor, radius)
ATTENTION_CASES = [
    (3, 7, 5, True, None, 3),
    (0, 9, 4, True, None, 2),
    (4, 5, 6, False, None, 4),  # text after the image
    (2, 6, 5, True, 2, 5),  # strips thinner than the band at 3-4 ranks
    (3, 10, 7, True, 4, 2),  # pool blocks straddle strips, df > r
    (2, 4, 9, True, None, 1),
    (2, 5, 4, True, None, 30),  # radius beyond the grid: every rank needs every row
]

# height, width, text_len, radius, down_factor, batch, exchange, text_merge (, backend of the parallel run)
FLUX_CASES = {
    2: [
        dict(h=7, w=5, t=4, r=3, df=None, b=1, exchange="input", merge="exact"),
        dict(h=9, w=6, t=3, r=4, df=2, b=2, exchange="input", merge="exact"),
        dict(h=7, w=5, t=4, r=3, df=None, b=1, exchange="kv", merge="exact"),
        dict(h=7, w=5, t=4, r=3, df=None, b=1, exchange="input", merge="average"),
        dict(h=12, w=9, t=4, r=4, df=2, b=1, exchange="input", merge="exact", backend="tiled"),
    ],
    3: [
        dict(h=8, w=5, t=3, r=5, df=None, b=1, exchange="input", merge="exact"),  # strips 3,3,2 < band 4
        dict(h=10, w=5, t=2, r=3, df=4, b=1, exchange="input", merge="exact"),
    ],
    4: [
        dict(h=6, w=4, t=3, r=4, df=2, b=1, exchange="input", merge="exact"),  # strips 2,2,1,1
        dict(h=9, w=7, t=5, r=2, df=4, b=1, exchange="kv", merge="exact"),
    ],
}


@pytest.fixture(scope="module", autouse=True)
def _forkserver_preload():
    mp.get_context(START).set_forkserver_preload(PRELOAD)


def _local_index(layout: TokenLayout, plan: StripPlan, rank: int) -> torch.Tensor:
    y0, y1 = plan.strip(rank)
    text = torch.arange(layout.text_start, layout.text_start + layout.text_len)
    image = layout.image_start + torch.arange(y0 * layout.width, y1 * layout.width)
    return torch.cat([text, image] if layout.text_first else [image, text])


def _attention_worker(rank: int, world: int) -> list[float]:
    errors = []
    for i, (t, h, w, first, df, r) in enumerate(ATTENTION_CASES):
        layout = TokenLayout(t, h, w, text_first=first, down_factor=df)
        q, k, v, pw = make_inputs(layout, batch=2, heads=2, dim=8, seed=i)
        ref, ref_lse = clear_attention(
            q, k, v, layout, r, pool_weight=pw, return_lse=True, backend="reference"
        )
        idx = _local_index(layout, StripPlan(h, w, world, r, df), rank)
        out, lse = strip_clear_attention(
            q[:, :, idx], k[:, :, idx], v[:, :, idx], layout, r, pool_weight=pw, return_lse=True,
            backend="reference", timeout_s=30,
        )  # fmt: skip
        errors.append(
            max((out - ref[:, :, idx]).abs().max().item(), (lse - ref_lse[:, :, idx]).abs().max().item())
        )
    return errors


def _random_pool_weights(handle, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in handle.named_clear_parameters():
            if name.endswith("spatial_weight"):
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def _flux_worker(rank: int, world: int) -> list[dict]:
    from cleardit.models.tiny import flux_inputs, tiny_flux_transformer
    from cleardit.parallel import parallelize

    results = []
    for i, c in enumerate(FLUX_CASES[world]):
        model = tiny_flux_transformer(seed=i)
        inputs = flux_inputs(model, c["h"], c["w"], text_len=c["t"], batch=c["b"], seed=10 + i)
        handle = cleardit.linearize(model, radius=c["r"], down_factor=c["df"], backend="reference", tile=None)
        _random_pool_weights(handle, seed=i)
        pool = {n: p.detach().clone() for n, p in handle.named_clear_parameters() if "spatial" in n}
        with torch.no_grad():
            expected = model(**inputs).sample
        handle.restore()

        counter = CommCounter()
        par = parallelize(
            model, radius=c["r"], down_factor=c["df"], backend=c.get("backend", "reference"),
            exchange=c["exchange"], text_merge=c["merge"], counter=counter, timeout_s=30,
        )  # fmt: skip
        with torch.no_grad():
            for n, p in par.named_clear_parameters():
                if n in pool:
                    p.copy_(pool[n])
            got = model(**inputs).sample
            as_tuple = model(**inputs, return_dict=False)[0]
        cfg = model.config
        dry = step_comm_bytes(
            StripPlan(c["h"], c["w"], world, c["r"], c["df"]), layers=len(model.transformer_blocks)
            + len(model.single_transformer_blocks), out_channels=cfg.in_channels, batch=c["b"],
            heads=cfg.num_attention_heads, head_dim=cfg.attention_head_dim, text_len=c["t"], elem_bytes=4,
            exchange=c["exchange"], input_dim=cfg.num_attention_heads * cfg.attention_head_dim,
            text_merge=c["merge"],
        )[rank]  # fmt: skip
        par.restore()
        results.append(
            dict(
                case=c,
                error=(got - expected).abs().max().item(),
                shape_ok=got.shape == expected.shape and torch.equal(as_tuple, got),
                measured=counter.by_kind(step=1),
                dry=dry,
                layers=sorted(k for k in counter.by_layer(step=1) if k is not None),
            )
        )
    if world == 2:  # gather_output=False: each rank gets its own strip of the output
        par = parallelize(model, radius=c["r"], down_factor=c["df"], backend="reference", gather_output=False)
        with torch.no_grad():
            for n, p in par.named_clear_parameters():
                if n in pool:
                    p.copy_(pool[n])
            strip = model(**inputs).sample
        y0, y1 = StripPlan(c["h"], c["w"], world, c["r"]).strip(rank)
        own = expected[:, y0 * c["w"] : y1 * c["w"]]
        results.append(
            dict(strip_error=(strip - own).abs().max().item() if strip.shape == own.shape else 1.0)
        )
        par.restore()
    if world == 4:  # a grid with fewer rows than ranks must be refused clearly
        model = tiny_flux_transformer()
        parallelize(model, radius=2, backend="reference")
        try:
            model(**flux_inputs(model, 3, 8))
        except ValueError as exc:
            results.append(dict(refused=str(exc)))
    return results


def _run_world(world: int):
    return spawn(_flux_worker, world, timeout_s=60, deadline_s=100, start_method=START)


@pytest.mark.parametrize("world", [2, 3, pytest.param(4, marks=pytest.mark.slow)])  # 3: a middle strip
def test_flux_patch_parallel_equals_one_process(world):
    start = time.monotonic()
    attention = spawn(_attention_worker, world, timeout_s=60, deadline_s=100, start_method=START)
    for rank_errors in attention:
        for case, err in zip(ATTENTION_CASES, rank_errors, strict=True):
            assert err <= 1e-5, f"strip_clear_attention {case} at {world} ranks: error {err:.3g}"
    results = _run_world(world)
    for rank, rank_results in enumerate(results):
        for res in rank_results:
            if "strip_error" in res:
                assert res["strip_error"] <= 1e-5
                continue
            if "refused" in res:
                assert "4 ranks but the image grid has only 3 token rows" in res["refused"]
                continue
            c = res["case"]
            assert res["shape_ok"]
            assert res["measured"] == res["dry"], (
                f"rank {rank} {c}: counted bytes differ from the dry accounting"
            )
            assert res["layers"] == [0, 1, 2, 3] and res["measured"]["halo"] > 0
            if c["merge"] == "exact":
                assert res["error"] <= 1e-5, f"rank {rank} {c}: max error {res['error']:.3g}"
            else:  # the paper's averaging approximation: runs, differs from exact
                print(
                    f"text_merge='average' at {world} ranks, {c}: max deviation from exact {res['error']:.3g}"
                )
                assert 0 < res["error"] < float("inf")
    if world == 4:
        assert all(any("refused" in r for r in rank_results) for rank_results in results)
    print(f"{world} ranks: {time.monotonic() - start:.1f}s")


def _failing_worker(rank: int, world: int, mode: str) -> None:
    layout = TokenLayout(2, 8, 4)
    q, k, v, _ = make_inputs(layout, batch=1, heads=1, dim=4)
    idx = _local_index(layout, StripPlan(8, 4, world, 3), rank)
    for step in range(1000):
        if step == 3 and rank == 1:
            if mode == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(120)  # stuck
        strip_clear_attention(q[:, :, idx], k[:, :, idx], v[:, :, idx], layout, 3, backend="reference")


@pytest.mark.parametrize("mode,timeout", [("kill", 10.0), ("stuck", 3.0)])
def test_dead_or_stuck_rank_fails_the_others_within_the_timeout(mode, timeout):
    with pytest.raises(ParallelLaunchError) as info:
        spawn(_failing_worker, 2, (mode,), timeout_s=timeout, grace_s=2, deadline_s=60, start_method=START)
    err = info.value
    assert err.exitcodes[0] == 1, err
    message = err.failures[0]
    assert "ParallelError: rank 0 of 2: halo exchange (k/v)" in message and "a peer rank died" in message
    waited = float(re.search(r"failed after ([0-9.]+)s", message).group(1))
    assert waited <= timeout + 1.0
    expected_1 = "killed by signal SIGKILL" if mode == "kill" else "killed: still running"
    assert err.failures[1].startswith(expected_1), err.failures[1]


def test_more_ranks_than_rows_is_a_clear_error():
    with pytest.raises(ValueError, match="5 ranks but the image grid has only 4 token rows"):
        StripPlan(4, 10, 5, 3)
    plan = StripPlan(4, 10, 4, 3)
    assert [plan.strip(r) for r in range(4)] == [(0, 1), (1, 2), (2, 3), (3, 4)]


def test_strip_plan_balances_rows_and_reaches_past_thin_neighbours():
    plan = StripPlan(10, 3, 4, radius=4, down_factor=4)
    assert [plan.rows(r) for r in range(4)] == [3, 3, 2, 2]
    assert plan.needed_rows(2) == (3, 10)  # band of 3 rows each side (clipped at the bottom)
    assert plan.pooled_rows(1) == (1, 2) and plan.needed_rows(1) == (0, 9)  # block rows 4..7, band to 8
    sources = {src for src, dst, _, _ in plan.transfers() if dst == 3}
    assert sources == {1, 2}  # rank 3 (rows 8-9) needs rows 5..7: from rank 1 and rank 2
    for src, dst, a, b in plan.transfers():
        y0, y1 = plan.strip(src)
        assert y0 <= a < b <= y1 and src != dst


def test_eight_k_eight_ranks_moves_under_a_quarter_of_ulysses():
    # FLUX.1-dev: 24 heads x 128, 512 text tokens, 57 layers, bf16; 8K image = 512 x 512 tokens.
    heads, d, text, layers, h = 24, 128, 512, 57, 512
    plan = StripPlan(h, h, 8, radius=16)
    per_rank = step_comm_bytes(
        plan, layers=layers, out_channels=64, batch=1, heads=heads, head_dim=d, text_len=text, elem_bytes=2
    )
    ours = sum(sum(r.values()) for r in per_rank)
    seq = text + h * h
    ulysses = layers * 4 * seq * heads * d * 2 * (8 - 1) // 8  # q, k, v, out all-to-all, summed over ranks
    assert ours < ulysses / 4, f"{ours / ulysses:.3f} of Ulysses"


def test_single_rank_needs_no_exchange_and_bad_arguments_are_refused():
    assert StripPlan(5, 5, 1, 3).transfers() == []
    with pytest.raises(ValueError, match="radius must be >= 1"):
        StripPlan(5, 5, 2, 0)
    with pytest.raises(ValueError, match="world_size must be a positive int"):
        spawn(print, 0)
