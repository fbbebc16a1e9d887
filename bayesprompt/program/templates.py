"""Hand-crafted prompt templates and the one zero-shot classifier builder.

`IMAGENET_TEMPLATES` are the 80 templates of CLIP's zero-shot evaluation (Radford et al., 2021),
each with one `{}` for the class name: `IMAGENET_TEMPLATES[0].format("goldfish")`.
`zero_shot_classifier` turns templates into class text features: zero-shot CLIP, E2MIM's
hand-crafted view and the analysis' template coverage all use it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bayesprompt.clip.model import FrozenCLIP
from bayesprompt.program.prompts import prompt_classname

IMAGENET_TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)

#: Seven of them: the ensemble of E2MIM's hand-crafted view (`--set templates=ensemble`; the
#: dataset's own template is added).
ENSEMBLE_TEMPLATES = tuple(t for t in IMAGENET_TEMPLATES if t in {
    "a photo of a {}.", "a bad photo of a {}.", "a photo of the large {}.",
    "a photo of the small {}.", "a good photo of a {}.", "itap of a {}.", "art of the {}."})


@torch.no_grad()
def template_text_features(clip: FrozenCLIP, classnames: list[str], templates: list[str],
                           batch_size: int = 512) -> torch.Tensor:
    """Unit-norm text features of every template for every class: (K, C, D)."""
    texts = [t.format(prompt_classname(c)) for t in templates for c in classnames]
    features = torch.cat([clip.encode_texts(texts[i:i + batch_size])
                          for i in range(0, len(texts), batch_size)])
    return features.reshape(len(templates), len(classnames), -1)


def zero_shot_classifier(clip: FrozenCLIP, classnames: list[str], templates: list[str]
                         ) -> torch.Tensor:
    """Class text features (C, D) of hand-crafted templates: the mean of the K templates'
    unit-norm features, renormalised."""
    features = template_text_features(clip, classnames, templates)       # (K, C, D)
    return F.normalize(features.mean(0), dim=-1)
