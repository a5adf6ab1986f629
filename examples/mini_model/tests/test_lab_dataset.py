"""The mini model's procedural dataset: scenes, captions, rendering."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
import torch
from mini_lab.dataset import (
    BACKGROUNDS,
    BASIC_SHAPES,
    COLORS,
    POSITIONS,
    SHAPES,
    ProceduralDataset,
    Scene,
    SceneObject,
    caption,
    object_box,
    object_colors_allowed,
    object_coverage,
    parse_caption,
    render,
    render_background,
    sample_scene,
    segment_distance,
    vocabulary,
)

# -- scenes and captions ---------------------------------------------------------------------


def test_caption_parse_json_roundtrip():
    seen_kinds, seen_shapes, seen_counts = set(), set(), set()
    for i in range(300):
        scene = sample_scene(i, shapes=SHAPES)
        text = caption(scene)
        parsed = parse_caption(text)
        assert caption(parsed) == text
        # parsing drops only the jitter
        assert parsed == dataclasses.replace(
            scene, objects=tuple(dataclasses.replace(o, dx=0.0, dy=0.0, scale=1.0) for o in scene.objects)
        )
        assert Scene.from_json(scene.to_json()) == scene
        seen_kinds.add(scene.background)
        seen_shapes |= {o.shape for o in scene.objects}
        seen_counts.add(len(scene.objects))
    assert seen_kinds == set(BACKGROUNDS) and seen_shapes == set(SHAPES) and seen_counts == {1, 2, 3}


def test_caption_grammar_examples():
    scene = Scene(
        background="stripes",
        bg_colors=("yellow", "black"),
        orientation="vertical",
        objects=(
            SceneObject("circle", "red", "small", "top left"),
            SceneObject("square", "blue", "large", "center"),
            SceneObject("triangle", "white", "small", "right"),
        ),
    )
    assert caption(scene) == (
        "a small red circle at the top left, a large blue square in the center and a small white "
        "triangle on the right on a yellow and black vertical striped background"
    )
    assert (
        parse_caption(
            "  A small red circle at the top left, a LARGE blue square in the centre and "
            "a small white triangle on the right on a yellow and black vertical striped "
            "background. "
        )
        == scene
    )
    two = (
        "a large green cross at the bottom and a small pink diamond on the left on a red to blue "
        "horizontal gradient background"
    )
    assert caption(parse_caption(two)) == two
    one = "a small cyan triangle at the top right on a white and blue checkered background"
    assert caption(parse_caption(one)) == one


@pytest.mark.parametrize(
    "bad, match",
    [
        ("a red circle at the top left on a plain blue background", "object"),  # no size word
        ("a small red circle at the top left", "expected"),  # no background
        ("a small red hexagon at the top left on a plain blue background", "object"),
        ("a small red circle at the top left on a plain blue and red background", "background"),
        ("a small red circle at the top left on a plain red background", "background colour"),
        (
            "a small red circle at the top and a small blue square at the top on a plain green background",
            "distinct cells",
        ),
        (
            "a small red circle at the top and a small red square on the left on a plain green background",
            "distinct colours",
        ),
    ],
)
def test_parse_caption_rejects(bad, match):
    with pytest.raises(ValueError, match=match):
        parse_caption(bad)


def test_scene_validation():
    obj = SceneObject("circle", "red", "small", "top")
    with pytest.raises(ValueError, match="unknown shape"):
        SceneObject("hexagon", "red", "small", "top")
    with pytest.raises(ValueError, match="needs 2 colour"):
        Scene(background="checks", bg_colors=("blue",), objects=(obj,))
    with pytest.raises(ValueError, match="orientation"):
        Scene(background="stripes", bg_colors=("blue", "green"), objects=(obj,))
    with pytest.raises(ValueError, match="no orientation"):
        Scene(background="plain", bg_colors=("blue",), orientation="vertical", objects=(obj,))
    with pytest.raises(ValueError, match="1..3 objects"):
        Scene(background="plain", bg_colors=("blue",), objects=())


def test_vocabulary_covers_every_caption():
    vocab = set(vocabulary())
    for i in range(200):
        words = re.findall(r"\w+|[^\w\s]", caption(sample_scene(i, shapes=SHAPES)))
        assert set(words) <= vocab
    assert {"circle", "diamond", "cross", "checkered", "gradient", ","} <= vocab


def test_vocabulary_is_the_shipped_tokenizers_word_list():
    """The library fixes the token ids in ``cleardit.mini.vocab.WORDS``; the grammar must make exactly
    those words, and its longest caption must fit the text length with room for <s> and </s>."""
    pytest.importorskip("transformers")
    from cleardit.mini.vocab import MAX_TEXT_TOKENS, WORDS, build_tokenizers

    assert vocabulary() == list(WORDS)
    longest = (
        "a small white triangle at the bottom right, a large black square at the bottom left and a "
        "small yellow circle at the top right on a red to blue vertical gradient background"
    )
    assert caption(parse_caption(longest)) == longest
    clip_tok, t5_tok = build_tokenizers()
    assert len(clip_tok(longest).input_ids) <= MAX_TEXT_TOKENS
    assert len(t5_tok(longest).input_ids) <= MAX_TEXT_TOKENS


def test_sample_scene_constraints_and_determinism():
    for i in range(200):
        s = sample_scene(i)
        assert {o.shape for o in s.objects} <= set(BASIC_SHAPES)
        allowed = object_colors_allowed(s.background, s.bg_colors)
        for o in s.objects:
            assert o.color in allowed and o.color not in s.bg_colors
            if len(s.bg_colors) == 2:
                assert segment_distance(o.color, *s.bg_colors) >= 100
        assert sample_scene(i) == sample_scene(np.random.default_rng(i))
    assert sample_scene(1) != sample_scene(2)
    assert all(len(sample_scene(i, max_objects=1).objects) == 1 for i in range(20))
    assert {sample_scene(i, backgrounds=("plain",)).background for i in range(20)} == {"plain"}


# -- rendering -------------------------------------------------------------------------------


def _pixel(img, x, y):
    return img[int(y), int(x)].astype(int)


def test_render_geometry_and_colors():
    scene = parse_caption(
        "a large red square at the top left, a small blue circle in the center and a large white "
        "triangle at the bottom right on a plain green background"
    )
    for h, w in [(64, 64), (96, 160), (160, 96), (512, 512)]:
        img = render(scene, h, w)
        assert img.shape == (h, w, 3) and img.dtype == np.uint8
        for obj in scene.objects:
            cx, cy, half = object_box(obj, h, w)
            assert (
                np.abs(
                    _pixel(img, cx, cy + (half / 2 if obj.shape == "triangle" else 0)) - COLORS[obj.color]
                ).max()
                <= 1
            )
            if obj.size == "large":  # a square fills its box corners, a triangle does not
                corner = _pixel(img, cx - 0.85 * half, cy - 0.85 * half)
                want = COLORS["red"] if obj.shape == "square" else COLORS["green"]
                assert np.abs(corner - want).max() <= 1
        assert np.abs(_pixel(img, w - 1, 0) - COLORS["green"]).max() <= 1


def test_object_coverage_is_where_render_draws_objects():
    for i, (h, w) in enumerate([(64, 64), (96, 160), (128, 128)]):
        scene = sample_scene(40 + i)
        cover = object_coverage(scene, h, w)
        assert cover.shape == (h, w) and cover.dtype == np.float32
        assert 0 <= cover.min() and cover.max() == 1.0
        drawn = np.abs(render(scene, h, w).astype(np.float32) - render_background(scene, h, w)).max(-1) > 1
        assert not (drawn & (cover == 0)).any()  # nothing drawn outside the coverage
        assert drawn[cover == 1].all()  # object colours stay far from the background's
        for obj in scene.objects:  # each object's centre (its lower half for a triangle) is covered
            cx, cy, half = object_box(obj, h, w)
            y = int(cy + (half / 2 if obj.shape == "triangle" else 0))
            assert cover[y, int(cx)] == 1.0


def test_render_backgrounds():
    obj = (SceneObject("circle", "white", "small", "center"),)
    grad = render(Scene("gradient", ("red", "blue"), obj, "vertical"), 120, 80).astype(int)
    assert np.abs(grad[0, 0] - COLORS["red"]).max() < 6 and np.abs(grad[-1, 0] - COLORS["blue"]).max() < 6
    assert np.abs(grad[:, 0] - grad[:, -1]).max() <= 1  # constant along rows
    hgrad = render(Scene("gradient", ("red", "blue"), obj, "horizontal"), 120, 80).astype(int)
    assert np.abs(hgrad[0, 0] - COLORS["red"]).max() < 6 and np.abs(hgrad[0, -1] - COLORS["blue"]).max() < 6
    stripes = render(Scene("stripes", ("red", "blue"), obj, "horizontal"), 120, 80).astype(int)
    band = 120 // 6
    for k in range(6):
        want = COLORS["red"] if k % 2 == 0 else COLORS["blue"]
        assert np.abs(stripes[k * band + band // 2, 2] - want).max() <= 1
    vstripes = render(Scene("stripes", ("red", "blue"), obj, "vertical"), 120, 80).astype(int)
    assert np.abs(vstripes[2, 80 // 12] - COLORS["red"]).max() <= 1
    assert np.abs(vstripes[2, 80 // 12 + 80 // 6] - COLORS["blue"]).max() <= 1
    checks = render(Scene("checks", ("red", "blue"), obj), 120, 120).astype(int)
    assert np.abs(checks[10, 10] - COLORS["red"]).max() <= 1
    assert np.abs(checks[10, 30] - COLORS["blue"]).max() <= 1
    assert np.abs(checks[30, 30] - COLORS["red"]).max() <= 1


def test_render_is_resolution_consistent():
    """The same scene at 512 px, box-downsampled to 128, matches the 128 px render."""
    for i in range(5):
        scene = sample_scene(i)
        big = render(scene, 512, 512).astype(np.float32).reshape(128, 4, 128, 4, 3).mean((1, 3))
        small = render(scene, 128, 128).astype(np.float32)
        assert np.abs(big - small).mean() < 1.5


def test_render_rejects_tiny():
    with pytest.raises(ValueError, match="at least 8x8"):
        render(sample_scene(0), 4, 64)


# -- dataset ---------------------------------------------------------------------------------


def test_dataset_items_are_deterministic_and_order_independent():
    ds = ProceduralDataset(20, seed=3, resolution=(48, 80))
    assert len(ds) == 20
    img, text, scene = ds[7]
    assert img.shape == (3, 48, 80) and img.dtype == torch.float32
    assert -1.0 <= img.min() and img.max() <= 1.0
    assert text == caption(scene) == ds.caption(7)
    for j in (19, 0, 5):  # touching other items first changes nothing
        ds[j]
    img2, text2, scene2 = ProceduralDataset(20, seed=3, resolution=(48, 80))[7]
    assert torch.equal(img, img2) and text == text2 and scene == scene2
    assert torch.equal(ds[-1][0], ds[19][0])
    assert ProceduralDataset(20, seed=4)[7][1] != ds[7][1] or ProceduralDataset(20, seed=4)[8][1] != ds[8][1]
    expected = torch.from_numpy(render(scene, 48, 80)).permute(2, 0, 1).float() / 127.5 - 1
    assert torch.allclose(img, expected)
    with pytest.raises(IndexError):
        ds[20]
    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=ProceduralDataset.collate)
    images, captions, scenes = next(iter(loader))
    assert images.shape == (4, 3, 48, 80) and len(captions) == 4 and isinstance(scenes[0], Scene)


def test_dataset_sample_kwargs():
    ds = ProceduralDataset(30, seed=0, resolution=32, shapes=SHAPES, max_objects=1)
    assert all(len(ds.scene(i).objects) == 1 for i in range(30))
    assert ds.image(0).shape == (32, 32, 3)
    with pytest.raises(ValueError, match="resolution"):
        ProceduralDataset(3, resolution="big")


def test_positions_are_row_major():
    assert POSITIONS[0] == "top left" and POSITIONS[4] == "center" and POSITIONS[8] == "bottom right"
