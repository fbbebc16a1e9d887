"""The one posterior predictive: seeded draws of the latents, the model replayed on them.

results.json's accuracies, `Run.predict` and the analysis package all go through
`posterior_draws` and `predictive_batches`, so the same S and seed give the same numbers.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pyro
import pyro.util
import torch
from pyro import poutine
from pyro.infer import Predictive
from tqdm.auto import tqdm

from bayesprompt.inference import elbos
from bayesprompt.program.base import PromptModel


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block with Pyro's RNGs (torch, random, numpy) seeded by `seed`; afterwards the
    caller's states are back, so an evaluation never shifts what comes after it."""
    state = pyro.util.get_rng_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        pyro.set_rng_seed(seed)
        try:
            yield
        finally:
            pyro.util.set_rng_state(state)


def per_image_sites(program: PromptModel, features: torch.Tensor) -> tuple[str, ...]:
    """Latent sites of the model that sit inside the `images` plate (one value per image)."""
    trace = poutine.trace(program.model).get_trace(features[:1])
    return tuple(name for name in program.latent_sites
                 if any(f.name == "images" for f in trace.nodes[name]["cond_indep_stack"]))


@torch.no_grad()
def guide_samples(program: PromptModel, features: torch.Tensor, num_samples: int
                  ) -> tuple[dict[str, torch.Tensor], tuple[str, ...]]:
    """Latent samples from the guide on features (N, D): site -> (S, *event) for global sites,
    (S, N, *event) for per-image ones; and the per-image sites. (The guide's data plate,
    `PromptModel.mark_images_plate`, puts a size-1 dim before global latents: squeezed.)"""
    if not program.latent_sites:
        return {}, ()
    predictive = Predictive(program.guide, num_samples=num_samples, parallel=True,
                            return_sites=list(program.latent_sites))
    latents = predictive(features)
    per_image = per_image_sites(program, features)
    return ({k: v.detach() if k in per_image else v.detach().squeeze(1)
             for k, v in latents.items()}, per_image)


@dataclass
class PosteriorDraws:
    """S posterior draws of the latents for N images.

    `latents`: site -> (S, *event) for global sites, (S, N, *event) for per-image sites.
    S is 1 for point-estimate models (all their draws would be the same).
    """

    latents: dict[str, torch.Tensor]
    per_image: tuple[str, ...]
    num_samples: int

    def batch(self, start: int, stop: int) -> dict[str, torch.Tensor]:
        """The draws of images start..stop: per-image sites sliced, global ones shared."""
        return {k: v[:, start:stop] if k in self.per_image else v
                for k, v in self.latents.items()}


def posterior_draws(program: PromptModel, features: torch.Tensor, num_samples: int, seed: int,
                    shared: dict[str, torch.Tensor] | None = None) -> PosteriorDraws:
    """The one posterior predictive's draws on features (N, D), the same for any batching.

    All N images are drawn at once under `seeded(seed)`, so a per-image latent depends on its
    image and the seed only. Global latents are taken from `shared` when it holds them and
    put there otherwise: one evaluation of several splits (base, new, other datasets) shares
    S global draws. Memory: S x N x event size for per-image sites.
    """
    draws = num_samples if program.stochastic else 1
    elbos.check_evaluable(program, features)
    with seeded(seed):  # the guide first: `Predictive(model, guide=guide)` draws the same
        latents, per_image = guide_samples(program, features, draws)
    if shared is not None:
        for site in latents:
            if site not in per_image:
                latents[site] = shared.setdefault(site, latents[site])
    return PosteriorDraws(latents, per_image, draws)


def replay_model(program: PromptModel, features: torch.Tensor,
                 latents: dict[str, torch.Tensor], per_image: tuple[str, ...],
                 num_samples: int) -> poutine.Trace:
    """The model's trace on features (B, D) with its latents set to S draws (plate dim -2).

    Global latents (S, *event) get a size-1 image dim; per-image ones are (S, B, *event). The
    `y` site's distribution holds the class probabilities (S, B, C); its value is a sampled
    label per draw and image.
    """
    conditioned = {k: v if k in per_image else v.unsqueeze(1) for k, v in latents.items()}
    with pyro.plate("particles", num_samples, dim=-2):
        return poutine.trace(poutine.condition(program.model, data=conditioned)
                             ).get_trace(features)


def batch_bounds(n: int, batch_size: int) -> list[tuple[int, int]]:
    """(start, stop) of batches of N images with no batch of one image (unless N = 1), so a
    text feature batch dim of 1 always means a prompt shared by the whole batch."""
    starts = list(range(0, n, max(batch_size, 2)))
    if len(starts) > 1 and n - starts[-1] == 1:
        starts.pop()
    return list(zip(starts, starts[1:] + [n], strict=True))


def replayed_batches(program: PromptModel, features: torch.Tensor, draws: PosteriorDraws,
                     batch_size: int, desc: str | None = None
                     ) -> Iterator[tuple[int, int, poutine.Trace]]:
    """The model replayed on the draws, batch by batch of features (N, D): (start, stop,
    trace) for every batch (`replay_model`). Run it under `seeded` for reproducible labels."""
    bounds = batch_bounds(features.shape[0], batch_size)
    for start, stop in tqdm(bounds, desc=desc, unit="batch", leave=False, disable=desc is None):
        yield start, stop, replay_model(program, features[start:stop], draws.batch(start, stop),
                                        draws.per_image, draws.num_samples)


@torch.no_grad()
def predictive_probs(program: PromptModel, features: torch.Tensor, num_samples: int,
                     batch_size: int = 64, seed: int = 0,
                     shared: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Class probabilities under S posterior draws: features (N, D) -> (S, N, C).

    The draws come from `posterior_draws` (seeded, independent of `batch_size`, global latents
    shared through `shared`); S is 1 for point-estimate models. The posterior predictive is
    the mean over S. At most `batch_size` images a batch, fewer where their S * C prompts
    exceed the text budget (`FrozenCLIP.images_per_batch`).
    """
    draws = posterior_draws(program, features, num_samples, seed, shared)
    batch_size = min(batch_size, program.clip.images_per_batch(
        draws.num_samples * len(program.classnames)))
    with seeded(seed):  # the replay samples labels too: keep the caller's RNG untouched
        chunks = [trace.nodes["y"]["fn"].probs.expand(draws.num_samples, stop - start, -1)
                  for start, stop, trace in replayed_batches(program, features, draws,
                                                             batch_size)]
    return torch.cat(chunks, dim=1)
