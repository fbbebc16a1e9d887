"""A frozen open_clip model as a likelihood: encode images once, encode prompt embeddings often.

`FrozenCLIP` wraps a loaded open_clip model (`factory.load_clip` makes one): its image tower,
its causal text tower cut at the longest EOT (`text_tower.py`), the logit scale, the autocast
precision and the memory budget of prompt encoding.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from open_clip.model import CLIP
from open_clip.transformer import TextTransformer
from torch import nn

from bayesprompt.clip.text_tower import TextBudget, check_supported, shared_prefix_features
from bayesprompt.errors import UserError

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


#: open_clip's resize modes of the test transform that `data.features.image_transform` restates.
RESIZE_MODES = ("shortest", "longest", "squash")


@dataclass(frozen=True)
class ImageStats:
    """What the image tower expects: square size, normalisation and the test-time resize.

    `resize_mode` is open_clip's: 'shortest' (resize the short side, centre crop), 'longest'
    (resize the long side, pad), 'squash' (resize to the square, ignoring the aspect ratio).
    """

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    resize_mode: str = "shortest"


class FrozenCLIP(nn.Module):
    """An open_clip CLIP with every weight frozen, exposing what prompt learning needs.

    Text features are computed from token *embeddings* (so context vectors can be learned or
    sampled) by the causal text transformer cut at the longest EOT position of the batch, with
    the [SOS] + context prefix shared by all classes (`bayesprompt.clip.text_tower`), in chunks
    under `text_budget`.
    """

    def __init__(self, model: nn.Module, identity: str, image_stats: ImageStats,
                 tokenizer: Callable, precision: str = "fp32",
                 text_budget: TextBudget | None = None) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.text = _causal_text_tower(model, identity)
        self.text_budget = text_budget or TextBudget()
        self.identity = identity
        self.image_stats = image_stats
        self.tokenizer = tokenizer
        self.precision = precision
        self.embed_dim = int(self.text.ln_final.weight.shape[0])  # W, width of token embeddings
        self.feature_dim = _feature_dim(self.text.text_projection, self.embed_dim)  # D

    @property
    def device(self) -> torch.device:
        return self.text.positional_embedding.device

    @property
    def logit_scale(self) -> torch.Tensor:
        """exp(logit_scale), a scalar."""
        return self.model.logit_scale.exp().float()

    def autocast(self) -> contextlib.AbstractContextManager:
        """fp16/bf16 autocast on CUDA, bf16 autocast on the CPU; a no-op in fp32."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=PRECISIONS[self.precision])

    def images_per_batch(self, prompts_per_image: int) -> int:
        """Images whose prompts (L * C each) fit half the text budget as features, no grad."""
        per_prompt = 4 * self.feature_dim * 4  # fp32 features, normalised copy, logits, probs
        budget = self.text_budget.memory_bytes(self.device) // 2
        return max(1, budget // (prompts_per_image * per_prompt))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each text layer in the backward pass (open_clip's flag, read by the tower)."""
        self.text.transformer.grad_checkpointing = enable

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """Token ids (N, context_length), on the model's device."""
        return self.tokenizer(texts).to(self.device)

    @torch.no_grad()
    def token_embeddings(self, token_ids: torch.Tensor) -> torch.Tensor:
        """(N, T) ids -> (N, T, W) frozen input embeddings."""
        return self.text.token_embedding(token_ids).float()

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised pixels -> (B, D) unit-norm image features."""
        with self.autocast():
            features = self.model.encode_image(images.to(self.device))
        return F.normalize(features.float(), dim=-1)

    def encode_prompts(self, embeddings: torch.Tensor, eot_index: torch.Tensor) -> torch.Tensor:
        """Prompt embeddings (..., C, T, W) with EOT positions (C,) -> (..., C, D), unit norm.

        Runs the causal transformer on the first T positions only; T is the longest EOT + 1 of
        the prompts, so this equals `encode_text` on the full padded sequence. Every prompt is
        encoded on its own; `encode_shared_prefix` shares the work of a common prefix.
        """
        *lead, n_prompts, length, width = embeddings.shape
        flat = embeddings.reshape(-1, 1, length, width)  # each prompt a group of one class
        eot = eot_index.to(self.device).expand(*lead, n_prompts).reshape(-1, 1)
        return self.encode_shared_prefix(flat[:, 0, :1], flat[:, :, 1:], eot).reshape(
            *lead, n_prompts, -1)

    def encode_shared_prefix(self, prefix: torch.Tensor, suffix: torch.Tensor,
                             eot_index: torch.Tensor) -> torch.Tensor:
        """Prefixes (..., p, W) and class suffixes (C, S, W) -> (..., C, D), unit norm.

        Prompt (..., c) is `prefix[...] + suffix[c]` with its EOT at `eot_index[c]` (C,); the
        prefix's keys and values are computed once for all C classes. Suffixes (G, C, S, W)
        with EOT positions (G, C) give each of the G flattened prefixes its own suffixes.
        """
        *lead, prefix_len, width = prefix.shape
        with self.autocast():
            x = shared_prefix_features(self.text, prefix.reshape(-1, prefix_len, width),
                                       suffix.unsqueeze(0) if suffix.dim() == 3 else suffix,
                                       eot_index.to(self.device), self.text_budget)
        return F.normalize(x.float(), dim=-1).reshape(*lead, suffix.shape[-3], -1)

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """Hand-written prompts, N strings -> (N, D) unit-norm text features (no gradient)."""
        ids = self.tokenize(texts)
        eot = ids.argmax(dim=-1)
        length = int(eot.max()) + 1
        with torch.no_grad():
            embeddings = self.token_embeddings(ids[:, :length])
            return self.encode_prompts(embeddings, eot)


def _causal_text_tower(model: nn.Module, identity: str) -> nn.Module:
    """The module holding open_clip's causal text transformer, or a UserError naming the model."""
    tower = model if isinstance(model, CLIP) else getattr(model, "text", None)
    if not isinstance(tower, CLIP | TextTransformer):
        raise UserError(
            f"The text tower of '{identity}' is {type(tower).__name__}, not open_clip's causal "
            "TextTransformer. Prompt learning here splices context vectors into the token "
            "embeddings of a causal, EOT-pooled text transformer (OpenAI-style CLIP towers); "
            "Hugging Face text towers are not supported. Choose a CLIP model such as ViT-B-16."
        )
    pool_type = getattr(tower, "text_pool_type", getattr(tower, "pool_type", None))
    causal = getattr(tower, "attn_mask", None) is not None
    if pool_type != "argmax" or not causal or getattr(tower, "cls_emb", None) is not None:
        raise UserError(
            f"The text tower of '{identity}' pools with '{pool_type}' and is "
            f"{'causal' if causal else 'not causal'}: bayesprompt needs a causal text "
            "transformer pooled at the EOT token ('argmax'), as in OpenAI CLIP. SigLIP-style "
            "towers ('last' pooling, no causal mask) and CoCa towers cannot be cut at the EOT."
        )
    check_supported(tower, identity)
    return tower


def _feature_dim(projection: nn.Module | torch.Tensor | None, width: int) -> int:
    """D, the width of the joint image-text space."""
    if isinstance(projection, nn.Linear):
        return projection.out_features
    return width if projection is None else int(projection.shape[-1])
