"""Analysis of Bayesian prompt posteriors: calibration, uncertainty, prompt-space coverage, plots.

Functions take plain arrays (numpy or torch): ``probs`` (S, N, C) per posterior sample,
``labels`` (N,), optional ``split`` (N,) strings, latent samples (S, ...).
"""

from bayesprompt.analysis.calibration import calibration_report
from bayesprompt.analysis.coverage import prompt_spread, template_coverage, template_distances
from bayesprompt.analysis.inference_data import (
    held_out_elpd,
    load_inference_data,
    save_inference_data,
    to_inference_data,
)
from bayesprompt.analysis.uncertainty import separation_auroc, uncertainty_decomposition

from bayesprompt.metrics import aurc, selective_risk
from bayesprompt.program.templates import IMAGENET_TEMPLATES

__all__ = [
    "IMAGENET_TEMPLATES",
    "aurc",
    "calibration_report",
    "held_out_elpd",
    "load_inference_data",
    "prompt_spread",
    "save_inference_data",
    "selective_risk",
    "separation_auroc",
    "template_coverage",
    "template_distances",
    "to_inference_data",
    "uncertainty_decomposition",
]
