"""E2MIM's machinery: a hand-crafted and a learnable view of the classes, class-wise visual
Mixup (mixup.py) and the mutual-information lower bounds that tie the views (mi_bounds.py).
The model files `models/e2mim.py` and `models/e2mim_vpt.py` build on `DualViewModel`."""

from bayesprompt.dual_view.model import DualViewModel, E2MIMOptions, with_mixed, with_mixed_features

__all__ = ["DualViewModel", "E2MIMOptions", "with_mixed", "with_mixed_features"]
