"""The one place where open_clip's causal text transformer is run on a cut sequence."""

from __future__ import annotations

import torch
from torch import nn


def causal_text_features(tower: nn.Module, embeddings: torch.Tensor, eot_index: torch.Tensor
                         ) -> torch.Tensor:
    """Token embeddings (N, T, W) with EOT positions (N,) -> projected EOT features (N, D).

    `tower` is an open_clip CLIP or TextTransformer. The transformer is causal and pools at the
    EOT token, so running it on the first T positions (T > every EOT position, slicing
    `positional_embedding` and `attn_mask` here; open_clip does not) equals `encode_text` on
    the full padded sequence.
    """
    length = embeddings.shape[-2]
    x = embeddings + tower.positional_embedding[:length].to(embeddings.dtype)
    x = tower.transformer(x, attn_mask=tower.attn_mask[:length, :length])
    x = tower.ln_final(x)
    x = x[torch.arange(x.shape[0], device=x.device), eot_index]
    if isinstance(tower.text_projection, nn.Linear):
        return tower.text_projection(x)
    return x if tower.text_projection is None else x @ tower.text_projection
