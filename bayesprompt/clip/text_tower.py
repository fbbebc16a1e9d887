"""open_clip's causal text transformer, run on only the work prompt learning needs.

Two paths read the same open_clip modules (the weights and the reference stay open_clip's):

- `causal_text_features`: open_clip's own transformer on sequences cut at the longest EOT. It
  is bit-for-bit what MiniCLIP's pretraining used, so the committed weights rebuild exactly.
- `shared_prefix_features`: the fast path of prompt learning. A prompt is
  `prefix + suffix`, the prefix ([SOS] + context) shared by all C classes of one context
  sample, the suffix (class name, '.', EOT) shared by all samples. In a causal transformer the
  prefix never sees the suffix, so its keys and values are computed once per sample and reused
  by the C class suffixes. Attention is `F.scaled_dot_product_attention`, causal (flash
  kernels on CUDA) for the prefix, with a boolean mask (memory-efficient kernels) for the
  suffixes. In the last layer only the EOT rows need queries and the MLP. Work is split into
  chunks of (sample, class) sequences under a memory budget; with gradients, each chunk is
  recomputed in the backward pass (activation checkpointing), so peak memory is that of one
  chunk, whatever L * B * C is.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from bayesprompt.errors import UserError

#: Fraction of the free memory a default budget takes: RAM is shared with the data, the
#: image features and other processes; a GPU holds little else in prompt learning.
DEFAULT_BUDGET_FRACTION = {"cpu": 0.25, "cuda": 0.5}
#: Activations kept per token and layer for the backward pass, in units of the width W:
#: ln_1 out, q, k, v, prefix-extended k and v, attention out, projection, residual, ln_2 out,
#: c_fc out, GELU out (4 W each) and margin. On ViT-B/16 shapes it overestimates by about 1.5x
#: (C = 500, L = 10: a 4.07 GiB budget, 2.9 GiB of peak RSS above the model's).
SAVED_WIDTHS_PER_TOKEN_LAYER = 24


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


@dataclass(frozen=True)
class TextBudget:
    """How much text encoding may run at once.

    `prompt_chunk`: (sample, class) sequences per chunk; None derives it from `memory_gb`, the
    memory the text tower may take (None: a fraction of the device's free memory).
    """

    prompt_chunk: int | None = None
    memory_gb: float | None = None

    def __post_init__(self) -> None:
        if self.prompt_chunk is not None and self.prompt_chunk < 1:
            raise UserError(f"--prompt-chunk must be a positive number of prompts, got "
                            f"{self.prompt_chunk}. Leave it out to size chunks by memory.")
        if self.memory_gb is not None and not self.memory_gb > 0:
            raise UserError(f"--text-memory-gb must be positive, got {self.memory_gb}. Leave it "
                            "out to use a fraction of the device's free memory.")

    def memory_bytes(self, device: torch.device) -> int:
        """The budget in bytes: `memory_gb`, else a fraction of the free memory of `device`."""
        if self.memory_gb is not None:
            return int(self.memory_gb * 2**30)
        return int(DEFAULT_BUDGET_FRACTION.get(device.type, 0.25) * free_memory_bytes(device))


def free_memory_bytes(device: torch.device) -> int:
    """Free memory of a CUDA device (`mem_get_info`), else the RAM available to new work."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            fields = dict(line.split(":", 1) for line in meminfo)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def sequence_bytes(tower: nn.Module, tokens: int, keys: int, dtype: torch.dtype,
                   with_grad: bool) -> int:
    """Memory one sequence of `tokens` rows attending to `keys` positions takes at once."""
    blocks = tower.transformer.resblocks
    width = tower.ln_final.weight.shape[0]
    heads = blocks[0].attn.num_heads
    element = torch.finfo(dtype).bits // 8
    per_layer = tokens * (SAVED_WIDTHS_PER_TOKEN_LAYER * width + 2 * heads * keys) * element
    if not with_grad:
        return 2 * per_layer  # one layer's transients, double-buffered
    if tower.transformer.grad_checkpointing:  # layer inputs kept, one layer recomputed
        return tokens * width * element * len(blocks) + per_layer
    return per_layer * len(blocks)


