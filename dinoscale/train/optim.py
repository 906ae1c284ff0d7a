"""AdamW with DINOv2's parameter groups: layer-wise lr decay, no weight decay where the model says so, and a
separately scheduled prototype ("last") layer.

The optimizer's groups carry *multipliers* (``lr_multiplier``, ``wd_multiplier``, ``is_last_layer``); the training
loop writes the scheduled values into them every step with :func:`apply_schedule_`:

    group.lr           = (last_layer_lr if group.is_last_layer else lr) * group.lr_multiplier
    group.weight_decay = wd * group.wd_multiplier

The model owns the metadata, as in timm: a module's ``no_weight_decay()`` names its parameters that are not
decayed, and a backbone's ``layer_id(name)`` gives the depth of each of its parameters (embeddings 0, ``blocks.i``
``i + 1``, the final norm ``n_blocks + 1``). A parameter belongs to the innermost module declaring
``no_weight_decay()``; parameters of modules that declare nothing are decayed unless 1-d (biases, norm scales).
Parameters without a layer id (heads, projectors) sit at the top, ``n_blocks + 1``.

Layer-wise decay (BEiT/DINOv2): with ``L = n_blocks``, ``lr_multiplier = lr_decay_rate ** (L + 1 - layer_id)``, so
the top of the network trains at the full lr and each block below it at ``lr_decay_rate`` times the block above.
The patch embedding's lr is further scaled by ``patch_embed_lr_mult``."""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import torch
from torch import nn

from dinoscale.models.heads import is_last_layer_param
from dinoscale.parallel import strip_wrapper_prefixes

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # builds without torch.distributed
    DTensor = None

__all__ = [
    "get_param_groups",
    "build_optimizer",
    "apply_schedule_",
    "clip_grad_norm_",
    "step_unless_",
    "init_state_",
    "set_trainable_",
]


class _MetadataOwner(NamedTuple):
    """A submodule that declares its optimizer metadata, with its name prefix (wrapper components removed)."""

    prefix: str
    module: nn.Module
    no_weight_decay: frozenset[str]


def _metadata_owners(model: nn.Module) -> list[_MetadataOwner]:
    """Every submodule with ``no_weight_decay()``, innermost (longest prefix) first."""
    owners = [
        _MetadataOwner(
            strip_wrapper_prefixes(prefix),
            module,
            frozenset(strip_wrapper_prefixes(n) for n in module.no_weight_decay()),
        )
        for prefix, module in model.named_modules()
        if callable(getattr(module, "no_weight_decay", None))
    ]
    return sorted(owners, key=lambda owner: -len(owner.prefix))


def _owner_of(name: str, owners: list[_MetadataOwner]) -> tuple[_MetadataOwner | None, str]:
    """The innermost owner of parameter ``name`` and the name relative to it (``name`` itself without owner)."""
    for owner in owners:
        if not owner.prefix:
            return owner, name
        if name.startswith(owner.prefix + "."):
            return owner, name[len(owner.prefix) + 1 :]
    return None, name


def get_param_groups(
    model: nn.Module,
    *,
    lr_decay_rate: float = 1.0,
    patch_embed_lr_mult: float = 1.0,
    n_blocks: int,
) -> list[dict]:
    """Group the trainable parameters of ``model`` (the student) for :func:`build_optimizer`.

    Each group is ``{"params", "lr_multiplier", "wd_multiplier", "is_last_layer", "name"}``; parameters that share
    the same (lr_multiplier, wd_multiplier, is_last_layer) share a group. Groups come in the order their first
    parameter appears in ``model.named_parameters()``, so the same model always gives the same groups (needed to
    load an optimizer state dict on resume). Parameters with ``requires_grad=False`` are left out.
    """
    if not 0.0 < lr_decay_rate <= 1.0:
        raise ValueError(f"lr_decay_rate must lie in (0, 1], got {lr_decay_rate}")
    if patch_embed_lr_mult < 0:
        raise ValueError(f"patch_embed_lr_mult must be >= 0, got {patch_embed_lr_mult}")
    if n_blocks < 0:
        raise ValueError(f"n_blocks must be >= 0, got {n_blocks}")

    owners = _metadata_owners(model)
    groups: dict[tuple[float, float, bool], dict] = {}
    for raw_name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        name = strip_wrapper_prefixes(raw_name)
        owner, local_name = _owner_of(name, owners)
        layer_id = n_blocks + 1
        if owner is not None and callable(getattr(owner.module, "layer_id", None)):
            layer_id = owner.module.layer_id(local_name)
        if not 0 <= layer_id <= n_blocks + 1:
            raise ValueError(
                f"parameter '{raw_name}' has layer id {layer_id}, outside 0..n_blocks + 1 with n_blocks={n_blocks} "
                "(n_blocks must be the backbone's depth)"
            )
        lr_multiplier = lr_decay_rate ** (n_blocks + 1 - layer_id)
        if "patch_embed" in name.split("."):
            lr_multiplier *= patch_embed_lr_mult
        no_decay = local_name in owner.no_weight_decay if owner is not None else param.ndim <= 1
        wd_multiplier = 0.0 if no_decay else 1.0
        is_last_layer = is_last_layer_param(name)
        key = (lr_multiplier, wd_multiplier, is_last_layer)
        if key not in groups:
            label = f"lr_x{lr_multiplier:.4g}_wd_x{wd_multiplier:g}" + ("_last_layer" if is_last_layer else "")
            groups[key] = {
                "params": [],
                "lr_multiplier": lr_multiplier,
                "wd_multiplier": wd_multiplier,
                "is_last_layer": is_last_layer,
                "name": label,
            }
        groups[key]["params"].append(param)
    if not groups:
        raise ValueError("the model has no trainable parameters (all have requires_grad=False)")
    return list(groups.values())


