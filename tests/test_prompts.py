"""CoOp prompt layout, context initialisation and splicing."""

from __future__ import annotations

import pytest
import torch

from bayesprompt.errors import UserError
from bayesprompt.program.prompts import ClassPrompts, initial_context

CLASSES = ["Annual Crop Land", "sea_or_lake", "Forest"]


def test_prompt_layout_and_class_names(tiny_clip) -> None:
    prompts = ClassPrompts(tiny_clip, CLASSES, n_ctx=4)
    ids = tiny_clip.tokenize(["X X X X Annual Crop Land.", "X X X X sea or lake.",
                              "X X X X Forest."])
    assert prompts.eot_index.tolist() == ids.argmax(-1).tolist()
    length = int(ids.argmax(-1).max()) + 1
    expected = tiny_clip.token_embeddings(ids[:, :length])
    spliced = prompts.splice(expected[0, 1:5])
    torch.testing.assert_close(spliced[0], expected[0])
    torch.testing.assert_close(spliced[:, 5:], expected[:, 5:])


def test_splice_broadcasts_leading_dimensions_like_a_loop(tiny_clip) -> None:
    prompts = ClassPrompts(tiny_clip, CLASSES, n_ctx=4)
    context = torch.randn(5, 2, 4, tiny_clip.embed_dim)
    spliced = prompts.splice(context)
    assert spliced.shape[:3] == (5, 2, len(CLASSES))
    for s in range(5):
        for b in range(2):
            torch.testing.assert_close(spliced[s, b], prompts.splice(context[s, b]))


def test_context_from_words_and_random(tiny_clip) -> None:
    words = initial_context(tiny_clip, 4, "a photo of a")
    ids = tiny_clip.tokenize(["a photo of a"])
    torch.testing.assert_close(words, tiny_clip.token_embeddings(ids)[0, 1:5])
    random = initial_context(tiny_clip, 8, "", torch.Generator().manual_seed(0))
    assert random.shape == (8, tiny_clip.embed_dim)
    assert 0.015 < random.std().item() < 0.025
    with pytest.raises(UserError, match="4 tokens but n_ctx is 2"):
        initial_context(tiny_clip, 2, "a photo of a")
