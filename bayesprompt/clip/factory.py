"""A frozen open_clip model as a likelihood: encode images once, encode prompt embeddings often.

`load_clip` is the one entry point, in the manner of open_clip's factory: a model name (or an
open_clip model-config JSON file) plus a `pretrained` tag or checkpoint file, or an
`hf-hub:org/repo` name (config and weights from the Hugging Face Hub), gives a ready, frozen
`FrozenCLIP` on the chosen device and precision, or a `UserError` that says what to do.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
from open_clip.factory import HF_HUB_PREFIX, load_state_dict
from torch import nn

from bayesprompt.clip.miniclip import MODEL_NAME as MINICLIP
from bayesprompt.clip.miniclip import ensure_miniclip, register_miniclip
from bayesprompt.clip.model import (
    PRECISIONS,
    RESIZE_MODES,
    FrozenCLIP,
    ImageStats,
    _causal_text_tower,
)
from bayesprompt.clip.text_tower import TextBudget
from bayesprompt.errors import UserError, first_line
from bayesprompt.files import read_json

#: Backbones the project provides itself: name -> function that registers the open_clip config
#: and returns the local weights file (MiniCLIP, pretrained offline on the procedural world).
EMBEDDED_WEIGHTS: dict[str, Callable[[], Path]] = {MINICLIP: ensure_miniclip}


MODEL_CONFIG_FIELDS = ("embed_dim", "vision_cfg", "text_cfg")
MODEL_CONFIG_HELP = ("an open_clip model config: a JSON object with 'embed_dim' (a number), "
                     "'vision_cfg' and 'text_cfg' (objects), as in open_clip/model_configs/")


def _model_name(backbone: str) -> str:
    """Register a model-config JSON file with open_clip and return its name; else `backbone`.

    `hf-hub:org/repo` names are returned unchanged: open_clip reads them from the Hub.
    """
    if backbone.startswith(HF_HUB_PREFIX):
        if not backbone[len(HF_HUB_PREFIX):].strip("/"):
            raise UserError(f"'{backbone}' names no repository: write hf-hub:org/repo, e.g. "
                            "hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K.")
        return backbone
    if backbone.endswith(".json"):
        path = Path(backbone)
        if not path.is_file():
            raise UserError(
                f"No open_clip model config at '{path}'. Pass an existing JSON file with "
                "'embed_dim', 'vision_cfg' and 'text_cfg' (see open_clip/model_configs/)."
            )
        _check_model_config(read_json(path, MODEL_CONFIG_HELP), path)
        open_clip.add_model_config(path)
        return path.stem
    if backbone == MINICLIP:
        register_miniclip()
    if backbone not in open_clip.list_models():
        known = ", ".join(m for m in open_clip.list_models() if m.startswith(("ViT-B", "RN50")))
        raise UserError(
            f"Unknown backbone '{backbone}'. Give an open_clip model name (e.g. {known}, ...) "
            "or the path of an open_clip model-config JSON file."
        )
    return backbone


def _check_model_config(config: dict, path: Path) -> None:
    """A UserError naming the missing or mistyped top-level fields of a model config."""
    missing = [key for key in MODEL_CONFIG_FIELDS if key not in config]
    mistyped = [key for key, kind in zip(MODEL_CONFIG_FIELDS, (int | float, dict, dict),
                                         strict=True)
                if key in config and not isinstance(config[key], kind)]
    if missing or mistyped:
        problems = ([f"missing {', '.join(missing)}"] if missing else []) + (
            [f"wrong type of {', '.join(mistyped)}"] if mistyped else [])
        raise UserError(f"The backbone config {path} is incomplete ({'; '.join(problems)}): "
                        f"it should be {MODEL_CONFIG_HELP}.")


def config_digest(name: str, config: dict | None = None) -> str:
    """A short hash of the content of the model config open_clip builds `name` from.

    `config` is given for Hub models, whose config `load_clip` has already read.
    """
    config = open_clip.get_model_config(name) if config is None else config
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class HubModel:
    """An `hf-hub:` backbone found in the local Hugging Face cache (or downloaded into it)."""

    config: dict  # open_clip's model_cfg
    revision: str  # the snapshot (commit) folder holding the files


def _hub_model(name: str, hub_cache_dir: str | None) -> HubModel:
    """Config and weights of an `hf-hub:` backbone, fetched as open_clip fetches them.

    open_clip itself only warns when the weights cannot be fetched and goes on with a random
    init; here a missing file is a UserError that says what was tried and what to do.
    """
    repo = name[len(HF_HUB_PREFIX):]
    try:
        config_file = open_clip.pretrained.download_pretrained_from_hf(
            repo, filename="open_clip_config.json", cache_dir=hub_cache_dir)
        open_clip.pretrained.download_pretrained_from_hf(repo, cache_dir=hub_cache_dir)
    except (OSError, RuntimeError, ValueError) as error:
        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
        why = ("HF_HUB_OFFLINE is set, so the Hub was not asked" if offline else
               "the Hub is unreachable, or the repository is unknown or not an open_clip model")
        raise UserError(
            f"Could not load the backbone {name}: open_clip looked for its "
            "open_clip_config.json and weights (open_clip_model.safetensors or "
            "open_clip_pytorch_model.bin) in the Hugging Face cache "
            f"({hub_cache_dir or '$HF_HOME, default ~/.cache/huggingface'}) and then on the Hub, "
            f"and found them in neither: {why} ({first_line(error)}). Download the model once "
            "where the Hub is reachable (HF_HUB_OFFLINE=0, the same --backbone), or pass a "
            "local model config and checkpoint: --backbone config.json --pretrained weights.bin."
        ) from None
    config = read_json(Path(config_file), "open_clip's open_clip_config.json of a Hub model")
    if not isinstance(config.get("model_cfg"), dict):
        raise UserError(f"The open_clip_config.json of {name} ({config_file}) has no "
                        "'model_cfg' object: the repository is not an open_clip model.")
    return HubModel(config["model_cfg"], Path(config_file).parent.name)


def _check_pretrained(name: str, pretrained: str) -> None:
    """Fail early, with a clear message, for a tag that is neither known nor a file."""
    if os.path.isfile(pretrained) or open_clip.get_pretrained_cfg(name, pretrained):
        return
    tags = open_clip.list_pretrained_tags_by_model(name)
    raise UserError(
        f"'{pretrained}' is neither a file nor a pretrained tag of {name}. Known tags: "
        f"{', '.join(tags) or 'none'}. To use a local checkpoint, pass its path."
    )


def load_clip(backbone: str, pretrained: str | None = None, device: str = "cpu",
              precision: str = "fp32", hub_cache_dir: str | None = None,
              text_budget: TextBudget | None = None, grad_checkpointing: bool = False
              ) -> FrozenCLIP:
    """Build a frozen CLIP from an open_clip name or model-config JSON, and weights.

    `pretrained` is an open_clip tag (e.g. 'openai'), a local checkpoint file, or None: the
    project's own weights for an embedded backbone (MiniCLIP), otherwise a random init that is
    seeded, so every process builds the same model. `text_budget` bounds the memory of prompt
    encoding; `grad_checkpointing` recomputes text layers in the backward pass.
    """
    if precision not in PRECISIONS:
        raise UserError(f"Unknown precision '{precision}'; choose one of {list(PRECISIONS)}.")
    if precision == "fp16" and not device.startswith("cuda"):
        raise UserError(
            f"fp16 is a CUDA precision; on '{device}' use --precision bf16 (on processors with "
            "bf16 matrix units) or fp32."
        )
    name = _model_name(backbone)
    hub = None
    if name.startswith(HF_HUB_PREFIX):
        if pretrained:
            raise UserError(
                f"--pretrained {pretrained} cannot be combined with --backbone {name}: an "
                "hf-hub: backbone brings its own weights from the Hub repository. Leave out "
                "--pretrained, or give an open_clip model name or config JSON with --pretrained."
            )
        hub = _hub_model(name, hub_cache_dir)
    embedded = hub is None and pretrained is None and name in EMBEDDED_WEIGHTS
    if embedded:
        pretrained = str(EMBEDDED_WEIGHTS[name]())
    if pretrained:
        _check_pretrained(name, pretrained)
    elif hub is None:
        logging.warning("%s has random weights: zero-shot accuracy will be at chance.", name)
    try:
        model = _create_model(name, pretrained, device, hub_cache_dir)
    except (*CHECKPOINT_ERRORS, TypeError) as error:
        if pretrained and not os.path.isfile(pretrained):
            raise UserError(
                f"Could not obtain the '{pretrained}' weights of {name} ({error}). This "
                "machine may be offline: download the checkpoint where you have network "
                "(open_clip downloads it into ~/.cache/huggingface), copy the file here "
                f"and pass --pretrained /path/to/checkpoint.bin."
            ) from None
        raise UserError(_load_problem(name, pretrained, device, error)) from None
    _causal_text_tower(model, name)  # before the tokenizer, which may need other packages
    stats = image_stats(model, name)
    if hub is None:
        weights = _embedded_identity(pretrained) if embedded else _weights_identity(pretrained)
        identity = f"{name}:{config_digest(name)}:{weights}"
    else:
        identity = f"{name}:{config_digest(name, hub.config)}:hf-hub@{hub.revision}"
    tokenizer = open_clip.get_tokenizer(name, cache_dir=hub_cache_dir)
    clip = FrozenCLIP(model, identity, stats, tokenizer, precision, text_budget)
    clip.set_grad_checkpointing(grad_checkpointing)
    return clip


#: What reading or loading a checkpoint file that does not fit raises, in open_clip or torch.
CHECKPOINT_ERRORS = (RuntimeError, OSError, ValueError, KeyError, EOFError, AttributeError,
                     StopIteration, pickle.UnpicklingError)


def _create_model(name: str, pretrained: str | None, device: str, hub_cache_dir: str | None
                  ) -> nn.Module:
    """open_clip's model (`hf-hub:` names as they are); a random init is seeded (same everywhere).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return open_clip.create_model(name, pretrained=pretrained or None, device=device,
                                      cache_dir=hub_cache_dir)


