"""Train the shipped mini text-to-image model (the trainer is ``mini_lab/trainer.py``).

    python examples/mini_model/train.py                 # the shipped recipe, into src/cleardit/mini/weights
    python examples/mini_model/train.py --resume        # continue after an interruption
    python examples/mini_model/train.py --quick --output out/mini-quick   # a smoke run
    python examples/mini_model/train.py --help

Run from the repository root with cleardit installed (``make install``); nothing else is needed.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # mini_lab, also when imported from elsewhere

from mini_lab.trainer import main, reexec_with_passive_openmp  # noqa: E402

if __name__ == "__main__":
    reexec_with_passive_openmp(__file__)
    sys.exit(main())
