"""The base class of every model file: frozen CLIP, class prompts, the data plate.

A model file subclasses `PromptModel` and writes `model` (prior + likelihood) and `guide`
(variational family) as Pyro programs with the signature
`(image_features (B, D), labels (B,) | None, dataset_size: int | None)`.
Sample-site names are part of the API: `y` is the label; latent sites are listed in
`latent_sites` so that objectives and analysis can find them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pyro
import torch
from torch import nn

from bayesprompt.clip import FrozenCLIP
from bayesprompt.errors import UserError
from bayesprompt.prompts import ClassPrompts, initial_context


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

    def __init__(self, clip: FrozenCLIP, classnames: list[str], config: PromptConfig) -> None:
        super().__init__()
        self.check_options(config.options)
        self.clip = clip
        self.config = config
        self.register_buffer("init_ctx", initial_context(clip, config.n_ctx, config.ctx_init))
        self.set_classes(classnames)

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

        The [SOS] + context prefix is encoded once for all C classes (see `text_tower`).
        """
        return self.clip.encode_shared_prefix(self.prompts.shared_prefix(context),
                                              self.prompts.suffix, self.prompts.eot_index)

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

    def model(self, image_features: torch.Tensor, labels: torch.Tensor | None = None,
              dataset_size: int | None = None) -> None:
        raise NotImplementedError

    def guide(self, image_features: torch.Tensor, labels: torch.Tensor | None = None,
              dataset_size: int | None = None) -> None:
        raise NotImplementedError
