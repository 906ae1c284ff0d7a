"""torch.hub entry points: ``torch.hub.load(<repo>, "dinov2_vits14", weights=<path, URL or "official">)``.

Without ``weights`` the backbone is randomly initialised (nothing is downloaded).
"""

dependencies = ["torch"]

from dinoscale.hub import (  # noqa: E402,F401  (torch.hub reads the names defined in this module)
    dinov2_vitb14,
    dinov2_vitb14_reg,
    dinov2_vitg14,
    dinov2_vitg14_reg,
    dinov2_vitl14,
    dinov2_vitl14_reg,
    dinov2_vits14,
    dinov2_vits14_reg,
)
