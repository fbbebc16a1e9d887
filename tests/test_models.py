"""Every model file trains (loss goes down) and predicts through the shared SVI machinery."""

from __future__ import annotations

import pytest
import torch

from bayesprompt.inference.predictive import predictive_probs
from bayesprompt.inference.svi import TrainConfig, train
from bayesprompt.program.base import PromptConfig
from bayesprompt.runs.model_files import load_model_class

CLASSES = ["red circle", "blue square", "green star", "yellow heart"]
TRAINED = ["coop", "cocoop", "vpt", "vpt_cond"]


def separable_features(tiny_clip, per_class: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-norm image features (1, N, D) clustered by class, and labels (N,)."""
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(len(CLASSES), tiny_clip.feature_dim, generator=generator)
    labels = torch.arange(len(CLASSES)).repeat_interleave(per_class)
    noise = 0.3 * torch.randn(len(labels), tiny_clip.feature_dim, generator=generator)
    features = torch.nn.functional.normalize(centres[labels] + noise, dim=-1)
    return features.unsqueeze(0), labels


@pytest.mark.parametrize("name", TRAINED)
def test_model_trains_and_predicts(name: str, tiny_clip) -> None:
    torch.manual_seed(0)
    program = load_model_class(name)(tiny_clip, CLASSES, PromptConfig())
    features, labels = separable_features(tiny_clip)
    config = TrainConfig(epochs=12, batch_size=24, num_particles=4, lr=0.02, warmup_epochs=0)
    history = train(program, features, labels, config).loss
    assert len(history) == 12
    assert sum(history[-3:]) / 3 < sum(history[:3]) / 3
    probs = predictive_probs(program, features[0], num_samples=5, batch_size=10)
    samples = 5 if program.stochastic else 1
    assert probs.shape == (samples, len(labels), len(CLASSES))
    torch.testing.assert_close(probs.sum(-1), torch.ones(samples, len(labels)))
    if program.stochastic:
        assert probs.std(0).max() > 0  # posterior samples differ
    params = program.learned_parameters()
    assert params and not any(k.startswith(("clip", "model.")) for k in params)


def test_new_classes_keep_learned_parameters(tiny_clip) -> None:
    program = load_model_class("vpt")(tiny_clip, CLASSES, PromptConfig())
    features, labels = separable_features(tiny_clip)
    train(program, features, labels, TrainConfig(epochs=2, batch_size=24, num_particles=2))
    before = program.prompt_state()["ctx"]
    program.set_classes(["purple moon", "orange cross", "white ring"])
    probs = predictive_probs(program, features[0], num_samples=3)
    assert probs.shape == (3, len(labels), 3)
    torch.testing.assert_close(program.learned_parameters()["ctx"], before)


def test_zeroshot_has_no_parameters_and_uses_the_template(tiny_clip) -> None:
    config = PromptConfig(template="a drawing of a {}.")
    program = load_model_class("zeroshot")(tiny_clip, CLASSES, config)
    features, labels = separable_features(tiny_clip)
    assert train(program, features, labels, TrainConfig(epochs=3)).loss == []
    probs = predictive_probs(program, features[0], num_samples=7)
    text = tiny_clip.encode_texts([f"a drawing of a {c}." for c in CLASSES])
    expected = torch.softmax(tiny_clip.logit_scale * features[0] @ text.T, dim=-1)
    torch.testing.assert_close(probs[0], expected)


def test_a_model_file_given_by_path(tmp_path) -> None:
    from bayesprompt.errors import UserError
    from bayesprompt.runs.model_files import MODELS_DIR
    copy = tmp_path / "my_prior.py"
    copy.write_text((MODELS_DIR / "vpt.py").read_text().replace("class VPT", "class MyPrior")
                    .replace("Model = VPT", "Model = MyPrior"))
    assert load_model_class(str(copy)).__name__ == "MyPrior"
    with pytest.raises(UserError, match="Model file not found"):
        load_model_class(str(tmp_path / "missing.py"))