def _load_problem(name: str, pretrained: str | None, device: str, error: Exception) -> str:
    """Why building `name` with the weights file `pretrained` failed: config or checkpoint."""
    if pretrained:
        try:
            model = _create_model(name, None, device, None)
        except (*CHECKPOINT_ERRORS, TypeError):
            pass  # the config itself does not build
        else:
            return _checkpoint_problem(model, name, pretrained, error)
    return (f"Could not build the model {name} from its config ({first_line(error)}). Check "
            f"the values of its fields: the config should be {MODEL_CONFIG_HELP}.")


def _checkpoint_problem(model: nn.Module, name: str, checkpoint: str, error: Exception) -> str:
    """Why `checkpoint` could not be loaded into `model`: unreadable, not weights, or misfit."""
    try:
        state_dict = load_state_dict(checkpoint, weights_only=True)
    except CHECKPOINT_ERRORS as reading:
        reason = (type(reading).__name__ if isinstance(reading, pickle.UnpicklingError)
                  else first_line(reading))  # torch's unpickling message advises unsafe loading
        return (f"--pretrained {checkpoint} is not a PyTorch checkpoint that can be read "
                f"({reason}). Pass a file saved with torch.save holding a CLIP "
                "state dict (open_clip's .pt/.bin checkpoints), or an open_clip pretrained tag.")
    if not isinstance(state_dict, dict) or not all(
            isinstance(value, torch.Tensor) for value in state_dict.values()):
        return (f"--pretrained {checkpoint} does not hold a state dict of tensors: it is not a "
                "CLIP checkpoint. Pass the weights file of the backbone.")
    expected = model.state_dict()
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    resized = [key for key in expected
               if key in state_dict and state_dict[key].shape != expected[key].shape]
    first = (missing + unexpected + resized + [first_line(error)])[0]
    return (f"--pretrained {checkpoint} holds the weights of another architecture than {name}: "
            f"{len(missing)} parameters missing, {len(unexpected)} unexpected and {len(resized)} "
            f"of another shape (first: {first}). Pass the checkpoint trained for {name}, or the "
            "--backbone the checkpoint was trained with.")


