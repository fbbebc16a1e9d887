"""The base class of every model file: frozen CLIP, class prompts, the data plate.

A model file subclasses `PromptModel` and writes `model` (prior + likelihood) and `guide`
(variational family) as Pyro programs with the signature
`(image_features (B, D), labels (B,) | None, dataset_size: int | None)`.
Sample-site names are part of the API: `y` is the label; latent sites are listed in
`latent_sites` so that objectives and analysis can find them.
The guide may also be any `pyro.infer.autoguide` guide: set in `__init__`
(`self.guide = AutoNormal(self.model)`) or named as a class attribute (`guide = AutoNormal`);
an autoguide without `create_plates` gets `self.plates`, the data plate with the batch's
dataset indices (`batch_indices`), so per-image latents get one row per training image.
The objective applies `--kl-weight` to the latent sites of model and guide
(`bayesprompt.inference.elbos`); a model file does not scale them itself.

Each program keeps its Pyro parameters in a param store of its own: `model` and `guide` (and
whatever runs inside `param_scope()`) see Pyro's global store holding this program's parameters
and nothing else, so several trained programs live side by side in one process.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions import constraints
from pyro.infer.autoguide import AutoGuide
from torch import nn

from bayesprompt.clip.model import FrozenCLIP
from bayesprompt.errors import UserError
from bayesprompt.program.prompts import ClassPrompts, initial_context


@dataclass
class PromptConfig:
    """Options shared by the prompt models; `options` holds a model file's own extras."""

    n_ctx: int = 4
    ctx_init: str = "a photo of a"
    kl_weight: float = 1.0
    prior_scale: float = 1.0
    residual_scale: float = 1.0
    template: str = "a photo of a {}."
    options: dict = field(default_factory=dict)
    learn_residual_scale: bool = False


#: The optimisers an `OptimizerGroup` may name.
GROUP_OPTIMIZERS = ("adam", "sgd")


@dataclass(frozen=True)
class OptimizerGroup:
    """Pyro parameters whose names start with `prefix`, trained by their own optimiser
    ("adam" or "sgd" with momentum 0.9) at the constant learning rate `lr`, instead of the
    reference SGD with warm-up and cosine schedule (e.g. an MI critic)."""

    prefix: str
    optimizer: str = "adam"
    lr: float = 1e-3


