"""CLIP as a frozen likelihood: `load_clip` (factory.py) gives a `FrozenCLIP` (model.py), whose
causal text tower is cut at the longest EOT (text_tower.py); MiniCLIP (miniclip.py) is the
project's own small CLIP, pretrained on the offline world."""

from bayesprompt.clip.factory import load_clip
from bayesprompt.clip.model import FrozenCLIP

__all__ = ["FrozenCLIP", "load_clip"]
