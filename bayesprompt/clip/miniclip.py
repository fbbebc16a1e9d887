"""MiniCLIP: a small open_clip CLIP pretrained offline on the procedural world.

The architecture lives in ``configs/MiniCLIP.json`` and is registered with open_clip, so the
usual open_clip calls work once :func:`register_miniclip` has run::

    path = ensure_miniclip()  # registers the config; pretrains only if weights are missing
    model = open_clip.create_model("MiniCLIP", pretrained=str(path))
    tokenizer = open_clip.get_tokenizer("MiniCLIP")

Weights are stored in fp16; open_clip's ``load_state_dict`` casts them into the fp32 model.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from tqdm import tqdm

from bayesprompt.clip.text_tower import causal_text_features
from bayesprompt.files import save_torch
from bayesprompt.paths import cache_root
from bayesprompt.world import procedural as world

MODEL_NAME = "MiniCLIP"
CONFIG_PATH = Path(__file__).parent / "configs" / "MiniCLIP.json"
PACKAGED_WEIGHTS = Path(__file__).parent / "weights" / "miniclip.pt"


def register_miniclip() -> None:
    """Register the MiniCLIP config with open_clip (idempotent)."""
    if MODEL_NAME not in open_clip.list_models():
        open_clip.add_model_config(CONFIG_PATH)


def miniclip_weights_path() -> Path:
    """The committed weights file if present, else the path in the user cache."""
    return PACKAGED_WEIGHTS if PACKAGED_WEIGHTS.exists() else cache_root() / "miniclip.pt"


def ensure_miniclip() -> Path:
    """Register the config and return a weights path, pretraining it (~10 min) if missing."""
    register_miniclip()
    path = miniclip_weights_path()
    if not path.exists():
        print(f"MiniCLIP weights not found; pretraining them into {path}")
        pretrain_miniclip(out_path=path)
    return path


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 images (N, H, W, 3) -> normalised float tensor (N, 3, H, W), as open_clip does."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def encode_text_truncated(model: open_clip.CLIP, tokens: torch.Tensor) -> torch.Tensor:
    """model.encode_text(tokens) computed on the first L positions only, (N, embed_dim).

    L is one past the last end-of-text token in the batch. The text tower is causal and pools
    at the EOT token, so the result equals encode_text; it is just cheaper for short captions.
    """
    eot = tokens.argmax(dim=-1)
    tokens = tokens[:, :int(eot.max()) + 1]
    return causal_text_features(model, model.token_embedding(tokens), eot)


@torch.no_grad()
def zero_shot_accuracy(
    model: open_clip.CLIP,
    tokenizer,
    images: np.ndarray,
    labels: np.ndarray,
    classnames: list[str],
    template: str = "a photo of a {}.",
    batch_size: int = 500,
) -> float:
    """Top-1 zero-shot accuracy of uint8 images (N, H, W, 3) against prompted classnames."""
    text = model.encode_text(tokenizer([template.format(c) for c in classnames]), normalize=True)
    correct = 0
    for start in range(0, len(images), batch_size):
        feats = model.encode_image(to_tensor(images[start : start + batch_size]), normalize=True)
        pred = (feats @ text.T).argmax(dim=-1).numpy()
        correct += int((pred == labels[start : start + batch_size]).sum())
    return correct / len(images)


def evaluate_pretraining(model: open_clip.CLIP, seed: int, per_combo: int = 20) -> dict:
    """Zero-shot accuracy on fresh pretraining-domain photos: seen and held-out combos."""
    tokenizer = open_clip.get_tokenizer(MODEL_NAME)
    rng = np.random.default_rng(seed + 1)
    domain = replace(world.PRETRAIN_DOMAIN, style_probs=(("photo", 1.0),))
    seen, held = world.pretraining_combos(), list(world.HELD_OUT)
    everything = seen + held

    def accuracy(combos: list[tuple[str, str]], candidates: list[tuple[str, str]]) -> float:
        labels = np.repeat(np.arange(len(combos)), per_combo)
        images, _ = world.render(world.sample_scenes(rng, len(labels), combos, domain, labels), rng)
        target = np.array([candidates.index(c) for c in combos])[labels]
        names = [f"{c} {s}" for c, s in candidates]
        return zero_shot_accuracy(model, tokenizer, images, target, names)

    model.eval()
    return {
        "seen": accuracy(seen, seen),
        "held_out": accuracy(held, held),
        "held_out_among_all": accuracy(held, everything),
    }


def contrastive_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    groups: torch.Tensor,
) -> torch.Tensor:
    """Symmetric CLIP loss of normalised features (B, D) with targets spread evenly over the
    pairs of the same group (B,), so that two images of a red star are not negatives.
    """
    logits = logit_scale * image_features @ text_features.T
    same = (groups[:, None] == groups[None, :]).float()
    targets = same / same.sum(dim=1, keepdim=True)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def pretrain_miniclip(
    out_path: Path | None = None,
    steps: int = 1600,
    batch_size: int = 128,
    bank_size: int = 40_000,
    lr: float = 1e-3,
    seed: int = 0,
    num_threads: int = 1,
) -> dict:
    """Contrastively pretrain MiniCLIP on the procedural world; return timing and accuracies.

    A bank of images (never showing a HELD_OUT combination) is rendered once; every step
    draws a batch from it with freshly phrased captions. Saves fp16 weights atomically.
    Deterministic given the seed and the number of threads.
    """
    start = time.time()
    torch.manual_seed(seed)
    caller_threads = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    register_miniclip()
    rng = np.random.default_rng(seed)
    scenes = world.sample_scenes(rng, bank_size, world.pretraining_combos(), world.PRETRAIN_DOMAIN)
    bank, _ = world.render(scenes, rng)
    bank_t = to_tensor(bank)  # (bank_size, 3, 32, 32)

    model = open_clip.create_model(MODEL_NAME)
    tokenizer = open_clip.get_tokenizer(MODEL_NAME)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or "embedding" in n]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.98),
    )
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * s / steps)),
    )
    combo_id = torch.from_numpy(scenes.color * len(world.SHAPES) + scenes.shape)
    model.train()
    bar = tqdm(range(steps), desc="pretrain MiniCLIP")
    for _ in bar:
        idx = rng.integers(bank_size, size=batch_size)
        tokens = tokenizer(world.captions(world.subset(scenes, idx), rng))
        image_features = model.encode_image(bank_t[idx], normalize=True)
        text_features = F.normalize(encode_text_truncated(model, tokens), dim=-1)
        logit_scale = model.logit_scale.exp()
        loss = contrastive_loss(image_features, text_features, logit_scale, combo_id[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        bar.set_postfix(loss=f"{loss.item():.3f}")
    train_seconds = time.time() - start
    torch.set_num_threads(caller_threads)

    metrics = {"train_seconds": train_seconds, **evaluate_pretraining(model, seed)}
    if out_path is not None:
        save_fp16(model, Path(out_path))
    return metrics


def save_fp16(model: torch.nn.Module, path: Path) -> None:
    """Write the model's state dict in fp16 to path atomically (bayesprompt.files)."""
    state = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    save_torch(path, state)
