"""Inference: objectives, the SVI loop, checkpoints, the posterior predictive, training logs."""
