"""The project's one cache location and the default root of the offline world's datasets."""

from __future__ import annotations

import os
from pathlib import Path

#: Where bayesprompt keeps what it makes (features, few-shot splits, the offline datasets)
#: unless the environment says otherwise.
DEFAULT_CACHE = Path.home() / ".cache" / "bayesprompt"


def cache_root() -> Path:
    """The project's cache folder: $BAYESPROMPT_CACHE, or ~/.cache/bayesprompt. The feature and
    few-shot caches (`--cache-dir`) and MiniCLIP's weights, when not packaged, live here."""
    return Path(os.environ.get("BAYESPROMPT_CACHE", DEFAULT_CACHE))


def data_root() -> Path:
    """The default root of the offline datasets: $BAYESPROMPT_DATA, or ~/.cache/bayesprompt/data
    (not under $BAYESPROMPT_CACHE: moving the feature cache keeps the generated images)."""
    return Path(os.environ.get("BAYESPROMPT_DATA", DEFAULT_CACHE / "data"))
