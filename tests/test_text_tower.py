"""The prompt text tower: exact against open_clip, chunking and checkpointing change nothing."""

from __future__ import annotations

import json
from dataclasses import asdict, replace

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_BACKBONE

import bayesprompt.clip.text_tower as text_tower
import bayesprompt.runs.config as run_config
from bayesprompt.clip.factory import load_clip
from bayesprompt.clip.text_tower import TextBudget, causal_text_features, shared_prefix_features
from bayesprompt.errors import UserError
from bayesprompt.files import write_json
from bayesprompt.inference.predictive import predictive_probs
from bayesprompt.program.base import PromptConfig
from bayesprompt.program.prompts import ClassPrompts
from bayesprompt.runs.config import RunConfig
from bayesprompt.runs.folder import check_resume
from bayesprompt.runs.model_files import load_model_class

CLASSES = ["Annual Crop Land", "Forest", "Herbaceous Vegetation Land", "Highway or Road",
           "Industrial Buildings"]


def full_length_reference(clip, prompts: ClassPrompts, context: torch.Tensor) -> torch.Tensor:
    """open_clip's transformer on full 77-token sequences: context (..., n, W) -> (..., C, D)."""
    spliced = prompts.splice(context)                                    # (..., C, T, W)
    *lead, n_classes, length, width = spliced.shape
    context_length = clip.text.positional_embedding.shape[0]
    padded = F.pad(spliced.reshape(-1, length, width), (0, 0, 0, context_length - length))
    eot = prompts.eot_index.expand(*lead, n_classes).reshape(-1)
    features = causal_text_features(clip.text, padded, eot)
    return F.normalize(features, dim=-1).reshape(*lead, n_classes, -1)


def tiny_variant(tmp_path, name: str, **text_cfg) -> str:
    """tests/tiny_clip.json with extra text_cfg options, as a TextTransformer tower."""
    config = json.loads(open(TINY_BACKBONE).read())
    config["custom_text"] = True
    config["text_cfg"].update(text_cfg)
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(config))
    return str(path)


@pytest.mark.parametrize("backbone", ["ViT-B-16", TINY_BACKBONE])
def test_shared_prefix_equals_encode_text(backbone) -> None:
    clip = load_clip(backbone, "")
    prompts = ClassPrompts(clip, CLASSES, n_ctx=4)
    ids = clip.tokenize([f"X X X X {name}." for name in CLASSES])
    context = clip.token_embeddings(ids[:1, 1:5])                        # (1, 4, W)
    shared = clip.encode_shared_prefix(prompts.shared_prefix(context), prompts.suffix,
                                       prompts.eot_index)                 # (1, C, D)
    with torch.no_grad():
        reference = F.normalize(clip.model.encode_text(ids), dim=-1)
    torch.testing.assert_close(shared[0], reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", [
    {"ls_init_value": 0.5},
    {"block_type": "custom", "qk_norm": True, "scale_heads": True, "scale_attn_inner": True,
     "scale_attn": True, "ls_init_value": 0.5},
    {"proj_type": "none"},
])
def test_attention_layouts_and_projections(tmp_path, variant) -> None:
    """nn.MultiheadAttention and open_clip's Attention blocks, LayerScale, norms, projections."""
    clip = load_clip(tiny_variant(tmp_path, "tiny_variant", **variant), "")
    for module in clip.modules():  # random init leaves LayerNorm at identity: perturb it
        if isinstance(module, torch.nn.LayerNorm) and module.weight is not None:
            torch.nn.init.normal_(module.weight, 1.0, 0.2)
            torch.nn.init.normal_(module.bias, 0.0, 0.2)
    prompts = ClassPrompts(clip, CLASSES, n_ctx=4)
    context = 0.1 * torch.randn(3, 2, 4, clip.embed_dim, generator=torch.Generator().manual_seed(0))
    features = clip.encode_shared_prefix(prompts.shared_prefix(context), prompts.suffix,
                                         prompts.eot_index)
    reference = full_length_reference(clip, prompts, context)
    torch.testing.assert_close(features, reference, atol=1e-5, rtol=1e-5)


