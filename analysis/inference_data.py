"""Package posterior samples and predictions as ArviZ ``InferenceData`` and store them as netCDF.

Two layouts, after ArviZ's InferenceData schema (S posterior samples, N images, C classes).
On the images the posterior was conditioned on (the run's training images: ``train``)::

    posterior               one variable per latent site, dims (chain, draw, *event_dims)
    posterior_predictive    y     (chain, draw, image)         sampled / predicted labels
                            probs (chain, draw, image, class)  class probabilities per sample
    log_likelihood          y     (chain, draw, image)         log p_s(y_i | x_i) of the true label
    observed_data           y     (image,)                     true labels

On held-out images (the test splits: ``held_out=True``), whose labels the posterior never saw::

    posterior               as above
    predictions             y     (chain, draw, image)         sampled / predicted labels
                            probs (chain, draw, image, class)  class probabilities per sample
                            log_density (chain, draw, image)   log p_s(y_i | x_i) of the true label
    predictions_constant_data  y  (image,)                     true labels

There is a single chain (``chain = [0]``) and ``draw = 0..S-1``. Coordinates: ``image`` (0..N-1),
``class`` (class names) and, when given, ``split`` as a non-index coordinate on the ``image`` dim.

``log_likelihood`` and ``observed_data`` hold only data the posterior is conditioned on (the
schema's definition), so ``az.loo(idata)`` and ``az.compare`` are PSIS-LOO on the training
data; ``log_likelihood`` is named ``y`` like the observed variable, ArviZ's convention, so they
need no ``var_name``. A held-out file has no ``log_likelihood`` group: ``az.loo`` refuses it
rather than return a meaningless number; its score is :func:`held_out_elpd`. ``az.loo`` needs
S >= 2 draws and a ``posterior`` group (zeroshot has none). Point-estimate models repeat one
draw S times: then loo's importance weights are all equal, ``elpd_loo`` is the training
log-likelihood and ``p_loo`` is 0 (ArviZ warns about Pareto k, which means nothing there); see
docs/ANALYSIS.md.

The groups are built as plain ``xarray.Dataset`` objects and then wrapped in ArviZ's container:
``arviz.InferenceData`` for ArviZ < 1 and ``xarray.DataTree`` for ArviZ >= 1. We do not use
``az.from_dict`` because it drops coordinates that are not dimensions (such as ``split``).
"""

import os
from collections.abc import Mapping, Sequence
from typing import Any

import arviz as az
import numpy as np
import xarray as xr
from scipy.special import logsumexp

from bayesprompt.files import atomic_write
from bayesprompt.metrics import EPS, to_numpy

ARVIZ_1 = int(az.__version__.split(".")[0]) >= 1
"""True for the DataTree-based ArviZ 1.x; the only place the two ArviZ APIs are told apart."""

SAMPLE_DIMS = ("chain", "draw")


def _default_event_dims(name: str, shape: tuple[int, ...], n_images: int) -> tuple[str, ...]:
    """Name the event axes of a latent of shape (S, *event): ``{name}_dim_{i}``.

    The first event axis is called ``image`` when the site has at least two event axes and the
    first has length N (per-image latents such as residuals ``r`` of shape (S, N, W)).
    Pass ``dims`` to :func:`to_inference_data` whenever this guess could be wrong.
    """
    event = shape[1:]
    names = [f"{name}_dim_{i}" for i in range(len(event))]
    if len(event) >= 2 and event[0] == n_images:
        names[0] = "image"
    return tuple(names)


def _container(groups: dict[str, xr.Dataset]) -> Any:
    """Wrap named datasets in the InferenceData container of the installed ArviZ version.

    The test suite runs ArviZ 0.23; the ArviZ 1.x branch (``xarray.DataTree``) was checked by
    hand with ArviZ 1.3.0 on Python 3.12 (build, netCDF round trip, ``az.summary``, plots).
    """
    if ARVIZ_1:
        return xr.DataTree.from_dict(groups)
    return az.InferenceData(**groups)


def _check_outputs(probs: np.ndarray, predicted: np.ndarray, labels: np.ndarray,
                   classnames: Sequence[str]) -> None:
    """ValueError unless probs (S, N, C), predicted (S, N), labels (N,) in [0, C), C names."""
    n_samples, n_images, n_classes = probs.shape
    if predicted.shape != (n_samples, n_images) or labels.shape != (n_images,):
        raise ValueError(
            f"expected predicted_labels {(n_samples, n_images)} and labels {(n_images,)}, "
            f"got {predicted.shape} and {labels.shape}"
        )
    if len(classnames) != n_classes:
        raise ValueError(f"{len(classnames)} class names for {n_classes} classes")
    if labels.size and not 0 <= labels.min() <= labels.max() < n_classes:
        raise ValueError(f"labels must lie in [0, {n_classes}), got {labels.min()}..{labels.max()}")


def _coordinates(n_samples: int, n_images: int, classnames: Sequence[str],
                 split: Sequence[str] | None) -> dict[str, tuple[str, Any]]:
    """Coordinate name -> (dim, values): chain, draw, image, class and, if given, split."""
    coords = {
        "chain": ("chain", [0]),
        "draw": ("draw", np.arange(n_samples)),
        "image": ("image", np.arange(n_images)),
        "class": ("class", np.asarray(classnames, dtype=str)),
    }
    if split is not None:
        split = np.asarray(split, dtype=str)
        if split.shape != (n_images,):
            raise ValueError(f"split must have shape {(n_images,)}, got {split.shape}")
        coords["split"] = ("image", split)
    return coords


