"""All model parallelism in one place: activation checkpointing, ``torch.compile`` and FSDP2.

The model code (``dinoscale.models``) stays plain PyTorch. :func:`parallelize` wraps a module from
the outside, in this order (the order matters):

1. activation checkpointing of every block of ``module.blocks`` (optional; training only): ``"full"`` keeps only
   each block's input and recomputes the rest in backward; ``"selective"`` also keeps the outputs of the
   matmuls, attention kernels and reduce-scatters (:data:`SELECTIVE_AC_SAVED_OPS`) and recomputes only the cheap
   ops between them (norms, activations, residual adds, softmax of matmul attention),
2. ``torch.compile`` of every block, in place (optional),
3. ``torch.distributed.fsdp.fully_shard`` on every block, then on the root module.

Sharding block by block means only one block's full parameters (plus the root's: patch embedding,
tokens, final norm) are materialised at a time; the all-gather of a block is released after its
forward (``reshard_after_forward=True``) and gathered again for the backward. Modules without
``blocks`` (projection heads) are sharded as a whole.

Naming: the activation-checkpoint wrapper inserts ``_checkpoint_wrapped_module.`` into the
*parameter* names (``blocks.3._checkpoint_wrapped_module.attn.qkv.weight``), but its state-dict
hooks strip it again, so ``state_dict()`` keys, checkpoints and the unwrapped teacher keep the plain
names. Code matching ``named_parameters()`` by name should use :func:`strip_wrapper_prefixes` here. In-place
``nn.Module.compile()`` adds no prefix.

Without a process group (single process) or with ``mesh=None`` only steps 1-2 are applied and the
parameters stay plain tensors (``param_dtype`` then has no effect: use ``torch.autocast``). With a process group every parameter becomes a ``DTensor`` holding
this rank's shard: create the optimizer *after* :func:`parallelize`, and update EMA teachers on
``p.to_local()``.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn as nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper, checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

from dinoscale import distributed

__all__ = [
    "AC_MODES",
    "SELECTIVE_AC_SAVED_OPS",
    "activation_checkpointing_mode",
    "build_mesh",
    "parallelize",
    "parallelize_frozen",
    "parallelize_student_teacher",
    "strip_wrapper_prefixes",
    "CHECKPOINT_PREFIX",
]

CHECKPOINT_PREFIX = "_checkpoint_wrapped_module."
# Name components that wrappers insert into parameter and state-dict names without changing the parameter:
# DDP/DataParallel, torch.compile, FSDP1 (in older checkpoints) and activation checkpointing.
WRAPPER_COMPONENTS = frozenset({"module", "_orig_mod", "_fsdp_wrapped_module", CHECKPOINT_PREFIX.rstrip(".")})

AC_MODES = ("none", "full", "selective")


def _ops(namespace, *names: str) -> frozenset:
    """The ``.default`` overloads of the named ops that this torch build has."""
    return frozenset(getattr(namespace, name).default for name in names if hasattr(namespace, name))


#: Ops whose outputs selective activation checkpointing keeps for the backward (everything else in a block is
#: recomputed): the matmuls (``nn.Linear`` runs as ``addmm``/``mm``, matmul attention as ``bmm``), every fused
#: attention kernel ``scaled_dot_product_attention`` may dispatch to, and the reduce-scatter of tensor-parallel
#: layers (its output is communication: recomputing it would repeat the collective).
SELECTIVE_AC_SAVED_OPS = _ops(torch.ops.aten, "mm", "addmm", "bmm", "baddbmm",
                              "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                              "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu",
                              "_scaled_dot_product_fused_attention_overrideable") \
    | _ops(torch.ops._c10d_functional, "reduce_scatter_tensor")


def _selective_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Keep the outputs of :data:`SELECTIVE_AC_SAVED_OPS`, recompute the rest."""
    return CheckpointPolicy.MUST_SAVE if op in SELECTIVE_AC_SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def activation_checkpointing_mode(value: bool | str | None) -> str:
    """``"none"``, ``"full"`` or ``"selective"`` from the option's value; ``True``/``False`` (and ``None``), the
    option's earlier form, mean full and none."""
    if value is None or value is False:
        return "none"
    if value is True:
        return "full"
    if isinstance(value, str) and value.strip().lower() in AC_MODES:
        return value.strip().lower()
    raise ValueError(f"activation_checkpointing must be one of {AC_MODES} (or true/false), got {value!r}")