def test_scaled_cosine_attention_is_refused(tmp_path) -> None:
    backbone = tiny_variant(tmp_path, "tiny_cosine", scaled_cosine_attn=True)
    with pytest.raises(UserError, match="tiny_cosine.*scaled cosine"):
        load_clip(backbone, "")


def context_and_gradient(clip, prompts: ClassPrompts, context: torch.Tensor, weights: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (L, B, C, D) of a context (L, B, n, W), and d(weights . features)/d context."""
    context = context.clone().requires_grad_(True)
    features = clip.encode_shared_prefix(prompts.shared_prefix(context), prompts.suffix,
                                         prompts.eot_index)
    (gradient,) = torch.autograd.grad((features * weights).sum(), context)
    return features.detach(), gradient


@pytest.mark.parametrize(("budget", "checkpointing"), [
    (TextBudget(prompt_chunk=1), False), (TextBudget(prompt_chunk=3), False),
    (TextBudget(prompt_chunk=7), True), (TextBudget(prompt_chunk=1000), True),
    (TextBudget(memory_gb=1e-6), False),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_chunking_and_checkpointing_change_nothing(budget, checkpointing, dtype) -> None:
    """Equal to 1e-6: exactly so in float64; in float32 relative to the largest gradient, since
    chunks sum the prefix's gradient in another order."""
    clip = load_clip(TINY_BACKBONE, "").to(dtype)
    prompts = ClassPrompts(clip, CLASSES, n_ctx=4).to(dtype)
    generator = torch.Generator().manual_seed(1)
    context = 0.1 * torch.randn(3, 2, 4, clip.embed_dim, generator=generator, dtype=dtype)
    weights = torch.randn(3, 2, len(CLASSES), clip.feature_dim, generator=generator)
    clip.text_budget = TextBudget(prompt_chunk=10_000)
    whole, whole_grad = context_and_gradient(clip, prompts, context, weights)
    torch.testing.assert_close(whole, full_length_reference(clip, prompts, context).float(),
                               atol=1e-5, rtol=1e-5)
    clip.text_budget = budget
    clip.set_grad_checkpointing(checkpointing)
    chunked, chunked_grad = context_and_gradient(clip, prompts, context, weights)
    torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=1e-6)
    scale = 1.0 if dtype == torch.float64 else float(whole_grad.abs().max())
    torch.testing.assert_close(chunked_grad, whole_grad, atol=1e-6 * scale, rtol=1e-6)
    assert whole_grad.abs().max() > 0.1


def test_chunks_split_per_group_suffixes_and_eot() -> None:
    """Per-group suffixes and EOT positions (G, C) are sliced with their groups."""
    clip = load_clip(TINY_BACKBONE, "")
    ids = clip.tokenize([f"a photo of {name}." for name in CLASSES])
    eot = ids.argmax(-1)
    embeddings = clip.token_embeddings(ids[:, :int(eot.max()) + 1])     # (C, T, W)
    suffix = embeddings[:, None, 1:]                                      # (C, 1, T - 1, W)
    prefix = embeddings[:, :1]
    whole = shared_prefix_features(clip.text, prefix, suffix, eot[:, None])
    chunked = shared_prefix_features(clip.text, prefix, suffix, eot[:, None],
                                     TextBudget(prompt_chunk=2))
    torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=1e-6)
    reference = causal_text_features(clip.text, embeddings, eot)
    torch.testing.assert_close(whole[:, 0], reference, atol=1e-5, rtol=1e-5)


