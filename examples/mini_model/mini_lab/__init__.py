"""The mini model's training lab: what made ``src/cleardit/mini/weights`` (not part of the package).

* :mod:`.dataset`: procedural scenes of coloured shapes, their captions and renderer.
* :mod:`.adherence`: the programmatic prompt-adherence check of an image against its caption.
* :mod:`.trainer`: the resumable, deterministic trainer (``python examples/mini_model/train.py``).
* :mod:`.train_state`: its checkpoint files.

Scripts beside this package import it as ``mini_lab`` (they put ``examples/mini_model`` on
``sys.path``); everything else comes from the installed ``cleardit`` package.
"""
