"""The base class of every model file: frozen CLIP, class prompts, the data plate.

A model file subclasses `PromptModel` and writes `model` (prior + likelihood) and `guide`
(variational family) as Pyro programs with the signature
`(image_features (B, D), labels (B,) | None, dataset_size: int | None)`.
Sample-site names are part of the API: `y` is the label; latent sites are listed in
`latent_sites` so that objectives and analysis can find them.

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
import torch
from pyro import poutine
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

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
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

    def prompt_state(self) -> dict[str, torch.Tensor]:
        """The learned parameters by name (detached copies), not the frozen CLIP: what saving a
        trained program must keep. `load_prompt_state` restores them. (nn.Module's
        `state_dict` is left as torch defines it: the module's buffers and submodules.)"""
        return {name: value.detach().clone() for name, value in self.learned_parameters().items()}

    def load_prompt_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore parameters saved by `prompt_state` (same names and shapes), on this device."""
        self.initialize_parameters()
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
        device = self.init_ctx.device
        params = {k: v.detach().to(device).requires_grad_(True) for k, v in state.items()}
        self._param_state = {"params": params,
                             "constraints": dict(self._param_state["constraints"])}

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
        """
        return self.config.residual_scale * r.unsqueeze(-2)

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
        """The data plate over the B images of a batch of a dataset of `dataset_size`."""
        batch_size = image_features.shape[0]
        subsample = torch.arange(batch_size, device=image_features.device)
        return pyro.plate("images", dataset_size or batch_size, subsample=subsample, dim=-1)

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
        raise NotImplementedError


def in_param_scope(function: Callable) -> Callable:
    """`function(program, ...)` (a PromptModel method, or a function whose first argument is
    the program), run inside the program's `param_scope()`."""
    @functools.wraps(function)
    def scoped(program: PromptModel, *args, **kwargs):
        with program.param_scope():
            return function(program, *args, **kwargs)
    return scoped