def test_bf16_on_cpu_stays_close_to_fp32() -> None:
    fp32 = load_clip(TINY_BACKBONE, "")
    bf16 = load_clip(TINY_BACKBONE, "", precision="bf16")
    prompts = ClassPrompts(fp32, CLASSES, n_ctx=4)
    context = 0.1 * torch.randn(2, 1, 4, fp32.embed_dim, generator=torch.Generator().manual_seed(2))
    exact = fp32.encode_shared_prefix(prompts.shared_prefix(context), prompts.suffix,
                                      prompts.eot_index)
    cheap = bf16.encode_shared_prefix(prompts.shared_prefix(context), prompts.suffix,
                                      prompts.eot_index)
    assert cheap.dtype == torch.float32
    assert (cheap - exact).abs().max() < 0.05
    assert not torch.equal(cheap, exact)  # bf16 arithmetic really ran


@pytest.mark.parametrize(("options", "message"), [
    ({"prompt_chunk": 0}, "--prompt-chunk must be a positive"),
    ({"memory_gb": -1.0}, "--text-memory-gb must be positive"),
])
def test_bad_budgets_are_user_errors(options, message) -> None:
    with pytest.raises(UserError, match=message):
        TextBudget(**options)


def test_fp16_on_cpu_is_a_user_error() -> None:
    with pytest.raises(UserError, match="fp16 is a CUDA precision"):
        load_clip(TINY_BACKBONE, "", precision="fp16")


def test_open_clip_flag_is_the_checkpointing_switch() -> None:
    clip = load_clip(TINY_BACKBONE, "", grad_checkpointing=True)
    assert clip.text.transformer.grad_checkpointing
    clip.model.set_grad_checkpointing(False)
    assert not clip.text.transformer.grad_checkpointing


def test_evaluation_batches_shrink_with_the_budget_and_change_nothing(tiny_clip) -> None:
    program = load_model_class("coop")(tiny_clip, CLASSES, PromptConfig())
    features = F.normalize(torch.randn(7, tiny_clip.feature_dim,
                                       generator=torch.Generator().manual_seed(3)), dim=-1)
    program.guide(features)  # creates the parameters
    whole = predictive_probs(program, features, num_samples=4, batch_size=64)
    budget = tiny_clip.text_budget
    tiny_clip.text_budget = TextBudget(memory_gb=1e-6)
    try:
        assert tiny_clip.images_per_batch(4 * len(CLASSES)) == 1
        one_by_one = predictive_probs(program, features, num_samples=4, batch_size=64)
    finally:
        tiny_clip.text_budget = budget
    assert tiny_clip.images_per_batch(4 * len(CLASSES)) >= 64
    torch.testing.assert_close(one_by_one, whole, atol=1e-6, rtol=1e-6)


def test_default_precision_follows_the_processor(monkeypatch) -> None:
    monkeypatch.setattr(run_config, "cpu_has_bf16_matmul", lambda: False)
    assert run_config.default_precision("cpu") == "fp32"
    assert run_config.default_precision("cuda:1") == "bf16"
    monkeypatch.setattr(run_config, "cpu_has_bf16_matmul", lambda: True)
    assert run_config.default_precision("cpu") == "bf16"


def test_a_run_resumes_with_other_memory_options(tmp_path) -> None:
    config = RunConfig(out=str(tmp_path)).resolved()
    write_json(tmp_path / "config.json", asdict(config))
    check_resume(replace(config, prompt_chunk=8, text_memory_gb=1.5, grad_checkpointing=True),
                 tmp_path)
    with pytest.raises(UserError, match="other options.*seed"):
        check_resume(replace(config, seed=2), tmp_path)


