"""The package's bundled evaluation prompts (``cleardit.eval.prompts``) are what the lab says they are:
held-out captions of the mini model's grammar, in canonical form, with the shapes it learns."""

from mini_lab.dataset import BASIC_SHAPES, caption, parse_caption
from mini_lab.trainer import heldout_scenes

from cleardit.eval import bundled_prompts_path, load_prompts


def test_bundled_prompts_are_held_out_captions_of_the_mini_grammar():
    path = bundled_prompts_path()
    assert path.is_file() and path.name == "mini_prompts.txt" and path.parent.name == "eval"
    prompts = load_prompts()
    assert len(prompts) == 50 and len(set(prompts)) == 50
    for text in prompts:
        scene = parse_caption(text)  # the adherence checker's parser
        assert caption(scene) == text  # canonical form, nothing the grammar would rewrite
        assert {o.shape for o in scene.objects} <= set(BASIC_SHAPES)  # the shapes the model learns
    # the trainer's held-out stream (never trained on), as prompts.py says
    assert prompts == [s.caption() for s in heldout_scenes(50, 0)]
