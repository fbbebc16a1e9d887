"""Ecosystem details of issue 11: the log_likelihood group for az.loo / az.compare (on the
conditioned data; held-out predictions apart, issue 17), the image
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
    held_out_elpd,
    load_inference_data,
    save_inference_data,
    to_inference_data,
)
from conftest import TINY_BACKBONE
from huggingface_hub.errors import LocalEntryNotFoundError
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from PIL import Image
from torch.utils.data import DataLoader

from bayesprompt.clip.factory import config_digest, image_stats, load_clip
from bayesprompt.clip.model import ImageStats
from bayesprompt.commands import train
from bayesprompt.commands.cli import run_main
from bayesprompt.data import features as features_module
from bayesprompt.data.datasets import Item, load_dataset
from bayesprompt.data.features import (
    TransformedImages,
    cache_key,
    cached_features,
    default_loader_workers,
    draw_crops,
    encode_items,
    image_transform,
    load_image,
)
from bayesprompt.errors import UserError
from bayesprompt.metrics import negative_log_likelihood
from bayesprompt.runs.config import EXECUTION_OPTIONS

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


def build(probs: np.ndarray, labels: np.ndarray, rng: np.random.Generator,
          held_out: bool = False):
    return to_inference_data({"ctx": rng.normal(size=(len(probs), 2, 3))}, probs.argmax(-1),
                             probs, labels, CLASSNAMES, held_out=held_out)


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


def test_held_out_labels_are_predictions_not_log_likelihood(tmp_path) -> None:
    """Test labels were never conditioned on: no log_likelihood for az.loo to misread; the
    per-draw log density sits in `predictions`, and its score is sum_i log mean_s p_s(y_i)."""
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 4, size=30)
    probs = sampled_probs(rng, labels, 1.5, num_samples=8, spread=1.0)
    save_inference_data(build(probs, labels, rng, held_out=True), tmp_path / "test.nc")
    idata = load_inference_data(tmp_path / "test.nc")

    assert set(idata.groups()) == {"posterior", "predictions", "predictions_constant_data"}
    with pytest.raises(TypeError, match="log likelihood not found"):
        az.loo(idata)
    np.testing.assert_array_equal(idata.predictions_constant_data["y"].values, labels)
    np.testing.assert_allclose(idata.predictions["probs"].values[0], probs)
    np.testing.assert_array_equal(idata.predictions["y"].values[0], probs.argmax(-1))
    log_density = idata.predictions["log_density"]
    assert log_density.dims == ("chain", "draw", "image")
    np.testing.assert_allclose(log_density.values[0], np.log(probs[:, np.arange(30), labels]))
    elpd = np.log(probs[:, np.arange(30), labels].mean(0)).sum()
    assert held_out_elpd(idata) == pytest.approx(elpd, rel=1e-9)
    assert held_out_elpd(idata) == pytest.approx(
        -30 * negative_log_likelihood(probs.mean(0), labels), rel=1e-9)


def test_loo_and_compare_rank_the_better_model_first(tmp_path) -> None:
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, size=60)
    good = build(sampled_probs(rng, labels, 3.0), labels, rng)
    poor = build(sampled_probs(rng, labels, 0.2), labels, rng)
    save_inference_data(good, tmp_path / "good.nc")
    good = load_inference_data(tmp_path / "good.nc")  # the group survives the netCDF file

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pareto k above 0.38 for a few images of 40 draws
        loo = az.loo(good, pointwise=True)
        table = az.compare({"poor": poor, "good": good})
    log_lik = np.log(good.posterior_predictive["probs"].values[0, :, np.arange(60), labels]).T
    # importance-sampling LOO computed directly: log p(y_i | y_-i) = -log mean_s 1 / p_s(y_i);
    # with small posterior noise Pareto smoothing changes it little
    direct = -np.log(np.exp(-log_lik).mean(0))
    np.testing.assert_allclose(loo.loo_i.values, direct, atol=2e-3)
    assert float(loo.elpd_loo) == pytest.approx(direct.sum(), abs=1e-2)
    assert float(loo.elpd_loo) < np.log(np.exp(log_lik).mean(0)).sum() - 0.03  # not in-sample

    assert table.index.tolist() == ["good", "poor"]
    assert table.loc["good", "elpd_loo"] > table.loc["poor", "elpd_loo"] + 10


def test_loo_of_a_point_estimate_is_the_log_likelihood() -> None:
    """Point-estimate models repeat one draw: equal weights, p_loo = 0."""
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 4, size=25)
    probs = np.repeat(sampled_probs(rng, labels, 1.0, num_samples=1), 3, axis=0)
    idata = build(probs, labels, rng)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ArviZ warns about Pareto k of constant weights
        loo = az.loo(idata)
    log_likelihood = np.log(probs[0, np.arange(25), labels]).sum()
    assert float(loo.elpd_loo) == pytest.approx(log_likelihood, rel=1e-9)
    assert float(loo.p_loo) == pytest.approx(0.0, abs=1e-9)
    bayesian = build(sampled_probs(rng, labels, 4.0, num_samples=3), labels, rng)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table = az.compare({"point": idata, "bayesian": bayesian})
    assert table.index.tolist() == ["bayesian", "point"]


def test_labels_outside_the_classes_are_refused() -> None:
    probs = np.full((2, 3, 4), 0.25)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\)"):
        to_inference_data({}, probs.argmax(-1), probs, np.array([0, 1, 4]), CLASSNAMES,
                          held_out=True)


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


# --- feature extraction with a DataLoader --------------------------------------------------

def serial_pixels(clip, items: list[Item], view: int, seed: int, min_scale: float = 0.08
                  ) -> torch.Tensor:
    """The implementation before the DataLoader: one generator, images in order -> (N, 3, S, S)."""
    transform = image_transform(clip, view > 0, min_scale)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 1000 + view)
        return torch.stack([transform(load_image(item.path)) for item in items])


def serial_features(clip, items: list[Item], view: int, seed: int, batch_size: int
                    ) -> torch.Tensor:
    """The features of the implementation before the DataLoader: (N, D) in batches."""
    pixels = serial_pixels(clip, items, view, seed)
    return torch.cat([clip.encode_images(batch) for batch in pixels.split(batch_size)])


@pytest.fixture(scope="module")
def varied_items(eurosat_root: Path, tmp_path_factory) -> list[Item]:
    """The fixture's training images plus images of other sizes and shapes (some too narrow
    for most crops, so RandomResizedCrop retries or falls back to the centre)."""
    folder = tmp_path_factory.mktemp("varied")
    rng = np.random.default_rng(5)
    extra = []
    for index, (height, width) in enumerate([(48, 48), (20, 90), (90, 20), (33, 61), (7, 7)]):
        path = folder / f"image_{index}.png"
        Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(path)
        extra.append(Item(path, index % 2, "thing"))
    return load_dataset("eurosat", eurosat_root).train[:15] + extra


@pytest.mark.parametrize("view", [0, 1, 3])
def test_dataloader_images_equal_the_serial_ones_for_any_worker_count(tiny_clip, varied_items,
                                                                       view) -> None:
    expected = serial_pixels(tiny_clip, varied_items, view, 7)
    transform = image_transform(tiny_clip, view > 0)
    crops = draw_crops(transform, varied_items, 7 * 1000 + view) if view else None
    images = TransformedImages([item.path for item in varied_items], transform, 32, crops)
    for workers in (0, 2):
        batches = list(DataLoader(images, batch_size=6, num_workers=workers))
        assert all(problem == "" for _, problems in batches for problem in problems)
        pixels = torch.cat([batch for batch, _ in batches])
        torch.testing.assert_close(pixels, expected, rtol=0, atol=0)


@pytest.mark.parametrize("workers", [0, 2])
def test_features_equal_the_serial_implementation(tiny_clip, varied_items, workers) -> None:
    rng_state = torch.get_rng_state()
    features = encode_items(tiny_clip, varied_items, 2, 3, batch_size=6, workers=workers)
    assert torch.equal(torch.get_rng_state(), rng_state)  # the caller's generator is untouched
    expected = serial_features(tiny_clip, varied_items, 2, 3, batch_size=6)
    torch.testing.assert_close(features, expected, rtol=0, atol=0)


def test_views_and_seeds_differ(tiny_clip, varied_items) -> None:
    first, second = (encode_items(tiny_clip, varied_items, 1, seed, workers=0) for seed in (1, 2))
    assert not torch.allclose(first, second)


def test_unreadable_image_in_a_worker_is_one_clear_message(tiny_clip, varied_items, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    items = [*varied_items[:3], Item(broken, 0, "thing")]
    with pytest.raises(UserError, match=r"^Cannot read the image .*broken.jpg") as error:
        encode_items(tiny_clip, items, 0, 0, batch_size=2, workers=2)
    assert "Traceback" not in str(error.value)
    with pytest.raises(UserError, match="broken.jpg"):  # augmented views read the size first
        encode_items(tiny_clip, items, 1, 0, batch_size=2, workers=2)


def test_cached_features_pass_the_worker_count(tiny_clip, varied_items, tmp_path,
                                               monkeypatch) -> None:
    counts = []

    def spy(*args, workers=None, **kwargs):
        counts.append(workers)
        return encode_items(*args, workers=workers, **kwargs)

    monkeypatch.setattr(features_module, "encode_items", spy)
    features = cached_features(tiny_clip, varied_items, [0, 2], tmp_path, seed=4, workers=2)
    cached_features(tiny_clip, varied_items, [1], tmp_path, seed=4)
    assert counts == [2, 2, None]
    torch.testing.assert_close(features[1], serial_features(tiny_clip, varied_items, 2, 4, 64),
                               rtol=0, atol=0)


def test_a_single_batch_is_decoded_in_this_process(tiny_clip, varied_items, monkeypatch):
    counts = []
    original = DataLoader.__init__

    def spy(self, *args, **kwargs):
        counts.append(kwargs["num_workers"])
        original(self, *args, **kwargs)

    monkeypatch.setattr(DataLoader, "__init__", spy)
    encode_items(tiny_clip, varied_items, 0, 0, workers=4)  # 20 images, one batch of 64
    encode_items(tiny_clip, varied_items, 0, 0, batch_size=10, workers=4)  # two batches
    encode_items(tiny_clip, varied_items, 0, 0, batch_size=10)
    assert counts == [0, 2, min(2, default_loader_workers())]


def test_loader_workers_option(run_args, capsys) -> None:
    config, _ = train.parse_args([*run_args, "--loader-workers", "0"])
    assert config.loader_workers == 0 and "loader_workers" in EXECUTION_OPTIONS
    assert train.parse_args(run_args)[0].loader_workers is None
    with pytest.raises(SystemExit) as exit_info:
        run_main(train.main, [*run_args, "--loader-workers", "-1"])
    assert exit_info.value.code == 2
    assert "--loader-workers must be 0 (decode in this process) or more, got -1" in (
        capsys.readouterr().err)