class PromptModel(nn.Module):
    """Shared machinery of the model files; see the module docstring for the contract."""

    #: False for point-estimate guides (Delta): every particle would be the same.
    stochastic: bool = True
    #: Latent sample sites of `model`, read by objectives and analysis.
    latent_sites: tuple[str, ...] = ()
    #: Parameters with their own optimiser; all others get the reference SGD schedule.
    optimizer_groups: tuple[OptimizerGroup, ...] = ()

    #: An autoguide class named by the model file (`guide = AutoNormal`), built in `__init__`.
    autoguide_class: type[AutoGuide] | None = None

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        named = vars(cls).get("guide")
        if isinstance(named, type) and issubclass(named, AutoGuide):
            cls.autoguide_class = named
            delattr(cls, "guide")  # PromptModel.guide runs the autoguide built in __init__
        if "guide" in vars(cls):
            cls.guide = marks_images_plate(vars(cls)["guide"])
        for name in ("model", "guide"):
            if name in vars(cls):
                setattr(cls, name, in_param_scope(vars(cls)[name]))

    def __init__(self, clip: FrozenCLIP, classnames: list[str], config: PromptConfig) -> None:
        super().__init__()
        self.check_options(config.options)
        self.clip = clip
        self.config = config
        self.register_buffer("init_ctx", initial_context(clip, config.n_ctx, config.ctx_init))
        self.set_classes(classnames)
        self._param_state: dict = {"params": {}, "constraints": {}}
        self._in_param_scope = False
        self._batch_indices: torch.Tensor | None = None
        self._images_plate: pyro.plate | None = None  # the last `images` plate made
        self._in_guide = False  # inside a guide method (`marks_images_plate`)
        self.autoguide: AutoGuide | None = None
        if self.autoguide_class is not None:
            self.guide = self.autoguide_class(self.model)

    def __setattr__(self, name: str, value: object) -> None:
        """`self.guide = an autoguide` makes it the guide (stored as `self.autoguide`)."""
        if name == "guide" and isinstance(value, AutoGuide):
            if value.create_plates is None and value.master is None:
                value.create_plates = self.plates
            name = "autoguide"
        super().__setattr__(name, value)

    @contextmanager
    def param_scope(self) -> Iterator[None]:
        """Inside the block Pyro's param store holds this program's parameters (only those);
        parameters created or changed there stay the program's. Re-entrant."""
        if self._in_param_scope:
            yield
            return
        store = pyro.get_param_store()
        outside = store.get_state()
        store.clear()
        store.set_state(self._param_state)
        self._in_param_scope = True
        try:
            yield
        finally:
            self._in_param_scope = False
            self._param_state = store.get_state()
            store.clear()
            store.set_state(outside)

    def learned_parameters(self) -> dict[str, torch.Tensor]:
        """The program's Pyro parameters by name, unconstrained (e.g. "ctx": (n_ctx, W))."""
        return dict(self._param_state["params"])

    def clear_parameters(self) -> None:
        """Forget the learned parameters: the next call of model or guide creates new ones."""
        self._param_state = {"params": {}, "constraints": {}}
        self.reset_autoguide()

    def reset_autoguide(self) -> None:
        """Make an autoguide set itself up again (new parameters) at its next call: an
        autoguide keeps its parameters in itself too, not only in the param store."""
        if self.autoguide is not None:
            self.autoguide.prototype_trace = None

    def initialize_parameters(self) -> None:
        """Create every `pyro.param` (by one call of guide and model on two blank images) if
        the program has none yet."""
        if self._param_state["params"]:
            return
        features = torch.zeros(2, self.clip.feature_dim, device=self.init_ctx.device)
        labels = torch.arange(2, device=features.device) % len(self.classnames)
        with self.param_scope():
            guide_trace = poutine.trace(self.guide).get_trace(features, labels, 2)
            poutine.replay(self.model, trace=guide_trace)(features, labels, 2)

    def guide_buffers(self) -> dict[str, torch.Tensor]:
        """An autoguide's buffers, "autoguide.<name>" (AutoIAFNormal's masks and permutation,
        drawn at random when it sets up): saved and restored with the parameters."""
        if self.autoguide is None:
            return {}
        return {f"autoguide.{name}": value for name, value in self.autoguide.named_buffers()}

    def load_guide_buffers(self, saved: Mapping[str, torch.Tensor]) -> None:
        """Copy saved `guide_buffers` into the autoguide's (set up: `initialize_parameters`)."""
        current = self.guide_buffers()
        if set(saved) != set(current):
            raise UserError(f"The saved guide buffers {sorted(saved)} are not this model's "
                            f"{sorted(current)}: they come from another model file.")
        with torch.no_grad():
            for name, value in saved.items():
                current[name].copy_(value)

    def prompt_state(self) -> dict[str, torch.Tensor]:
        """The learned parameters and an autoguide's buffers by name (detached copies), not the
        frozen CLIP: what saving a trained program must keep. `load_prompt_state` restores
        them. (nn.Module's `state_dict` is left as torch defines it: the module's buffers and
        submodules.)"""
        state = {**self.learned_parameters(), **self.guide_buffers()}
        return {name: value.detach().clone() for name, value in state.items()}

    def load_prompt_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore parameters saved by `prompt_state` (same names and shapes), on this device."""
        self.initialize_parameters()
        buffers = {k: v for k, v in state.items() if k in self.guide_buffers()}
        self.load_guide_buffers(buffers)
        state = {k: v for k, v in state.items() if k not in buffers}
        current = self._param_state["params"]
        if set(state) != set(current):
            raise UserError(
                f"The saved parameters {sorted(state)} are not this model's {sorted(current)}: "
                "they were saved from another model or another version of its file.")
        wrong = [f"{k}: saved {tuple(state[k].shape)}, model {tuple(current[k].shape)}"
                 for k in current if state[k].shape != current[k].shape]
        if wrong:
            raise UserError(f"The saved parameters have other shapes ({'; '.join(wrong)}): "
                            "they come from another backbone or --n-ctx.")
        with torch.no_grad():  # into the existing tensors, which optimisers and guides hold
            for name, value in state.items():
                current[name].copy_(value)

    def check_options(self, options: dict) -> None:
        """Refuse `--set` options; a model file with options of its own overrides this."""
        if options:
            raise UserError(
                f"The model {type(self).__name__} takes no --set options, got "
                f"{', '.join(sorted(options))}. Drop them, or use a model that defines them "
                "(e.g. e2mim)."
            )

    def set_classes(self, classnames: list[str]) -> None:
        """Point the model at another class set (base -> new); learned parameters are kept."""
        self.prompts = ClassPrompts(self.clip, classnames, self.config.n_ctx)

    @property
    def classnames(self) -> list[str]:
        return self.prompts.classnames

    @property
    def ctx_dim(self) -> int:
        """W, the width of a context vector."""
        return self.clip.embed_dim

    def residual(self, r: torch.Tensor) -> torch.Tensor:
        """A standardised residual r (..., W) -> the shift of every context token (..., 1, W).

        `residual_scale` s puts r ~ N(0, I) on the scale of token embeddings (s = 1 in the
        reference implementation; CLIP's token embeddings have a standard deviation near 0.02).
        With `learn_residual_scale`, s is the positive parameter "residual_scale" (starting
        there), which the ELBO sets (empirical Bayes: type-II maximum likelihood).
        """
        scale = self.config.residual_scale
        if self.config.learn_residual_scale:
            scale = pyro.param("residual_scale", torch.tensor(float(scale), device=r.device),
                               constraint=constraints.positive)
        return scale * r.unsqueeze(-2)

    def text_features(self, context: torch.Tensor) -> torch.Tensor:
        """Context (..., n_ctx, W) -> unit-norm class text features (..., C, D).

        The [SOS] + context prefix is encoded once for all C classes (see `text_tower`). The
        features are recorded as the deterministic site "text_features" of the trace, which
        analysis reads (objectives ignore deterministic sites).
        """
        features = self.clip.encode_shared_prefix(self.prompts.shared_prefix(context),
                                                  self.prompts.suffix, self.prompts.eot_index)
        return pyro.deterministic("text_features", features)

    def class_logits(self, image_features: torch.Tensor, text_features: torch.Tensor
                     ) -> torch.Tensor:
        """Image (B, D) and text features (..., B or 1, C, D), or (C, D) -> logits (..., B, C)."""
        if text_features.dim() == 2:
            text_features = text_features.unsqueeze(0)
        similarity = torch.einsum("...bcd,bd->...bc", text_features, image_features)
        return self.clip.logit_scale * similarity

    def images(self, image_features: torch.Tensor, dataset_size: int | None) -> pyro.plate:
        """The data plate over the B images of a batch of a dataset of `dataset_size`; its
        subsample is the batch's dataset indices (B,) inside `batch_indices`, else 0..B-1."""
        batch_size = image_features.shape[0]
        subsample = self._batch_indices
        if subsample is None:
            subsample = torch.arange(batch_size, device=image_features.device)
        elif subsample.shape != (batch_size,):
            raise ValueError(f"batch_indices holds {tuple(subsample.shape)} indices for a batch "
                             f"of {batch_size} images")
        self._images_plate = pyro.plate("images", dataset_size or batch_size,
                                        subsample=subsample, dim=-1)
        return self._images_plate

    def plates(self, image_features: torch.Tensor, labels: torch.Tensor | None = None,
               dataset_size: int | None = None) -> pyro.plate:
        """`images` with the model's signature: an autoguide's `create_plates`."""
        return self.images(image_features, dataset_size)

    @contextmanager
    def batch_indices(self, indices: torch.Tensor) -> Iterator[None]:
        """Inside the block the data plate's subsample is `indices` (B,): the dataset indices
        of the batch that model and guide are called on (training sets them)."""
        previous, self._batch_indices = self._batch_indices, indices
        try:
            yield
        finally:
            self._batch_indices = previous

    def after_training(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """A post-hoc step on the training data, features (V views, N, D) and labels (N,), run
        once after the last epoch inside the program's param_scope, before that epoch's
        checkpoint is written (e.g. a Laplace approximation around the MAP: coop_laplace).
        Parameters it sets must exist from the first call of model and guide. Default: none."""

    def model(self, image_features: torch.Tensor, labels: torch.Tensor | None = None,
              dataset_size: int | None = None) -> None:
        raise NotImplementedError

    def guide(self, image_features: torch.Tensor, labels: torch.Tensor | None = None,
              dataset_size: int | None = None) -> None:
        if self.autoguide is None:
            raise NotImplementedError(
                f"{type(self).__name__} has no guide: define a `guide` method, set "
                "`self.guide = AutoNormal(self.model)` in __init__, or name an autoguide class "
                "(`guide = AutoNormal`).")
        with self.param_scope():
            self._images_plate = None
            self.autoguide(image_features, labels, dataset_size)
            self.mark_images_plate(image_features, dataset_size)

    def mark_images_plate(self, image_features: torch.Tensor, dataset_size: int | None
                          ) -> None:
        """A site of no weight and no randomness in the data plate (an auxiliary, masked Delta
        "images_plate"; the guide's own plate if it made one), run after every guide: the
        guide then has the model's plate nesting, which `Predictive(parallel=True)` reads from
        the guide (vpt's guide has no site in a plate)."""
        zeros = image_features.new_zeros(image_features.shape[0])               # (B,)
        plate = self._images_plate
        with plate if plate is not None else self.images(image_features, dataset_size):
            pyro.sample("images_plate", dist.Delta(zeros).mask(False), obs=zeros,
                        infer={"is_auxiliary": True, "_deterministic": True})


def marks_images_plate(guide: Callable) -> Callable:
    """A model file's guide method, followed by `PromptModel.mark_images_plate`."""
    @functools.wraps(guide)
    def marked(program: PromptModel, image_features: torch.Tensor, *args, **kwargs):
        if program._in_guide:  # a guide calling its parent class's guide: mark once
            return guide(program, image_features, *args, **kwargs)
        program._images_plate, program._in_guide = None, True
        try:
            result = guide(program, image_features, *args, **kwargs)
        finally:
            program._in_guide = False
        dataset_size = kwargs.get("dataset_size", args[1] if len(args) > 1 else None)
        program.mark_images_plate(image_features, dataset_size)
        return result
    return marked


def in_param_scope(function: Callable) -> Callable:
    """`function(program, ...)` (a PromptModel method, or a function whose first argument is
    the program), run inside the program's `param_scope()`."""
    @functools.wraps(function)
    def scoped(program: PromptModel, *args, **kwargs):
        with program.param_scope():
            return function(program, *args, **kwargs)
    return scoped
