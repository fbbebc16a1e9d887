"""Tests of the offline world: generator, dataset writer and the committed MiniCLIP."""

import json
import math

import numpy as np
import open_clip
import pytest
import torch

from bayesprompt.clip.miniclip import (
    MODEL_NAME,
    PACKAGED_WEIGHTS,
    encode_text_truncated,
    register_miniclip,
    zero_shot_accuracy,
)
from bayesprompt.world import downstream as offline_world
from bayesprompt.world import procedural as world

CLEAN = world.Domain(color_jitter=0.0, pixel_noise=(0.0, 0.0), backgrounds=("plain",))


def draw(seed: int, n: int = 64, domain: world.Domain = world.PRETRAIN_DOMAIN):
    rng = np.random.default_rng(seed)
    scenes = world.sample_scenes(rng, n, world.pretraining_combos(), domain)
    images, masks = world.render(scenes, rng)
    return scenes, images, masks, world.captions(scenes, rng)


def test_generator_is_deterministic_per_seed():
    _, a, _, caps_a = draw(0)
    _, b, _, caps_b = draw(0)
    _, c, _, _ = draw(1)
    assert a.shape == (64, 32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and caps_a == caps_b
    assert not np.array_equal(a, c)


def test_object_pixels_have_the_requested_colour():
    scenes, images, masks, _ = draw(2, n=200, domain=CLEAN)
    for i in range(len(scenes)):
        inside = masks[i] == 1.0
        expected = np.array(world.COLORS[world.COLOR_NAMES[scenes.color[i]]])
        if world.STYLES[scenes.style[i]] == "photo":
            assert np.abs(images[i][inside] / 255.0 - expected).max() < 0.01


def test_mask_area_grows_with_size():
    scenes, _, masks, _ = draw(3, n=600, domain=CLEAN)
    area = masks.sum(axis=(1, 2))
    means = [area[scenes.size == k].mean() for k in range(len(world.SIZES))]
    assert means[0] < means[1] < means[2]


def test_shapes_are_distinct():
    n = len(world.SHAPES)
    rng = np.random.default_rng(0)
    scenes = world.sample_scenes(rng, n, [("red", s) for s in world.SHAPES], CLEAN, np.arange(n))
    scenes.center[:], scenes.radius[:], scenes.angle[:] = 0.0, 0.6, 0.0
    masks = world.render(scenes, rng)[1] > 0.5
    for i in range(n):
        for j in range(i + 1, n):
            iou = (masks[i] & masks[j]).sum() / (masks[i] | masks[j]).sum()
            assert iou < 0.9, (world.SHAPES[i], world.SHAPES[j])


def test_captions_name_the_object_and_nothing_else():
    scenes, _, _, caps = draw(4, n=500)
    both = 0
    for i, caption in enumerate(caps):
        color, shape = scenes.combo(i)
        words = set(caption.rstrip(".").split())
        assert color in words or shape in words
        assert not words & (set(world.COLOR_NAMES) - {color})
        assert not words & (set(world.SHAPES) - {shape})
        both += color in words and shape in words
    assert both > 0.7 * len(caps)


def test_held_out_combinations_never_drawn_in_pretraining():
    held = set(world.HELD_OUT)
    assert len(held) == len(world.SHAPES)
    assert held.isdisjoint(world.pretraining_combos())
    scenes, _, _, caps = draw(5, n=5000)
    drawn = {scenes.combo(i) for i in range(len(scenes))}
    assert drawn.isdisjoint(held) and len(drawn) == len(world.pretraining_combos())
    assert not any(f"{c} {s}" in caption for caption in caps for c, s in held)


@pytest.fixture(scope="module")
def data_root(offline_root):
    return offline_root


def test_writer_produces_valid_coop_split(data_root):
    folder = data_root / "miniworld"
    meta = json.loads((folder / "dataset.json").read_text())
    split = json.loads((folder / "split.json").read_text())
    assert meta["name"] == "miniworld" and meta["template"] == "a photo of a {}."
    names = meta["classnames"]
    assert len(names) >= 20 and any(tuple(n.split()) in world.HELD_OUT for n in names)
    for part, per_class in offline_world.SPLIT_SIZES.items():
        entries = split[part]
        assert len(entries) == per_class * len(names)
        for rel, label, cname in entries:
            assert names[label] == cname
            assert (folder / "images" / rel).is_file()
    # idempotent: a second call returns at once and rewrites nothing
    stamp = (folder / "split.json").stat().st_mtime_ns
    assert offline_world.write_offline_dataset("miniworld", data_root) == folder
    assert (folder / "split.json").stat().st_mtime_ns == stamp
    assert not [p for p in data_root.iterdir() if p.name.startswith(".")]


def test_domain_variants_share_classes_and_second_dataset_differs(data_root):
    def names(ds):
        return json.loads((data_root / ds / "dataset.json").read_text())["classnames"]

    for variant in ("miniworld_sketch", "miniworld_noise", "miniworld_recolor"):
        assert names(variant) == names("miniworld")
    assert set(names("miniworld_b")).isdisjoint(names("miniworld"))


@pytest.fixture(scope="module")
def miniclip():
    register_miniclip()
    assert PACKAGED_WEIGHTS.is_file(), "committed MiniCLIP weights are missing"
    assert PACKAGED_WEIGHTS.stat().st_size < 15e6
    model = open_clip.create_model(MODEL_NAME, pretrained=str(PACKAGED_WEIGHTS)).eval()
    return model, open_clip.get_tokenizer(MODEL_NAME)


def test_fp16_weights_load_into_fp32_model(miniclip):
    model, tokenizer = miniclip
    state = torch.load(PACKAGED_WEIGHTS)
    assert state["token_embedding.weight"].dtype == torch.float16
    assert model.token_embedding.weight.dtype == torch.float32
    assert torch.equal(model.token_embedding.weight, state["token_embedding.weight"].float())
    tokens = tokenizer(["a photo of a red star.", "a small blue heart on a dotted background."])
    with torch.no_grad():
        assert torch.allclose(
            encode_text_truncated(model, tokens), model.encode_text(tokens), atol=1e-5
        )


def test_miniclip_zero_shot_beats_chance_on_base_and_new(miniclip, data_root):
    model, tokenizer = miniclip
    folder = data_root / "miniworld"
    meta = json.loads((folder / "dataset.json").read_text())
    images, labels = offline_world.read_split(folder, "test")
    n_base = math.ceil(len(meta["classnames"]) / 2)
    for half in (np.arange(n_base), np.arange(n_base, len(meta["classnames"]))):
        keep = np.isin(labels, half)
        names = [meta["classnames"][k] for k in half]
        acc = zero_shot_accuracy(
            model, tokenizer, images[keep], labels[keep] - half[0], names, meta["template"]
        )
        assert acc >= 5 / len(half), acc


def test_an_older_world_is_rebuilt(tmp_path):
    folder = offline_world.write_offline_dataset("miniworld_b", tmp_path)
    meta = json.loads((folder / "dataset.json").read_text())
    assert meta["version"] == offline_world.WORLD_VERSION
    del meta["version"]  # a dataset written before versions existed
    (folder / "dataset.json").write_text(json.dumps(meta))
    (folder / "stale.txt").write_text("from the old world")
    assert offline_world.write_offline_dataset("miniworld_b", tmp_path) == folder
    assert not (folder / "stale.txt").exists()
    version = json.loads((folder / "dataset.json").read_text())["version"]
    assert version == offline_world.WORLD_VERSION
