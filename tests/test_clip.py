"""The frozen CLIP likelihood: truncated prompt encoding and loading errors."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_BACKBONE

from bayesprompt.clip.factory import config_digest, load_clip
from bayesprompt.clip.model import FrozenCLIP, ImageStats
from bayesprompt.errors import UserError

PROMPTS = ["a photo of a cat.", "a centered satellite photo of Annual Crop Land.",
           "X X X X Herbaceous Vegetation Land."]


def test_truncated_encoding_matches_encode_text_on_vit_b16() -> None:
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-16")
    clip = FrozenCLIP(model, "ViT-B-16:random-init", ImageStats(224, (0,) * 3, (1,) * 3, "bicubic"),
                      open_clip.get_tokenizer("ViT-B-16"))
    ids = clip.tokenize(PROMPTS)
    with torch.no_grad():
        reference = F.normalize(model.encode_text(ids), dim=-1)
    truncated = clip.encode_texts(PROMPTS)
    assert int(ids.argmax(-1).max()) + 1 < 20  # the cut really is much shorter than 77
    torch.testing.assert_close(truncated, reference, atol=1e-5, rtol=1e-5)


def test_encode_prompts_takes_leading_dimensions(tiny_clip) -> None:
    ids = tiny_clip.tokenize(PROMPTS)
    eot = ids.argmax(-1)
    embeddings = tiny_clip.token_embeddings(ids[:, :int(eot.max()) + 1])
    batched = embeddings.expand(2, 3, *embeddings.shape)
    features = tiny_clip.encode_prompts(batched, eot)
    assert features.shape == (2, 3, len(PROMPTS), tiny_clip.feature_dim)
    torch.testing.assert_close(features[1, 2], tiny_clip.encode_prompts(embeddings, eot))


def test_model_config_json_goes_through_open_clip_registry(tiny_clip) -> None:
    assert "tiny_clip" in open_clip.list_models()
    assert tiny_clip.identity == f"tiny_clip:{config_digest('tiny_clip')}:random-init"
    assert tiny_clip.image_stats.size == 32
    assert all(not p.requires_grad for p in tiny_clip.parameters())


def test_local_checkpoint_file_is_loaded(tiny_clip, tmp_path) -> None:
    weights = tmp_path / "weights.pt"
    torch.save(tiny_clip.model.state_dict(), weights)
    reloaded = load_clip(TINY_BACKBONE, str(weights))
    assert str(weights) in reloaded.identity
    torch.testing.assert_close(reloaded.encode_texts(PROMPTS), tiny_clip.encode_texts(PROMPTS))


@pytest.mark.parametrize(("backbone", "pretrained", "message"), [
    ("NoSuchNet", None, "Unknown backbone 'NoSuchNet'"),
    ("missing/config.json", None, "No open_clip model config"),
    (TINY_BACKBONE, "nonsense-tag", "neither a file nor a pretrained tag"),
    ("RN50", "openai", "Could not obtain the 'openai' weights of RN50"),
])
def test_loading_errors_are_clear(backbone, pretrained, message) -> None:
    with pytest.raises(UserError, match=message):
        load_clip(backbone, pretrained)


def test_non_causal_text_tower_is_refused(tmp_path) -> None:
    config = json.loads(open(TINY_BACKBONE).read())
    config["custom_text"] = True
    config["text_cfg"].update(no_causal_mask=True, pool_type="last")
    path = tmp_path / "tiny_siglip.json"
    path.write_text(json.dumps(config))
    with pytest.raises(UserError, match="tiny_siglip.*'last'.*not causal"):
        load_clip(str(path))


def test_the_embedded_weights_are_identified_by_their_content(monkeypatch, tmp_path) -> None:
    """A run trained with MiniCLIP's own weights loads from any checkout or installation: the
    identity names the weights' digest, not the path and time of the file."""
    from bayesprompt.clip import factory, miniclip

    first = load_clip("MiniCLIP").identity
    copy = tmp_path / "miniclip.pt"
    copy.write_bytes(miniclip.miniclip_weights_path().read_bytes())
    monkeypatch.setitem(factory.EMBEDDED_WEIGHTS, "MiniCLIP", lambda: copy)
    assert load_clip("MiniCLIP").identity == first
    assert ":embedded-sha256:" in first
    state = torch.load(copy, weights_only=True)
    name = next(k for k, v in state.items() if v.is_floating_point())
    state[name] = state[name] + 1
    torch.save(state, copy)  # other weights: another identity
    assert load_clip("MiniCLIP").identity != first
