"""The Pyro program of a prompt model: the `PromptModel` base of every model file, class
prompts, priors, guides and hand-crafted templates.

    from bayesprompt.program import PromptModel
"""

from bayesprompt.program.base import (
    GROUP_OPTIMIZERS,
    OptimizerGroup,
    PromptConfig,
    PromptModel,
    in_param_scope,
)

__all__ = ["GROUP_OPTIMIZERS", "OptimizerGroup", "PromptConfig", "PromptModel", "in_param_scope"]
