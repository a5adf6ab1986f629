"""One rule for independent random streams: a seed derived from (seed, *keys).

Training code seeds every step's randomness from (run seed, stream, step, ...) rather than from a
generator that runs across steps, so a resumed or re-sharded run draws exactly the same numbers.
"""

from __future__ import annotations

import numpy as np


def derive_seed(seed: int, *keys: int) -> int:
    """A 32-bit seed from (seed, *keys); different keys give independent streams (numpy SeedSequence)."""
    return int(np.random.SeedSequence([int(seed), *map(int, keys)]).generate_state(1, dtype=np.uint32)[0])
