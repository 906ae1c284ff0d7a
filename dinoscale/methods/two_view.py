"""``TwoViewMethod``: the whole step of the methods without teacher that compare the projected [CLS] tokens of
two views of each image (SimCLR, Barlow Twins). A subclass brings its projector and loss."""

from __future__ import annotations

from torch import nn

from dinoscale.models.factory import build_backbone
from dinoscale.methods.views import multicrop_collate, multicrop_transform

__all__ = ["TwoViewMethod"]


class TwoViewMethod(nn.Module):
    """A method without teacher that projects the [CLS] tokens of the two global crops and compares them.

    Subclasses set ``self.cfg``, ``self.loss`` (a module taking the two views' projections ``(z_a, z_b)``)
    and ``loss_name`` (the logged term), and build the projector in :meth:`build_projector`.
    """

    uses_teacher = False
    loss_name: str

    def build_projector(self, embed_dim: int) -> nn.Module:
        raise NotImplementedError

    def build_networks(self) -> tuple[nn.ModuleDict, None]:
        # The backbone is built first after the loop's seed, so it is the network "random_init" rebuilds.
        backbone = build_backbone(self.cfg.model, drop_path_rate=self.cfg.model.drop_path_rate)
        # No masking in these objectives: the mask token never gets a gradient, so it stays out of the
        # optimizer (whose checkpointed state must cover every parameter it optimizes). It is still exported.
        backbone.mask_token.requires_grad_(False)
        return nn.ModuleDict({"backbone": backbone, "projector": self.build_projector(backbone.embed_dim)}), None

    def build_transform(self):
        return multicrop_transform(self.cfg.crops, local_crops_number=0)

    def build_collate(self, patch_size: int):
        return multicrop_collate(self.cfg.crops, patch_size)

    def forward(self, student: nn.ModuleDict, teacher: None, batch: dict, sched: dict):
        """Returns (loss, {loss_name: loss}); ``teacher`` and ``sched`` are not used."""
        cls = student["backbone"](batch["global_crops"], is_training=True)["x_norm_clstoken"]
        # One forward for both views (crop-major: view A of all images, then view B), so batch-norm
        # statistics in the projector cover both views.
        z_a, z_b = student["projector"](cls).chunk(2)
        loss = self.loss(z_a, z_b)
        return loss, {self.loss_name: loss.detach()}