def shared_prefix_features(tower: nn.Module, prefix: torch.Tensor, suffix: torch.Tensor,
                           eot_index: torch.Tensor, budget: TextBudget | None = None
                           ) -> torch.Tensor:
    """Prefixes (G, p, W) and suffixes (1 or G, C, S, W) -> EOT features (G, C, D).

    Sequence (g, c) is `prefix[g] + suffix[g or 0, c]`, its EOT at position `eot_index[c]`, or
    `eot_index[g, c]` for EOT positions (G, C) (p <= EOT < p + S). Equals open_clip's
    `encode_text` of those sequences (before normalisation). `tower` is an open_clip CLIP or
    TextTransformer; its `transformer.grad_checkpointing` (open_clip's
    `set_grad_checkpointing`) recomputes each layer of the suffix pass in the backward pass.
    """
    groups, prefix_len, _ = prefix.shape
    n_classes, suffix_len = suffix.shape[-3:-1]
    if not bool(((eot_index >= prefix_len) & (eot_index < prefix_len + suffix_len)).all()):
        raise ValueError("every EOT position must lie in the suffix")
    prefix_kv = _prefix_keys_values(tower, prefix)
    chunk = _chunk_size(tower, budget or TextBudget(), prefix.device, suffix_len,
                        prefix_len + suffix_len, prefix.dtype)
    if chunk >= groups * n_classes:
        return _suffix_features(tower, prefix_kv, suffix, eot_index)
    class_chunk = min(n_classes, chunk)
    group_chunk = max(1, chunk // class_chunk)
    rows = []
    for g in range(0, groups, group_chunk):
        kv = [(k[g:g + group_chunk], v[g:g + group_chunk]) for k, v in prefix_kv]
        part = suffix if suffix.shape[0] == 1 else suffix[g:g + group_chunk]
        eot = eot_index if eot_index.dim() == 1 else eot_index[g:g + group_chunk]
        row = []
        for c in range(0, n_classes, class_chunk):
            args = (tower, kv, part[:, c:c + class_chunk], eot[..., c:c + class_chunk])
            if torch.is_grad_enabled():
                row.append(checkpoint(_suffix_features, *args, use_reentrant=False))
            else:
                row.append(_suffix_features(*args))
        rows.append(torch.cat(row, dim=1))
    return torch.cat(rows, dim=0)


def _chunk_size(tower: nn.Module, budget: TextBudget, device: torch.device, tokens: int,
                keys: int, dtype: torch.dtype) -> int:
    """Sequences per chunk: the budget's `prompt_chunk`, else its memory over one sequence's."""
    if budget.prompt_chunk is not None:
        return budget.prompt_chunk
    per_sequence = sequence_bytes(tower, tokens, keys, dtype, torch.is_grad_enabled())
    return max(1, budget.memory_bytes(device) // per_sequence)


def _prefix_keys_values(tower: nn.Module, prefix: torch.Tensor
                        ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Prefixes (G, p, W) -> keys and values (G, heads, p, W / heads) of every layer."""
    blocks = tower.transformer.resblocks
    x = prefix + tower.positional_embedding[:prefix.shape[1]].to(prefix.dtype)
    keys_values = []
    for block in blocks[:-1]:
        q, k, v = _queries_keys_values(block, block.ln_1(x))
        keys_values.append((k, v))
        x = _block_output(block, x, _attention(q, k, v, is_causal=True))
    keys_values.append(_queries_keys_values(blocks[-1], blocks[-1].ln_1(x), queries=False)[1:])
    return keys_values


def _suffix_features(tower: nn.Module, prefix_kv: list[tuple[torch.Tensor, torch.Tensor]],
                     suffix: torch.Tensor, eot_index: torch.Tensor) -> torch.Tensor:
    """Suffixes (1 or G, C, S, W) after prefixes given by their keys/values, EOT positions
    (C,) or (G, C) -> (G, C, D).

    Row-wise work runs on the N suffix rows up to each EOT only (`SuffixRows`): the rows after
    a shorter class name's EOT, its padding to the longest name, can never reach an EOT.
    """
    blocks = tower.transformer.resblocks
    groups, _, prefix_len, _ = prefix_kv[0][0].shape
    n_classes, suffix_len = suffix.shape[-3:-1]
    rows = SuffixRows(groups, n_classes, suffix_len, eot_index - prefix_len)
    positions = tower.positional_embedding[prefix_len:prefix_len + suffix_len]
    x = rows.take(suffix + positions.to(suffix.dtype))                       # (N, W)
    mask = torch.ones(suffix_len, prefix_len + suffix_len, dtype=torch.bool,
                      device=x.device).tril(prefix_len)  # the prefix, then causal
    for block, (k, v) in zip(blocks[:-1], prefix_kv[:-1], strict=True):
        if tower.transformer.grad_checkpointing and torch.is_grad_enabled():
            x = checkpoint(_suffix_layer, block, x, k, v, mask, rows, use_reentrant=False)
        else:
            x = _suffix_layer(block, x, k, v, mask, rows)
    last = blocks[-1]
    y = last.ln_1(x)
    _, k, v = _queries_keys_values(last, y, queries=False, pad=rows.pad)   # (G, C, h, S, d)
    k, v = (_with_prefix(p, s) for p, s in zip(prefix_kv[-1], (k, v), strict=True))
    at_eot = y[rows.eot].unsqueeze(-2)                                       # (G C, 1, W)
    q = _queries_keys_values(last, at_eot, keys=False)[0]                    # (G C, h, 1, d)
    keys = torch.arange(prefix_len + suffix_len, device=x.device)
    visible = keys <= prefix_len + rows.eot_in_suffix                      # (G C, p + S)
    attended = _attention(q, k.flatten(0, 1), v.flatten(0, 1), visible[:, None, None])
    x = _block_output(last, x[rows.eot].unsqueeze(-2), attended)            # (G C, 1, W)
    return _project(tower, tower.ln_final(x.squeeze(-2))).unflatten(0, (groups, n_classes))


class SuffixRows:
    """The N rows of G x C suffixes of S positions that lie at or before their EOT.

    `eot_in_suffix` (C,) or (G, C): each EOT's position within the suffix. Row-wise work
    (projections, MLP, norms) runs on (N, ...) rows; attention pads them to (G, C, S, ...).
    """

    def __init__(self, groups: int, n_classes: int, suffix_len: int,
                 eot_in_suffix: torch.Tensor) -> None:
        eot = eot_in_suffix.expand(groups, n_classes).reshape(-1)              # (G C,)
        valid = torch.arange(suffix_len, device=eot.device) <= eot[:, None]    # (G C, S)
        self.shape = (groups, n_classes, suffix_len)
        self.index = valid.flatten().nonzero().squeeze(1)                      # (N,)
        row_of = torch.zeros(valid.numel(), dtype=torch.long, device=eot.device)
        row_of[self.index] = torch.arange(self.index.numel(), device=eot.device)
        #: The row of each (g, c)'s EOT (G C,), and its position within the suffix (G C, 1).
        self.eot = row_of[torch.arange(eot.numel(), device=eot.device) * suffix_len + eot]
        self.eot_in_suffix = eot[:, None]

    def take(self, padded: torch.Tensor) -> torch.Tensor:
        """(G or 1, C, S, F) -> (N, F): the rows up to each EOT (1: shared by all groups)."""
        flat = padded.flatten(0, -2)
        index = self.index % flat.shape[0] if padded.shape[0] == 1 else self.index
        return flat.index_select(0, index)

    def pad(self, rows: torch.Tensor) -> torch.Tensor:
        """(N, F) -> (G, C, S, F), zeros after each EOT."""
        padded = rows.new_zeros(math.prod(self.shape), rows.shape[-1])
        return padded.index_copy(0, self.index, rows).unflatten(0, self.shape)


def _suffix_layer(block: nn.Module, x: torch.Tensor, prefix_k: torch.Tensor,
                  prefix_v: torch.Tensor, mask: torch.Tensor, rows: SuffixRows) -> torch.Tensor:
    """One layer on suffix rows (N, W) that attend to the prefix and causally."""
    groups, n_classes, _ = rows.shape
    q, k, v = _queries_keys_values(block, block.ln_1(x), pad=rows.pad)   # (G, C, h, S, d)
    k, v = _with_prefix(prefix_k, k), _with_prefix(prefix_v, v)
    attended = _attention(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), mask)
    return _block_output(block, x, attended.unflatten(0, (groups, n_classes)), take=rows.take)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
    """`F.scaled_dot_product_attention` of (N, h, Tq, d) queries on (N, h, Tk, d) keys/values.

    On the CPU it runs in fp32 even under bf16 autocast: at prompt lengths the attention is a
    sliver of the work, and the CPU's bf16 flash-attention backward was 10x slower than fp32's.
    """
    if q.device.type != "cpu" or q.dtype == torch.float32:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
    with torch.autocast("cpu", enabled=False):
        out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                             is_causal=is_causal)
    return out.to(q.dtype)


def _with_prefix(prefix: torch.Tensor, suffix: torch.Tensor) -> torch.Tensor:
    """Prefix keys (G, h, p, d) before suffix keys (G, C, h, S, d) -> (G, C, h, p + S, d)."""
    prefix = prefix.unsqueeze(1).expand(-1, suffix.shape[1], -1, -1, -1)
    return torch.cat([prefix.to(suffix.dtype), suffix], dim=-2)


def _queries_keys_values(block: nn.Module, y: torch.Tensor, queries: bool = True,
                         keys: bool = True, pad: Callable[[torch.Tensor], torch.Tensor] | None
                         = None) -> tuple[torch.Tensor | None, ...]:
    """Normalised rows (..., T, W) -> q, k, v (..., heads, T, W / heads); None where not asked.

    Reads `in_proj_weight`/`in_proj_bias` of nn.MultiheadAttention or open_clip's Attention,
    and applies its per-head `ln_q`/`ln_k` where present. `pad` maps projected rows (N, F) to
    (..., T, F) first (`SuffixRows.pad`).
    """
    attn = block.attn
    width = y.shape[-1]
    parts = [(queries, slice(0, width)), (keys, slice(width, 2 * width)),
             (keys, slice(2 * width, 3 * width))]
    wanted = [part for asked, part in parts if asked]
    rows = slice(wanted[0].start, wanted[-1].stop)
    bias = None if attn.in_proj_bias is None else compute_weight(attn.in_proj_bias)[rows]
    projected = F.linear(y, compute_weight(attn.in_proj_weight)[rows], bias)
    if pad is not None:
        projected = pad(projected)
    split = iter(projected.unflatten(-1, (len(wanted), attn.num_heads, -1))  # (..., T, n, h, d)
                 .movedim(-3, 0).transpose(-3, -2).unbind(0))
    q, k, v = (next(split) if asked else None for asked, _ in parts)
    if q is not None and hasattr(attn, "ln_q"):
        q = attn.ln_q(q)
    if k is not None and hasattr(attn, "ln_k"):
        k = attn.ln_k(k)
    return q, k, v


def _block_output(block: nn.Module, x: torch.Tensor, attended: torch.Tensor,
                  take: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Residual rows (..., T, W) and attention output (..., heads, T, d) -> the block's output.

    Head scale, inner norm, output projection, post-attention norm and LayerScale where the
    block has them; then the MLP half of the block. `take` maps the merged heads
    (G, C, S, W) to the residual's rows (N, W) first (`SuffixRows.take`).
    """
    attn = block.attn
    if getattr(attn, "head_scale", None) is not None:
        attended = attended * attn.head_scale
    out = attended.movedim(-3, -2).flatten(-2)
    if take is not None:
        out = take(out)
    out = _linear(attn.out_proj, getattr(attn, "ln_inner", nn.Identity())(out))
    x = x + block.ls_1(getattr(block, "ln_attn", nn.Identity())(out))
    y = block.ln_2(x)
    if not isinstance(block.mlp, nn.Sequential):
        return x + block.ls_2(block.mlp(y))
    for layer in block.mlp:
        y = _linear(layer, y) if isinstance(layer, nn.Linear) else layer(y)
    return x + block.ls_2(y)


def _linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """`layer(x)` with its frozen weights cast once to autocast's dtype (`compute_weight`)."""
    bias = None if layer.bias is None else compute_weight(layer.bias)
    return F.linear(x, compute_weight(layer.weight), bias)


def compute_weight(weight: torch.Tensor) -> torch.Tensor:
    """A frozen weight in the dtype autocast computes in, cast once and kept on the tensor.

    Autocast caches its casts only of weights that require grad, so a frozen CLIP's weights
    were cast again in every call (ViT-B/16's text tower: 38M weights, twice per step). The
    copy is the one autocast makes, so results do not change; it is made again when the
    weight's dtype, device, storage or version (an in-place change) differ. Outside autocast,
    and for weights that require grad, `weight` itself.
    """
    device = weight.device.type
    if (weight.requires_grad or not weight.is_floating_point()
            or not torch.is_autocast_enabled(device)):
        return weight
    dtype = torch.get_autocast_dtype(device)
    key = (dtype, weight.dtype, weight.device, weight.data_ptr(), weight._version)
    cached = getattr(weight, "_bayesprompt_cast", None)
    if cached is None or cached[0] != key:
        cached = (key, weight.detach().to(dtype))
        weight._bayesprompt_cast = cached
    return cached[1]


def _project(tower: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """EOT rows after ln_final (..., W) -> (..., D) through `text_projection`."""
    if isinstance(tower.text_projection, nn.Linear):
        return _linear(tower.text_projection, x)
    return x if tower.text_projection is None else x @ compute_weight(tower.text_projection)


def check_supported(tower: nn.Module, identity: str) -> None:
    """A UserError for attention this module does not reproduce (scaled cosine attention)."""
    for block in tower.transformer.resblocks:
        if getattr(block.attn, "logit_scale", None) is not None or not hasattr(
                block.attn, "in_proj_weight"):
            raise UserError(
                f"The text tower of '{identity}' uses an attention variant (scaled cosine "
                "attention or separate q/k/v projections) that bayesprompt's prompt encoder "
                "does not implement. Choose an OpenAI-style CLIP text tower such as ViT-B-16's."
            )

