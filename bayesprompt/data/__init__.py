"""Datasets: CoOp-format readers, few-shot and base/new splits, feature cache, offline world."""