def build_optimizer(
    param_groups: list[dict],
    *,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    fused: bool | None = None,
) -> torch.optim.AdamW:
    """AdamW over ``param_groups`` (from :func:`get_param_groups`).

    ``fused=None`` picks torch's fused kernel when every parameter lives on a CPU or CUDA device, and the foreach
    (multi-tensor) implementation otherwise. The fused kernel can skip a step on the device: the loop sets
    ``optimizer.found_inf`` (a 1-element float tensor, non-zero = skip) before ``step()``, so skipping a
    non-finite step needs no host sync. lr and weight decay start at 0: the loop sets them with
    :func:`apply_schedule_` before each step. Parameters are passed as they are, so DTensor (FSDP2) parameters
    work unchanged.
    """
    groups = [dict(group) for group in param_groups]  # AdamW fills defaults in; keep the caller's dicts clean
    for group in groups:
        for key in ("params", "lr_multiplier", "wd_multiplier", "is_last_layer"):
            if key not in group:
                raise ValueError(
                    f"param group '{group.get('name', '?')}' lacks '{key}'; build it with get_param_groups"
                )
        group["params"] = list(group["params"])
    if fused is None:
        params = [p for group in groups for p in group["params"]]
        fused = all(p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(
        groups,
        lr=0.0,
        betas=betas,
        eps=eps,
        weight_decay=0.0,
        fused=fused or None,
        foreach=None if fused else True,
    )


def apply_schedule_(optimizer: torch.optim.Optimizer, *, lr: float, wd: float, last_layer_lr: float) -> None:
    """Write this step's scheduled lr and weight decay into every param group (see the module docstring)."""
    for group in optimizer.param_groups:
        try:
            lr_multiplier, wd_multiplier = group["lr_multiplier"], group["wd_multiplier"]
            is_last_layer = group["is_last_layer"]
        except KeyError as exc:
            raise KeyError(
                f"optimizer param group '{group.get('name', '?')}' lacks {exc}; build it with get_param_groups"
            ) from None
        group["lr"] = (last_layer_lr if is_last_layer else lr) * lr_multiplier
        group["weight_decay"] = wd * wd_multiplier


def step_unless_(optimizer: torch.optim.Optimizer, skip: torch.Tensor) -> None:
    """``optimizer.step()`` unless the 0-dim bool tensor ``skip`` is true.

    With torch's fused kernel the decision stays on the device (``found_inf``: the kernel leaves parameters,
    moments and step counts as they were), so no host sync; other implementations read ``skip`` on the host.
    """
    if optimizer.defaults.get("fused"):
        optimizer.found_inf = skip.float().reshape(())  # 0-dim, like the step counts it is subtracted from
        optimizer.step()
    elif not bool(skip):
        optimizer.step()


def optimized_parameters(optimizer: torch.optim.Optimizer, module: nn.Module) -> list[nn.Parameter]:
    """The parameters of ``module`` that ``optimizer`` updates, in ``module``'s order."""
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    return [p for p in module.parameters() if id(p) in held]


def set_trainable_(optimizer: torch.optim.Optimizer, module: nn.Module, trainable: bool) -> None:
    """Freeze (``trainable=False``) or unfreeze the parameters of ``module`` that ``optimizer`` updates.

    A frozen parameter has ``requires_grad=False``: autograd computes no gradient for it (nor for what lies only
    below it, so a frozen backbone costs no backward), and AdamW skips a parameter without a gradient: the
    parameter and its state (moments, step count) stay as they are. Parameters the optimizer does not hold (e.g. an
    unused mask token) are left alone.
    """
    for p in optimized_parameters(optimizer, module):
        if p.requires_grad != trainable:
            p.requires_grad_(trainable)


@torch.no_grad()
def init_state_(optimizer: torch.optim.Optimizer) -> None:
    """Create AdamW's per-parameter state now, as its first step would (step count 0, zero moments).

    For runs whose first steps leave some parameters out (a frozen backbone): their state exists from the start,
    so a checkpoint taken then holds it like every other parameter's and a resume loads it back, unchanged. Done
    with torch's own initialisation (one step of zero gradients at lr 0 and weight decay 0, which moves nothing),
    then the step counts are set back to 0. Call it on a fresh optimizer, before any step.
    """
    if optimizer.state:
        raise RuntimeError("init_state_ needs a fresh optimizer (it has state already)")
    saved = [(group["lr"], group["weight_decay"]) for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"], group["weight_decay"] = 0.0, 0.0
        for p in group["params"]:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    for group, (lr, weight_decay) in zip(optimizer.param_groups, saved):
        group["lr"], group["weight_decay"] = lr, weight_decay
    for state in optimizer.state.values():
        state["step"].zero_()


def clip_grad_norm_(parameters: Iterable[torch.Tensor] | torch.Tensor, max_norm: float | None) -> torch.Tensor:
    """Total L2 norm of the gradients, clipping them to ``max_norm`` first when ``max_norm > 0``.

    Returns a 0-dim tensor on the gradients' device (no host sync). Under FSDP2 the gradients are DTensors and
    torch computes the norm of the full (unsharded) gradient; the returned value is then made a plain tensor with
    ``full_tensor()`` (a small all-reduce), so every rank sees the global norm.
    """
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    parameters = list(parameters)
    if max_norm is None or max_norm <= 0:
        total_norm = torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None])
    else:
        total_norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    if DTensor is not None and isinstance(total_norm, DTensor):
        total_norm = total_norm.full_tensor()
    return total_norm
