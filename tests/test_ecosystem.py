"""Ecosystem details of issue 11: the log_likelihood group for az.loo / az.compare, the image
transform from open_clip's preprocess config, hf-hub: backbones, and feature extraction with a
DataLoader."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from types import SimpleNamespace

import arviz as az
import numpy as np
import open_clip
import pytest
import torch
from bayesprompt.analysis.inference_data import (
    load_inference_data,
    save_inference_data,
    to_inference_data,
)
from conftest import TINY_BACKBONE
from huggingface_hub.errors import LocalEntryNotFoundError
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from PIL import Image

from bayesprompt.cli import run_main
from bayesprompt.clip import ImageStats, config_digest, image_stats, load_clip
from bayesprompt.commands import train
from bayesprompt.data.datasets import load_dataset
from bayesprompt.data.features import cache_key, image_transform
from bayesprompt.errors import UserError

CLASSNAMES = ["cat", "dog", "bird", "fish"]


def sampled_probs(rng: np.random.Generator, labels: np.ndarray, signal: float,
                  num_samples: int = 40, spread: float = 0.1) -> np.ndarray:
    """(S, N, C) probabilities: a per-image logit vector favouring the true class by `signal`,
    plus small posterior noise shared by every image of a draw."""
    n_images = len(labels)
    logits = rng.normal(size=(n_images, len(CLASSNAMES)))
    logits[np.arange(n_images), labels] += signal
    draws = logits + spread * rng.normal(size=(num_samples, 1, len(CLASSNAMES)))
    probs = np.exp(draws - draws.max(-1, keepdims=True))
    return probs / probs.sum(-1, keepdims=True)


def build(probs: np.ndarray, labels: np.ndarray, rng: np.random.Generator):
    return to_inference_data({"ctx": rng.normal(size=(len(probs), 2, 3))}, probs.argmax(-1),
                             probs, labels, CLASSNAMES)


def test_log_likelihood_is_the_log_probability_of_the_true_label() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, size=30)
    probs = sampled_probs(rng, labels, 2.0, num_samples=5)
    probs[0, 0] = 0.0  # a zero probability of the true label is floored, not -inf
    idata = build(probs, labels, rng)

    log_lik = idata.log_likelihood["y"]
    assert log_lik.dims == ("chain", "draw", "image")
    with np.errstate(divide="ignore"):
        expected = np.log(probs[:, np.arange(30), labels])
    np.testing.assert_array_equal(log_lik.values[0, :, 1:], expected[:, 1:])
    np.testing.assert_array_equal(log_lik.values[0, 1:, 0], expected[1:, 0])
    assert log_lik.values[0, 0, 0] == pytest.approx(np.log(1e-12))
    assert set(idata.log_likelihood.data_vars) == set(idata.observed_data.data_vars)


def test_loo_and_compare_rank_the_better_model_first(tmp_path) -> None:
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, size=60)
    good = build(sampled_probs(rng, labels, 3.0), labels, rng)
    poor = build(sampled_probs(rng, labels, 0.2), labels, rng)
    save_inference_data(good, tmp_path / "good.nc")
    good = load_inference_data(tmp_path / "good.nc")  # the group survives the netCDF file

    loo = az.loo(good, pointwise=True)
    direct = good.log_likelihood["y"].values[0]  # (S, N)
    # small posterior noise: leave-one-out is close to the log of the mean likelihood
    mean_log_lik = np.log(np.exp(direct).mean(0))
    np.testing.assert_allclose(loo.loo_i.values, mean_log_lik, atol=0.02)
    assert float(loo.elpd_loo) == pytest.approx(mean_log_lik.sum(), abs=0.3)

    table = az.compare({"poor": poor, "good": good})
    assert table.index.tolist() == ["good", "poor"]
    assert table.loc["good", "elpd_loo"] > table.loc["poor", "elpd_loo"] + 10


def test_loo_of_a_point_estimate_is_the_test_log_likelihood() -> None:
    """Point-estimate models repeat one draw: equal weights, p_loo = 0."""
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 4, size=25)
    probs = np.repeat(sampled_probs(rng, labels, 1.0, num_samples=1), 3, axis=0)
    idata = build(probs, labels, rng)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ArviZ warns about Pareto k of constant weights
        loo = az.loo(idata)
    test_log_likelihood = np.log(probs[0, np.arange(25), labels]).sum()
    assert float(loo.elpd_loo) == pytest.approx(test_log_likelihood, rel=1e-9)
    assert float(loo.p_loo) == pytest.approx(0.0, abs=1e-9)


def test_labels_outside_the_classes_are_refused() -> None:
    probs = np.full((2, 3, 4), 0.25)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\)"):
        to_inference_data({}, probs.argmax(-1), probs, np.array([0, 1, 4]), CLASSNAMES)


# --- the image transform from open_clip's preprocess config ------------------------------

def stub_model(**preprocess) -> SimpleNamespace:
    """What open_clip.get_model_preprocess_cfg reads: model.visual.preprocess_cfg."""
    config = {"size": 32, "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25),
              "interpolation": "bilinear", "resize_mode": "shortest", **preprocess}
    return SimpleNamespace(visual=SimpleNamespace(preprocess_cfg=config))


def test_image_stats_of_the_tiny_backbone_and_its_cache_transform_are_unchanged(tiny_clip):
    assert tiny_clip.image_stats == ImageStats(32, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD,
                                               "bicubic", "shortest")
    # the feature cache key holds this repr: it must stay the one of earlier versions
    assert "".join(repr(image_transform(tiny_clip, augment=False)).split()) == (
        "Compose(ToImage()Resize(size=[32],interpolation=InterpolationMode.BICUBIC,"
        "antialias=True)CenterCrop(size=(32,32))ToDtype(scale=True)"
        "Normalize(mean=[0.48145466,0.4578275,0.40821073],"
        "std=[0.26862954,0.26130258,0.27577711],inplace=False))")


@pytest.mark.parametrize(("mode", "output"), [("shortest", (3, 32, 32)), ("squash", (3, 32, 32)),
                                              ("longest", (3, 32, 32))])
def test_image_stats_follow_the_preprocess_config(tiny_clip, mode, output) -> None:
    stats = image_stats(stub_model(size=(32, 32), resize_mode=mode), "stub")
    assert stats == ImageStats(32, (0.5,) * 3, (0.25,) * 3, "bilinear", mode)
    clip = SimpleNamespace(image_stats=stats)
    wide = Image.fromarray(np.tile(np.arange(64, dtype=np.uint8), (16, 1))[..., None].repeat(3, -1))
    pixels = image_transform(clip, augment=False)(wide)
    assert pixels.shape == output
    if mode == "longest":  # 64x16 -> 32x8, padded with zeros above and below
        assert torch.all(pixels[:, :12] == -2.0) and torch.all(pixels[:, 20:] == -2.0)


def test_non_square_or_unknown_resize_is_refused() -> None:
    with pytest.raises(UserError, match="expects 32x48 images"):
        image_stats(stub_model(size=(32, 48)), "wide")
    with pytest.raises(UserError, match="resized with 'crop'"):
        image_stats(stub_model(resize_mode="crop"), "odd")


# --- hf-hub: backbones ---------------------------------------------------------------------

@pytest.fixture
def fake_hub(tmp_path, monkeypatch, tiny_clip):
    """A Hugging Face cache holding one open_clip repository, org/tiny, at commit abc123.

    Replaces the one function through which open_clip reads the Hub (huggingface_hub's
    hf_hub_download); records which repositories and files were asked for.
    """
    snapshot = tmp_path / "hub" / "models--org--tiny" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    config = json.loads(Path(TINY_BACKBONE).read_text())
    (snapshot / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": config, "preprocess_cfg": {"interpolation": "bilinear"}}))
    torch.save(tiny_clip.model.state_dict(), snapshot / "open_clip_pytorch_model.bin")
    asked = []

    def hf_hub_download(repo_id, filename, revision=None, cache_dir=None):
        asked.append((repo_id, filename))
        if repo_id != "org/tiny" or not (snapshot / filename).is_file():
            raise LocalEntryNotFoundError(f"{repo_id}/{filename} is not in the cache")
        return str(snapshot / filename)

    monkeypatch.setattr(open_clip.pretrained, "hf_hub_download", hf_hub_download)
    created = []
    create_model = open_clip.create_model

    def spy(name, *args, **kwargs):
        created.append((name, kwargs.get("pretrained")))
        return create_model(name, *args, **kwargs)

    monkeypatch.setattr(open_clip, "create_model", spy)
    return SimpleNamespace(asked=asked, created=created)


def test_hf_hub_names_reach_open_clip_unchanged(fake_hub, tiny_clip) -> None:
    clip = load_clip("hf-hub:org/tiny")
    assert fake_hub.created == [("hf-hub:org/tiny", None)]
    assert {repo for repo, _ in fake_hub.asked} == {"org/tiny"}
    assert "open_clip_pytorch_model.bin" in {filename for _, filename in fake_hub.asked}
    digest = config_digest("", json.loads(Path(TINY_BACKBONE).read_text()))
    assert clip.identity == f"hf-hub:org/tiny:{digest}:hf-hub@abc123"
    assert clip.image_stats.interpolation == "bilinear"  # the repository's preprocess_cfg
    torch.testing.assert_close(clip.encode_texts(["a photo of a cat."]),
                               tiny_clip.encode_texts(["a photo of a cat."]))


def test_hf_hub_runs_have_their_own_feature_cache_key(fake_hub, tiny_clip, eurosat_root):
    items = load_dataset("eurosat", eurosat_root).test
    hub_key = cache_key(load_clip("hf-hub:org/tiny"), items, 0, 0, 0.08)
    assert hub_key != cache_key(tiny_clip, items, 0, 0, 0.08)


def test_hf_hub_with_pretrained_is_refused(fake_hub) -> None:
    with pytest.raises(UserError, match="brings its own weights from the Hub"):
        load_clip("hf-hub:org/tiny", "openai")
    assert fake_hub.created == []


def test_missing_hub_model_is_one_clear_message(fake_hub) -> None:
    with pytest.raises(UserError, match=r"hf-hub:org/unknown.*Download the model once"):
        load_clip("hf-hub:org/unknown")
    assert fake_hub.created == []


def test_offline_hub_model_exits_2_without_traceback(run_args, tmp_path, capsys) -> None:
    """The real huggingface_hub in offline mode (conftest sets HF_HUB_OFFLINE=1)."""
    with pytest.raises(SystemExit) as exit_info:
        run_main(train.main, [*run_args, "--backbone", "hf-hub:nobody/no-such-clip"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "hf-hub:nobody/no-such-clip" in err and "HF_HUB_OFFLINE" in err
    assert "Traceback" not in err
    assert not (tmp_path / "run").exists()
