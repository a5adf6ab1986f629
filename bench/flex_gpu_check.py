"""Check the flex backend's CUDA path at a real size (block mask built with the compiled builder):
2K grid, T=512, bf16, 24 heads, d=128, r=16, against the Triton kernel; prints the max difference."""

import sys
import time

import torch

from cleardit.attention import TokenLayout, clear_attention


def main() -> int:
    layout = TokenLayout(512, 128, 128, tile=(8, 16))
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (
        torch.randn(1, 24, layout.seq_len, 128, device="cuda", dtype=torch.bfloat16, generator=g)
        for _ in range(3)
    )
    start = time.perf_counter()
    flex = clear_attention(q, k, v, layout, 16, backend="flex")
    torch.cuda.synchronize()
    print(
        f"flex first call (mask + compile) {time.perf_counter() - start:.1f} s, peak memory "
        f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
    )
    tri = clear_attention(q, k, v, layout, 16, backend="triton")
    err = (flex.float() - tri.float()).abs().max().item()
    print(f"max |flex - triton| = {err:.3e}")
    return 0 if err < 3e-2 else 1


if __name__ == "__main__":
    sys.exit(main())