def to_inference_data(
    latents: Mapping[str, Any],
    predicted_labels: Any,
    probs: Any,
    labels: Any,
    classnames: Sequence[str],
    split: Sequence[str] | None = None,
    dims: Mapping[str, Sequence[str]] | None = None,
    *,
    held_out: bool,
) -> Any:
    """Build ArviZ InferenceData from posterior samples and posterior-predictive outputs.

    Args:
        latents: site name -> samples of shape (S, *event), e.g. ``r`` (S, N, W) or (S, W),
            ``ctx`` (S, n_ctx, W). Torch tensors or numpy arrays.
        predicted_labels: (S, N) integer labels drawn from (or argmax of) each sample's
            predictive distribution.
        probs: (S, N, C) class probabilities per posterior sample.
        labels: (N,) true integer labels.
        classnames: C class names, used as the ``class`` coordinate.
        split: optional (N,) strings (e.g. "base", "new"), stored as coordinate ``split``
            on the ``image`` dim.
        dims: optional site name -> names of its event dims (without chain/draw), overriding
            the default naming (see :func:`_default_event_dims`).
        held_out: False when the posterior was conditioned on these images and labels (the
            training set), True for held-out images (test splits): see the module docstring.

    Returns:
        ``arviz.InferenceData`` (ArviZ < 1) or ``xarray.DataTree`` (ArviZ >= 1) with groups
        ``posterior``, ``posterior_predictive``, ``log_likelihood`` and ``observed_data``, or
        (held out) ``posterior``, ``predictions`` and ``predictions_constant_data``; log
        densities are in float64, probabilities floored at 1e-12 as in the NLL metric.
    """
    probs, predicted, labels = (to_numpy(x) for x in (probs, predicted_labels, labels))
    _check_outputs(probs, predicted, labels, classnames)
    n_samples, n_images, _ = probs.shape
    coords = _coordinates(n_samples, n_images, classnames, split)

    def dataset(variables: dict) -> xr.Dataset:
        """Dataset of ``name -> (dims, values)`` with the coordinates of the dims it uses."""
        ds = xr.Dataset(variables)
        return ds.assign_coords({k: v for k, v in coords.items() if v[0] in ds.dims})

    dims = dims or {}
    posterior = {}
    for name, value in latents.items():
        value = to_numpy(value)
        if value.shape[0] != n_samples:
            raise ValueError(f"latent {name!r} has {value.shape[0]} samples, expected {n_samples}")
        event_dims = tuple(dims.get(name, _default_event_dims(name, value.shape, n_images)))
        posterior[name] = (SAMPLE_DIMS + event_dims, value[None])

    predicted_vars = {
        "y": (SAMPLE_DIMS + ("image",), predicted[None]),
        "probs": (SAMPLE_DIMS + ("image", "class"), probs[None]),
    }
    log_density = (SAMPLE_DIMS + ("image",), log_likelihood(probs, labels)[None])
    true_labels = dataset({"y": (("image",), labels)})
    if held_out:
        groups = {"posterior": dataset(posterior),
                  "predictions": dataset({**predicted_vars, "log_density": log_density}),
                  "predictions_constant_data": true_labels}
    else:
        groups = {"posterior": dataset(posterior),
                  "posterior_predictive": dataset(predicted_vars),
                  "log_likelihood": dataset({"y": log_density}),
                  "observed_data": true_labels}
    return _container(groups)


def log_likelihood(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(S, N, C) probabilities and (N,) labels -> (S, N) ``log probs[s, i, labels[i]]``."""
    true_probs = np.take_along_axis(probs, labels[None, :, None].astype(np.int64), -1)[..., 0]
    return np.log(np.maximum(true_probs.astype(np.float64), EPS))


def held_out_elpd(idata: Any) -> float:
    """Log predictive density of a held-out file's true labels, sum_i log mean_s p_s(y_i | x_i)
    (= -N * NLL of the predictive mean, up to the 1e-12 floor), from ``predictions.log_density``."""
    log_density = idata["predictions"]["log_density"]
    draws = log_density.sizes["chain"] * log_density.sizes["draw"]
    values = log_density.transpose(*SAMPLE_DIMS, ...).values            # (chain, draw, N)
    pointwise = logsumexp(values, axis=(0, 1)) - np.log(draws)
    return float(pointwise.sum())


#: HDF5 bookkeeping added to the data's own bytes when checking the free space.
NETCDF_OVERHEAD_BYTES = 1 << 20


def save_inference_data(idata: Any, path: str | os.PathLike) -> None:
    """Write ``idata`` to a netCDF file atomically with :func:`bayesprompt.files.atomic_write`.

    The free space is checked first (HDF5 can crash on a full disk rather than raise); a full
    disk or an unwritable folder is a ``UserError``, and no temporary file is left behind.
    """
    required = inference_data_nbytes(idata) * 11 // 10 + NETCDF_OVERHEAD_BYTES
    atomic_write(path, lambda temporary: idata.to_netcdf(str(temporary)),
                 required_bytes=required)


def inference_data_nbytes(idata: Any) -> int:
    """Bytes held by the arrays of every group of ``idata`` (uncompressed)."""
    if ARVIZ_1:
        return sum(node.dataset.nbytes for node in idata.subtree)
    return sum(idata[group].nbytes for group in idata.groups())


def load_inference_data(path: str | os.PathLike) -> Any:
    """Read a file written by :func:`save_inference_data`, fully into memory (file closed)."""
    path = os.fspath(path)
    if ARVIZ_1:
        with xr.open_datatree(path) as tree:
            return tree.load()
    with az.rc_context(rc={"data.load": "eager"}):
        return az.from_netcdf(path)
