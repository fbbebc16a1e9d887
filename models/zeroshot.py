"""Zero-shot CLIP (Radford et al., 2021): the dataset's hand-crafted template, no training.

y_i ~ Categorical(softmax(tau * f_i . t_c)),  t_c = text feature of template.format(class c)
No latent variables and no parameters; the guide is empty.
"""

import pyro
import pyro.distributions as dist

from bayesprompt.program.base import PromptModel
from bayesprompt.program.templates import zero_shot_classifier


class ZeroShot(PromptModel):
    stochastic = False

    def set_classes(self, classnames):
        super().set_classes(classnames)
        self.template_features = zero_shot_classifier(self.clip, classnames,
                                                      [self.config.template])  # (C, D)

    def model(self, image_features, labels=None, dataset_size=None):
        logits = self.class_logits(image_features, self.template_features)  # (B, C)
        with self.images(image_features, dataset_size):
            y = dist.Categorical(logits=logits)
            pyro.deterministic("probs", y.probs, event_dim=1)   # (..., B, C)
            pyro.sample("y", y, obs=labels)

    def guide(self, image_features, labels=None, dataset_size=None):
        pass


Model = ZeroShot