def features_and_gradient(clip, prompts: ClassPrompts, context: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (L, C, D) of a context (L, n, W) and the gradient of their weighted sum."""
    context = context.clone().requires_grad_(True)
    features = clip.encode_shared_prefix(prompts.shared_prefix(context), prompts.suffix,
                                         prompts.eot_index)
    weights = torch.randn(features.shape, generator=torch.Generator().manual_seed(5))
    (gradient,) = torch.autograd.grad((features * weights).sum(), context)
    return features.detach(), gradient


def test_frozen_weights_cast_once_give_autocasts_own_result(monkeypatch) -> None:
    """The kept bf16 copies are autocast's casts: features and gradients equal bit for bit."""
    clip = load_clip(TINY_BACKBONE, "", precision="bf16")
    prompts = ClassPrompts(clip, CLASSES, n_ctx=4)
    context = 0.1 * torch.randn(3, 4, clip.embed_dim, generator=torch.Generator().manual_seed(4))
    cached = features_and_gradient(clip, prompts, context)
    weight = clip.text.transformer.resblocks[0].mlp.c_fc.weight
    assert weight._bayesprompt_cast[1].dtype == torch.bfloat16
    monkeypatch.setattr(text_tower, "compute_weight", lambda weight: weight)
    recast = features_and_gradient(clip, prompts, context)
    for kept, autocast in zip(cached, recast, strict=True):
        assert torch.equal(kept, autocast)


def test_a_changed_weight_is_cast_again() -> None:
    clip = load_clip(TINY_BACKBONE, "", precision="bf16")
    prompts = ClassPrompts(clip, CLASSES, n_ctx=4)
    context = 0.1 * torch.randn(2, 4, clip.embed_dim, generator=torch.Generator().manual_seed(6))
    before = features_and_gradient(clip, prompts, context)[0]
    with torch.no_grad():
        clip.text.transformer.resblocks[-1].mlp.c_proj.weight.mul_(2.0)  # in place
    after = features_and_gradient(clip, prompts, context)[0]
    fresh = load_clip(TINY_BACKBONE, "", precision="bf16")
    with torch.no_grad():
        fresh.text.transformer.resblocks[-1].mlp.c_proj.weight.mul_(2.0)
    torch.testing.assert_close(after, features_and_gradient(fresh, prompts, context)[0],
                               atol=0, rtol=0)
    assert not torch.equal(before, after)


#: bf16 keeps 8 significant bits: unit-norm features stay within 1e-2 of open_clip's own bf16
#: computation and gradients within 3e-2 (normwise; measured: 4e-3 and 1.4e-2 on the tiny
#: tower, 1.5e-3 and 1.1e-2 on ViT-B/16).
BF16_FEATURE_TOLERANCE, BF16_GRADIENT_TOLERANCE = 1e-2, 3e-2


@pytest.mark.parametrize("backbone", [TINY_BACKBONE, "ViT-B-16"])
def test_bf16_prompts_of_unequal_length_match_open_clip_under_autocast(backbone) -> None:
    """Padding-free suffix rows and kept casts in bf16 against open_clip's transformer on the
    full 77 tokens under the same bf16 autocast: features and gradients."""
    clip = load_clip(backbone, "", precision="bf16")
    prompts = ClassPrompts(clip, CLASSES, n_ctx=4)
    assert len(set(prompts.eot_index.tolist())) > 2  # names of unequal length
    context = 0.1 * torch.randn(2, 4, clip.embed_dim, generator=torch.Generator().manual_seed(7))
    ours, our_gradient = features_and_gradient(clip, prompts, context)
    context = context.clone().requires_grad_(True)
    with clip.autocast():
        reference = full_length_reference(clip, prompts, context).float()
    weights = torch.randn(reference.shape, generator=torch.Generator().manual_seed(5))
    (gradient,) = torch.autograd.grad((reference * weights).sum(), context)
    assert (ours - reference.detach()).abs().max() < BF16_FEATURE_TOLERANCE
    assert (our_gradient - gradient).norm() / gradient.norm() < BF16_GRADIENT_TOLERANCE


def test_emulated_bf16_is_not_taken_for_bf16_hardware(monkeypatch) -> None:
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True, raising=False)
    assert not run_config.cpu_has_bf16_matmul()
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert run_config.cpu_has_bf16_matmul()