def _embedded_identity(path: str) -> str:
    """The identity of the project's own weights file: its content's digest, so that a run
    trained with them loads from any checkout or installation of the same weights."""
    return "embedded-sha256:" + hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def _weights_identity(pretrained: str | None) -> str:
    """A string that changes when the weights change: tag, or path with size and mtime."""
    if not pretrained:
        return "random-init"
    if os.path.isfile(pretrained):
        stat = os.stat(pretrained)
        return f"{os.path.abspath(pretrained)}@{stat.st_size}:{stat.st_mtime_ns}"
    return pretrained


def image_stats(model: nn.Module, name: str) -> ImageStats:
    """Size, mean, std, interpolation and resize mode from open_clip's preprocess config.

    `open_clip.get_model_preprocess_cfg` holds what the model's config, its pretrained tag or
    its Hub repository set (open_clip's defaults otherwise: OpenAI mean and std, bicubic,
    'shortest'). Non-square inputs are refused.
    """
    config = open_clip.get_model_preprocess_cfg(model)
    size = config["size"]
    height, width = (size, size) if isinstance(size, int) else size
    resize_mode = config.get("resize_mode", "shortest")
    if height != width or resize_mode not in RESIZE_MODES:
        raise UserError(
            f"{name} expects {height}x{width} images resized with '{resize_mode}': bayesprompt "
            f"supports square inputs resized with one of {', '.join(RESIZE_MODES)}. Choose "
            "another backbone, or a model config with a square image_size."
        )
    return ImageStats(int(height), tuple(config["mean"]), tuple(config["std"]),
                      config.get("interpolation", "bicubic"), resize_mode)

