"""CoOp prompts: `[SOS] ctx_1 .. ctx_n <class name> . [EOT]` as token embeddings.

The n context positions are placeholders; `ClassPrompts.splice` puts context vectors there.
Context vectors may carry any leading sample or batch dimensions (Pyro particles, per-image
residuals): splicing broadcasts them against the C class prompts without Python loops.
"""

from __future__ import annotations

import torch
from torch import nn

from bayesprompt.clip.model import FrozenCLIP
from bayesprompt.errors import UserError


def prompt_classname(classname: str) -> str:
    """How a class name is written in a prompt: underscores become spaces."""
    return classname.replace("_", " ")


class ClassPrompts(nn.Module):
    """Frozen token embeddings around the context slots, for C classes.

    Buffers: `prefix` (C, 1, W) the SOS embedding; `suffix` (C, T - 1 - n_ctx, W) class-name,
    '.' and EOT embeddings; `eot_index` (C,). T is the longest EOT position + 1.
    """

    def __init__(self, clip: FrozenCLIP, classnames: list[str], n_ctx: int) -> None:
        super().__init__()
        check_context_fits(clip, classnames, n_ctx)
        placeholder = " ".join(["X"] * n_ctx)
        ids = clip.tokenize([f"{placeholder} {prompt_classname(c)}." for c in classnames])
        eot_index = ids.argmax(dim=-1)
        length = int(eot_index.max()) + 1
        embeddings = clip.token_embeddings(ids[:, :length])
        self.n_ctx = n_ctx
        self.classnames = list(classnames)
        self.register_buffer("prefix", embeddings[:, :1])
        self.register_buffer("suffix", embeddings[:, 1 + n_ctx:])
        self.register_buffer("eot_index", eot_index)

    def splice(self, context: torch.Tensor) -> torch.Tensor:
        """Context (..., n_ctx, W) -> prompt embeddings (..., C, T, W)."""
        *lead, n_ctx, width = context.shape
        n_classes = self.prefix.shape[0]
        context = context.unsqueeze(-3).expand(*lead, n_classes, n_ctx, width)
        prefix = self.prefix.expand(*lead, *self.prefix.shape)
        suffix = self.suffix.expand(*lead, *self.suffix.shape)
        return torch.cat([prefix, context, suffix], dim=-2)

    def shared_prefix(self, context: torch.Tensor) -> torch.Tensor:
        """Context (..., n_ctx, W) -> [SOS] + context (..., 1 + n_ctx, W), one for all classes.

        `shared_prefix(context)[..., None, :, :]` followed by `suffix` is `splice(context)`.
        """
        sos = self.prefix[0].expand(*context.shape[:-2], 1, context.shape[-1])
        return torch.cat([sos, context], dim=-2)


def check_context_fits(clip: FrozenCLIP, classnames: list[str], n_ctx: int) -> None:
    """[SOS], n_ctx context tokens, the longest class name with '.' and [EOT] must fit in the
    text encoder's context length, or the prompts would be cut silently."""
    ids = clip.tokenize([f"{prompt_classname(c)}." for c in classnames])
    name_tokens = ids.argmax(dim=-1) - 1                                  # (C,)
    longest = int(name_tokens.argmax())
    room = ids.shape[-1] - 2 - int(name_tokens[longest])
    if n_ctx > room:
        raise UserError(
            f"--n-ctx {n_ctx} does not fit: the text encoder reads {ids.shape[-1]} tokens, and "
            f"the longest class prompt ('{classnames[longest]}', {int(name_tokens[longest])} "
            f"tokens) with the start and end tokens leaves room for {room} context tokens. "
            f"Pass --n-ctx {room} or fewer."
        )


def initial_context(clip: FrozenCLIP, n_ctx: int, ctx_init: str | None,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """(n_ctx, W) context: the embeddings of `ctx_init` words, or N(0, 0.02^2) when None/''."""
    if not ctx_init:
        noise = torch.randn(n_ctx, clip.embed_dim, generator=generator)
        return (0.02 * noise).to(clip.device)
    ids = clip.tokenize([ctx_init.replace("_", " ")])
    n_tokens = int(ids.argmax(dim=-1)) - 1
    if n_tokens != n_ctx:
        raise UserError(
            f"The context initialisation '{ctx_init}' is {n_tokens} tokens but n_ctx is {n_ctx}. "
            f"Pass --n-ctx {n_tokens}, other words, or --ctx-init '' for a random start."
        )
    return clip.token_embeddings(ids[:, 1:1 + n_ctx])[0]