# Methods other than forward that callers use as entry points of a backbone. FSDP2 only hooks
# ``forward``; calling any other method of a sharded root would run on sharded parameters.
_FORWARD_METHODS = ("forward_features", "get_intermediate_layers", "get_last_selfattention")


def strip_wrapper_prefixes(name: str) -> str:
    """``name`` without the components in ``WRAPPER_COMPONENTS`` (whole components, never substrings):
    ``module.backbone._orig_mod.blocks.0._checkpoint_wrapped_module.attn.qkv.weight`` ->
    ``backbone.blocks.0.attn.qkv.weight``."""
    return ".".join(part for part in name.split(".") if part not in WRAPPER_COMPONENTS)


def build_mesh(*, hybrid_shard: bool, devices_per_node: int | None = None) -> DeviceMesh | None:
    """The data-parallel device mesh over all ranks of the default process group.

    - ``hybrid_shard=False``: 1-D mesh ``("dp_shard",)``: parameters are sharded over all ranks
      (full sharding, ZeRO-3 style).
    - ``hybrid_shard=True``: 2-D mesh ``("dp_replicate", "dp_shard")`` of shape
      ``(world_size // devices_per_node, devices_per_node)``: sharded within a node (fast
      NVLink all-gathers), replicated across nodes (only the gradient all-reduce crosses the
      network). ``devices_per_node`` defaults to the local world size from :func:`init_distributed`.

    The mesh lives on ``cuda`` when CUDA is available, else on ``cpu`` (gloo). Returns ``None``
    when no process group exists (single process): :func:`parallelize` then shards nothing.
    """
    if not distributed.is_enabled():
        return None
    world_size = distributed.get_world_size()
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if not hybrid_shard:
        return init_device_mesh(device_type, (world_size,), mesh_dim_names=("dp_shard",))
    if devices_per_node is None:
        devices_per_node = distributed.init_distributed().local_world_size
    if not isinstance(devices_per_node, int) or devices_per_node < 1:
        raise ValueError(f"devices_per_node must be a positive int, got {devices_per_node!r}")
    if world_size % devices_per_node != 0:
        raise ValueError(
            f"hybrid sharding needs world_size ({world_size}) to be a multiple of "
            f"devices_per_node ({devices_per_node})"
        )
    return init_device_mesh(
        device_type,
        (world_size // devices_per_node, devices_per_node),
        mesh_dim_names=("dp_replicate", "dp_shard"),
    )


def _blocks(module: nn.Module) -> nn.ModuleList | nn.Sequential | None:
    blocks = getattr(module, "blocks", None)
    if blocks is None:
        return None
    if not isinstance(blocks, (nn.ModuleList, nn.Sequential)):  # timm's ViTs keep theirs in an nn.Sequential
        raise TypeError(
            f"{type(module).__name__}.blocks is a {type(blocks).__name__}; parallelize expects a flat "
            "nn.ModuleList (or nn.Sequential) of transformer blocks"
        )
    return blocks



def _allow_one_graph_per_block(n_blocks: int) -> None:
    """Raise dynamo's per-function recompile limit so that every block may get its own graph.

    All blocks share ``Block.forward``, and dynamo keeps at most ``recompile_limit`` (default 8) graphs per
    function before it runs the rest eagerly. On CUDA (torch 2.11) each block's stochastic-depth rate was
    guarded as a constant, so a 24-block ViT-L compiled 8 blocks and ran 16 eagerly.
    """
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # older torch
    setattr(config, name, max(getattr(config, name), 2 * n_blocks + 8))  # student + teacher rates, shapes

def parallelize(
    module: nn.Module,
    *,
    mesh: DeviceMesh | None,
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype | None = torch.float32,
    reshard_after_forward: bool = True,
    activation_checkpointing: bool | str = False,
    compile_blocks: bool = False,
    compile_options: dict | None = None,
) -> nn.Module:
    """Apply activation checkpointing, ``torch.compile`` and FSDP2 to ``module`` (in place).

    Args:
        module: a backbone with ``module.blocks`` (an ``nn.ModuleList``) or any other module
            (e.g. a projection head), which is then sharded as one unit.
        mesh: from :func:`build_mesh`. ``None`` (or no process group) skips sharding.
        param_dtype: dtype the parameters are all-gathered in and computed with (e.g.
            ``torch.bfloat16``); ``None`` keeps the stored dtype. The stored (sharded) parameters,
            the gradients handed to the optimizer and its states stay in the original dtype.
        reduce_dtype: dtype of the gradient reduce-scatter (fp32 avoids bf16 round-off in the
            sum over ranks).
        reshard_after_forward: free gathered parameters after each block's forward (saves
            memory, costs a second all-gather in backward).
        activation_checkpointing: ``"none"`` (or False); ``"full"`` (or True): recompute each block's
            activations in backward instead of storing them (only the block inputs are kept);
            ``"selective"``: keep the block inputs and the outputs of :data:`SELECTIVE_AC_SAVED_OPS`,
            recompute the rest (less memory than none, less recomputation than full).
        compile_blocks: ``torch.compile`` each block in place (same parameter names).
        compile_options: keyword arguments of ``nn.Module.compile`` (e.g. ``{"fullgraph": True}``,
            or ``{"backend": "aot_eager"}`` to trace without code generation).

    Returns ``module`` (the same object, wrapped in place).
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"parallelize expects an nn.Module, got {type(module).__name__}")
    if not isinstance(reshard_after_forward, bool):
        raise TypeError(f"reshard_after_forward must be a bool, got {reshard_after_forward!r}")
    if compile_options is not None and not compile_blocks:
        raise ValueError("compile_options given but compile_blocks=False")
    if isinstance(module, FSDPModule):
        raise ValueError(f"{type(module).__name__} is already sharded; call parallelize once per module")
    blocks = _blocks(module)
    ac_mode = activation_checkpointing_mode(activation_checkpointing)
    if ac_mode != "none":
        if blocks is None:
            raise ValueError(
                f"activation_checkpointing needs a module with .blocks; {type(module).__name__} has none"
            )
        if any(isinstance(b, CheckpointWrapper) for b in blocks):
            raise ValueError("the blocks are already activation-checkpointed; call parallelize once per module")
        # A fresh pair of selective-checkpoint contexts per forward call, as torch.utils.checkpoint asks.
        options = ({"context_fn": functools.partial(create_selective_checkpoint_contexts, _selective_policy)}
                   if ac_mode == "selective" else {})
        for i, block in enumerate(blocks):
            # Non-reentrant checkpointing (the wrapper's default) supports lists of crops as input
            # and keeps the RNG state, so stochastic depth draws the same masks when recomputing.
            blocks[i] = checkpoint_wrapper(block, **options)
    if compile_blocks and blocks is not None:
        _allow_one_graph_per_block(len(blocks))
        for block in blocks:
            block.compile(**(compile_options or {}))
    if mesh is None or not distributed.is_enabled():
        return module

    mp_policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    if blocks is not None:
        for block in blocks:
            fully_shard(block, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=reshard_after_forward)
    fully_shard(module, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=reshard_after_forward)
    # Our copies of views go before FSDP's post-forward hook, which hooks every output for the backward.
    module.register_forward_hook(_copy_output_views_hook, prepend=True)
    for name in _FORWARD_METHODS:
        method = getattr(module, name, None)
        if callable(method):
            setattr(module, name, _returning_no_views(method))
            register_fsdp_forward_method(module, name)
    return module


def _copy_views(out: Any) -> Any:
    """``out`` (a tensor, or dicts, lists and tuples of them) with every grad-requiring view replaced by a copy.

    FSDP2 hooks each output of a sharded root for its backward. A hook on a view is dropped by an in-place
    op on that view, so FSDP2 warns about every view it is handed, and the backbones' token outputs are
    views (``x_norm[:, 0]``, the crops of a packed batch). A copy of those few tensors costs one pass over
    the output tokens.
    """
    if isinstance(out, torch.Tensor):
        return out.clone() if out.requires_grad and out._base is not None else out
    if isinstance(out, dict):
        return {key: _copy_views(value) for key, value in out.items()}
    if type(out) in (list, tuple):
        return type(out)(_copy_views(value) for value in out)
    return out


def _copy_output_views_hook(module: nn.Module, args: Any, out: Any) -> Any:
    return _copy_views(out)


def _returning_no_views(method):
    @functools.wraps(method)
    def wrapped(*args, **kwargs):
        return _copy_views(method(*args, **kwargs))

    return wrapped


def parallelize_student_teacher(
    student: nn.ModuleDict, teacher: nn.ModuleDict, **options: Any
) -> tuple[nn.ModuleDict, nn.ModuleDict]:
    """:func:`parallelize` every entry (backbone, heads) of the student and of the EMA teacher.

    ``options`` are :func:`parallelize`'s keyword arguments (``mesh`` is required). The student gets
    them as given (activation checkpointing only where there are blocks, i.e. the backbone). The
    teacher never needs gradients: its parameters are frozen, it is never activation-checkpointed
    and always reshards right after its forward (nothing of it is needed again until the next
    step). Both are sharded over the same mesh in the same way, so an EMA update can run shard by
    shard on ``p.to_local()``. An entry that is itself an ``nn.ModuleDict`` (the further students of a
    distillation run) is parallelized the same way, part by part.
    """
    for name, d in (("student", student), ("teacher", teacher)):
        if not isinstance(d, nn.ModuleDict):
            raise TypeError(f"{name} must be an nn.ModuleDict, got {type(d).__name__}")
    if set(student.keys()) != set(teacher.keys()):
        raise ValueError(
            f"student and teacher have different parts: student {sorted(student.keys())}, "
            f"teacher {sorted(teacher.keys())}"
        )
    activation_checkpointing = activation_checkpointing_mode(options.pop("activation_checkpointing", False))
    nested = [key for key in student.keys() if isinstance(student[key], nn.ModuleDict)]
    parts = [key for key in student.keys() if key not in nested]
    for key in nested:  # further students (distillation): their parts in turn
        parallelize_student_teacher(student[key], teacher[key], **options,
                                    activation_checkpointing=activation_checkpointing)
    for key in parts:
        parallelize(
            student[key],
            **options,
            # heads have no blocks to checkpoint; their activations are small
            activation_checkpointing=activation_checkpointing if _blocks(student[key]) is not None else "none",
        )
    teacher_options = {**options, "reshard_after_forward": True}
    for key in [k for k in teacher.keys() if k not in nested]:
        teacher[key].requires_grad_(False)
        parallelize(teacher[key], **teacher_options, activation_checkpointing=False)
    return student, teacher


def parallelize_frozen(
    module: nn.Module, *, mesh: DeviceMesh | None, dtype: torch.dtype | None = None, compile_blocks: bool = False
) -> nn.Module:
    """:func:`parallelize` a network that only ever runs inference (a distillation teacher), in place.

    It is frozen (``requires_grad=False``), cast to ``dtype`` (the compute dtype; ``None`` keeps it), never
    activation-checkpointed and resharded right after every forward. With a mesh it is sharded block by block like
    a trained network: its parameters are stored and gathered in ``dtype``, and its inputs are cast to it. An
    ``nn.ModuleDict`` (backbone and heads) is parallelized entry by entry.
    """
    module.requires_grad_(False)
    if dtype is not None:
        module.to(dtype)
    for part in module.values() if isinstance(module, nn.ModuleDict) else [module]:
        part_dtype = next(iter(part.parameters()), torch.empty(0)).dtype
        parallelize(part, mesh=mesh, param_dtype=part_dtype, reshard_after_forward=True,
                    compile_blocks=compile_blocks)
    return module
