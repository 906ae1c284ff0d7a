"""FLOPs of one training step, counted by tracing the method once with fvcore.

Convention: **1 multiply-add = 2 FLOPs**. fvcore counts one multiply-add as one "flop"; every figure here is
fvcore's count times 2. What is counted (dense-algebra FLOPs, the usual basis of MFU):

* matrix products: ``linear``, ``matmul``, ``bmm``, ``addmm``, ``einsum``, the patch-embedding convolution
  (fvcore's handles), and attention::

      scaled_dot_product_attention(q, k, v):  2 * B * H * Nq * Nk * (d_qk + d_v)  FLOPs
                                              (= 4 * B * H * N^2 * d for self-attention)

* normalisations (fvcore's estimate: 5 FLOP-units per element with an affine) and the bicubic resampling of
  position embeddings (16 multiply-adds per output value);
* *not* pointwise, reduction and indexing ops (activations, residual adds, LayerScale, softmax, loss
  arithmetic, argmax, sort): they are memory-bound, add < 1% to a ViT, and MFU conventionally leaves them out.
  They are listed in ``ZERO_FLOP_OPS`` and ignored explicitly; any other op the trace meets is reported as
  unsupported (logged, counted as 0).

A step is: the method's forward on one batch (student forward, teacher forward, heads, losses) and the
backward through everything that is not the teacher. The backward is counted as twice the forward
(gradients w.r.t. activations and w.r.t. weights)::

    step = 3 * (forward FLOPs outside the teacher) + teacher forward FLOPs

(the teacher: the EMA teacher, and the frozen networks a method runs without training them, e.g. a
distillation teacher: ``dinoscale.methods.base.frozen_networks``).

The count comes from tracing the method once with fvcore (``FlopCountAnalysis``), on this rank's batch, so
it is the FLOPs *per optimizer step for this rank* (count before FSDP wraps the networks). The hardware's
peak comes from :mod:`dinoscale.train.perf.peak`, the MFU from :mod:`dinoscale.train.perf.meter`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import random
import warnings
from math import prod
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from dinoscale import distributed
from dinoscale.methods.base import frozen_networks, uses_sample_index

__all__ = [
    "ZERO_FLOP_OPS",
    "FlopBreakdown",
    "clear_flops_cache",
    "count_forward_flops",
    "example_batch",
    "flops_breakdown",
    "sdpa_flop_jit",
    "step_flops",
]

log = logging.getLogger("dinoscale")

# Pointwise, reduction, indexing, sampling and loss ops met in the methods' steps (and common ViT code):
# explicitly 0 FLOPs, see above. Losses such as cross_entropy are a log-softmax and a gather per row.
ZERO_FLOP_OPS = frozenset({
    "aten::abs", "aten::add", "aten::add_", "aten::addcmul_", "aten::argmax", "aten::argmin", "aten::bernoulli",
    "aten::bernoulli_", "aten::binary_cross_entropy_with_logits", "aten::clamp_max", "aten::clamp_min",
    "aten::cos", "aten::cross_entropy_loss", "aten::cumsum", "aten::diag", "aten::diagonal", "aten::div",
    "aten::div_", "aten::dropout", "aten::erf", "aten::exp", "aten::exp_", "aten::expand_as", "aten::eye",
    "aten::gelu", "aten::index_select", "aten::isfinite", "aten::l1_loss", "aten::le", "aten::lerp_",
    "aten::linalg_vector_norm", "aten::log", "aten::log_softmax", "aten::logical_not", "aten::logsumexp",
    "aten::lt", "aten::masked_fill_", "aten::masked_select", "aten::maximum", "aten::mean", "aten::minimum",
    "aten::mse_loss", "aten::mul", "aten::mul_", "aten::ne", "aten::neg", "aten::new_zeros", "aten::nll_loss",
    "aten::nll_loss_nd", "aten::norm", "aten::one_hot", "aten::ones", "aten::ones_like", "aten::pairwise_distance",
    "aten::pow", "aten::rand", "aten::rand_like", "aten::randn", "aten::randperm", "aten::reciprocal",
    "aten::relu", "aten::relu_", "aten::repeat_interleave", "aten::rsqrt", "aten::rsub", "aten::scatter",
    "aten::scatter_", "aten::sigmoid", "aten::silu", "aten::sin", "aten::smooth_l1_loss", "aten::softmax",
    "aten::sort", "aten::sqrt", "aten::square", "aten::std", "aten::sub", "aten::sub_", "aten::sum",
    "aten::tanh", "aten::topk", "aten::var", "aten::where", "aten::zeros", "aten::zeros_like",
})


def _shape(value) -> list[int]:
    if not value.isCompleteTensor():
        raise ValueError("fvcore's trace lost a tensor shape; cannot count this op")
    return value.type().sizes()


def sdpa_flop_jit(inputs: list, outputs: list) -> int:
    """fvcore handle for ``aten::scaled_dot_product_attention`` (in multiply-adds, fvcore's unit).

    ``q @ k^T`` takes ``B*H*Nq*Nk*d_qk`` multiply-adds and ``softmax(.) @ v`` ``B*H*Nq*Nk*d_v``; masks,
    scaling and the softmax are pointwise and not counted. Leading dims of q (batch, heads) are multiplied.
    """
    q, k, v = (_shape(x) for x in inputs[:3])
    *lead, n_q, d_qk = q
    n_k, d_v = k[-2], v[-1]
    return prod(lead) * n_q * n_k * (d_qk + d_v)


def _bicubic_flop_jit(inputs: list, outputs: list) -> int:
    # A 4 x 4 neighbourhood per output value: 16 multiply-adds.
    return 16 * prod(_shape(outputs[0]))


_EXTRA_HANDLES = {
    "aten::scaled_dot_product_attention": sdpa_flop_jit,
    "aten::upsample_bicubic2d": _bicubic_flop_jit,
    "aten::_upsample_bicubic2d_aa": _bicubic_flop_jit,  # antialiased (timm's resampling); same estimate
}


def _analysis(model: nn.Module, inputs: tuple):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # fvcore's import touches the deprecated torch.jit.script
        from fvcore.nn import FlopCountAnalysis

    fa = FlopCountAnalysis(model, inputs)
    fa.set_op_handle(**_EXTRA_HANDLES)
    fa.set_op_handle(**{name: None for name in ZERO_FLOP_OPS})
    fa.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
    return fa


# ------------------------------------------------------------------------------------------- networks as traced


def _is_dtensor(t: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return isinstance(t, DTensor)


@contextlib.contextmanager
def _traceable(modules: list[nn.Module]) -> Iterator[None]:
    """Let fvcore's JIT trace see the eager code and one attention op.

    * ``nn.Module.compile()`` keeps its wrapper in ``_compiled_call_impl``; the JIT tracer cannot go through
      dynamo, so the wrapper is set aside while tracing (the eager code is the same function).
    * Attention modules on the ``xformers`` backend are switched to ``sdpa`` (same function, same FLOPs), so
      the trace holds ``aten::scaled_dot_product_attention`` rather than a version-dependent xformers op.
    FSDP2-sharded networks (DTensor parameters) are refused: count before ``dinoscale.parallel.parallelize``.
    """
    compiled, backends = [], []
    for root in modules:
        for name, p in root.named_parameters():
            if _is_dtensor(p):
                raise ValueError(
                    f"parameter '{name}' is an FSDP shard (DTensor); count FLOPs on the unsharded networks, "
                    "before dinoscale.parallel.parallelize / apply_parallelism"
                )
        for m in root.modules():
            if getattr(m, "_compiled_call_impl", None) is not None:
                compiled.append((m, m._compiled_call_impl))
            if getattr(m, "attn_backend", None) == "xformers":
                backends.append(m)
    try:
        for m, _ in compiled:
            m._compiled_call_impl = None
        for m in backends:
            m.attn_backend = "sdpa"
        yield
    finally:
        for m, impl in compiled:
            m._compiled_call_impl = impl
        for m in backends:
            m.attn_backend = "xformers"


@contextlib.contextmanager
def _no_side_effects(modules: list[nn.Module], tensors: list[torch.Tensor]) -> Iterator[None]:
    """Run the traced forward without changing training: RNG streams and every buffer of ``modules`` (loss
    centers, batch-norm running statistics) are restored; parameters cannot change under ``no_grad``."""
    devices = sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})
    saved = [{name: buf.clone() for name, buf in m.named_buffers()} for m in modules]
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        try:
            yield
        finally:
            for m, values in zip(modules, saved):
                buffers = dict(m.named_buffers())  # looked up again: a forward may have rebound a buffer
                for name, value in values.items():
                    buffers[name].copy_(value)


def count_forward_flops(model: nn.Module, *inputs: torch.Tensor) -> float:
    """FLOPs (2 per multiply-add) of ``model(*inputs)``: one forward, no backward, with this module's handles."""
    with _traceable([model]), torch.random.fork_rng(devices=[]), torch.no_grad():
        fa = _analysis(model, tuple(inputs))
        total = fa.total()
        unsupported = fa.unsupported_ops()
    _warn_unsupported(unsupported)
    return 2.0 * total


# ------------------------------------------------------------------------------------------------- one step


class _Step(nn.Module):
    """``method(student, teacher, batch, sched)`` as a module whose inputs are the batch's tensors (for tracing)."""

    def __init__(self, method, student, teacher, batch: Mapping[str, Any], tensor_keys: list[str], sched: dict):
        super().__init__()
        self.method = method
        self.student = student
        if teacher is not None:
            self.teacher = teacher
        self.frozen = nn.ModuleDict(frozen_networks(method))  # a distillation teacher: forward only
        self._has_teacher = teacher is not None
        self._batch = dict(batch)
        self._keys = tensor_keys
        self._sched = sched

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        batch = {**self._batch, **dict(zip(self._keys, tensors))}
        loss, _terms = self.method(self.student, self.teacher if self._has_teacher else None, batch, self._sched)
        return loss


class FlopBreakdown(dict):
    """FLOPs of one step by part: ``student_forward``, ``teacher_forward``, ``other_forward`` (losses and any
    network the method holds itself), ``step`` (with backward), and ``unsupported_ops`` (op name -> count)."""

    @property
    def step(self) -> float:
        return self["step"]


_CACHE: dict[str, FlopBreakdown] = {}


def clear_flops_cache() -> None:
    _CACHE.clear()


def _default_sched(method: nn.Module) -> dict:
    """Schedule values the method's forward reads; they change no shape, so any valid value will do."""
    cfg = getattr(method, "cfg", None)
    teacher_temp = 0.07
    if cfg is not None and "teacher" in cfg and "teacher_temp" in cfg.teacher:
        teacher_temp = float(cfg.teacher.teacher_temp)
    return {"teacher_temp": teacher_temp, "momentum": 1.0, "lr": 0.0, "wd": 0.0, "last_layer_lr": 0.0}


def _image_shapes(batch: Mapping[str, Any]) -> list[tuple]:
    # Crops (4-D tensors) fix the cost of the networks. Masks and masked-patch indices vary from batch to
    # batch (a few % of a step); they are not part of the key, so the first batch's count is kept.
    return sorted((k, tuple(v.shape)) for k, v in batch.items() if torch.is_tensor(v) and v.ndim >= 4)


def _cache_key(method, student, teacher, batch) -> str:
    from omegaconf import DictConfig, OmegaConf

    h = hashlib.sha256()
    h.update(f"{type(method).__module__}.{type(method).__qualname__}".encode())
    cfg = getattr(method, "cfg", None)
    if isinstance(cfg, DictConfig):
        h.update(OmegaConf.to_yaml(cfg, resolve=True).encode())
    for name, net in (("student", student), ("teacher", teacher)):
        if net is not None:
            for pname, p in net.named_parameters():
                h.update(f"{name}.{pname}:{tuple(p.shape)}".encode())
    h.update(repr(_image_shapes(batch)).encode())
    return h.hexdigest()


def flops_breakdown(
    method: nn.Module,
    student: nn.Module,
    teacher: nn.Module | None,
    batch: Mapping[str, Any],
    sched: dict | None = None,
    *,
    use_cache: bool = True,
) -> FlopBreakdown:
    """Per-part FLOPs of one training step on ``batch`` (see the module docstring); cached like :func:`step_flops`.

    Runs the method's forward once under ``torch.no_grad`` (on the batch's device), with the RNG state and the
    method's buffers (loss centers) restored afterwards, and collectives turned off
    (:func:`dinoscale.distributed.hide_process_group`), so it may be called on any subset of ranks.
    """
    key = _cache_key(method, student, teacher, batch)
    if use_cache and key in _CACHE:
        return _CACHE[key]
    keys = [k for k, v in batch.items() if torch.is_tensor(v)]
    tensors = [batch[k] for k in keys]
    if not any(t.ndim >= 4 for t in tensors):
        raise ValueError(f"batch holds no image tensor (4-D); got entries {sorted(batch)}")
    sched = _default_sched(method) if sched is None else sched
    wrapper = _Step(method, student, teacher, batch, keys, sched)
    nets = [student] + ([teacher] if teacher is not None else []) + list(wrapper.frozen.values())
    # No collectives while tracing: the JIT tracer cannot record them. The method's all-reduces and gathers
    # (loss centers, Sinkhorn sums, KoLeo's gathered neighbour search) change values, not this rank's FLOPs,
    # except that the KoLeo search is then counted over the local batch only (a few thousand multiply-adds).
    # As a result the count needs no other rank: it may run on one rank only.
    with _traceable(nets), _no_side_effects([method, *nets], tensors), distributed.hide_process_group(), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about data-dependent Python values
        fa = _analysis(wrapper, tuple(tensors))
        try:
            by_module = fa.by_module()
        except Exception as exc:
            hint = (" Under JIT tracing tensor sizes are tensors: Python arithmetic on them (round(), math.*) "
                    "must go through int() first." if isinstance(exc, TypeError) else "")
            raise RuntimeError(
                f"cannot count the FLOPs of {type(method).__name__}'s step: fvcore's JIT trace of its forward "
                f"failed ({type(exc).__name__}: {exc}).{hint}"
            ) from exc
        unsupported = dict(fa.unsupported_ops())
    total = 2.0 * by_module[""]
    student_fwd = 2.0 * by_module["student"]
    teacher_fwd = 2.0 * by_module["teacher"] if teacher is not None else 0.0
    teacher_fwd += 2.0 * by_module["frozen"] if len(wrapper.frozen) else 0.0  # no backward either
    other_fwd = total - student_fwd - teacher_fwd
    result = FlopBreakdown(
        student_forward=student_fwd,
        teacher_forward=teacher_fwd,
        other_forward=other_fwd,
        # backward = 2 x forward for everything gradients flow through (all but the teacher)
        step=3.0 * (student_fwd + other_fwd) + teacher_fwd,
        unsupported_ops=unsupported,
    )
    _warn_unsupported(unsupported)
    _CACHE[key] = result
    return result


def step_flops(
    method: nn.Module,
    student: nn.Module,
    teacher: nn.Module | None,
    batch: Mapping[str, Any],
    sched: dict | None = None,
) -> float:
    """FLOPs of one optimizer step on this rank (1 multiply-add = 2 FLOPs; backward = 2 x forward).

    ``batch`` is a collated batch as the method's forward takes it (e.g. :func:`example_batch`). The result is
    cached per (method, resolved config, parameter shapes, image-tensor shapes): later calls with the same
    configuration return at once. See :func:`flops_breakdown` for the parts and the condition (unsharded
    networks: count before FSDP).
    """
    return flops_breakdown(method, student, teacher, batch, sched).step


def _warn_unsupported(unsupported: Mapping[str, int]) -> None:
    if unsupported:
        log.warning("FLOP count: ops without a handle (counted as 0): %s", dict(unsupported))


def example_batch(
    method: nn.Module,
    patch_size: int,
    batch_size: int,
    *,
    device: torch.device | str = "cpu",
    image_size: int = 256,
    seed: int = 0,
) -> dict[str, Any]:
    """A collated batch with the shapes of real training: the method's own transform and collate applied to
    ``batch_size`` random ``image_size`` RGB images. Crops left as uint8 (photometric augmentation on the
    device) are turned into float. The global RNG state is left unchanged.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    transform = method.build_transform()
    collate = method.build_collate(patch_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        g = torch.Generator().manual_seed(seed)
        images = torch.randint(0, 256, (batch_size, 3, image_size, image_size), dtype=torch.uint8, generator=g)
        samples = [(transform(img), -1, i) if uses_sample_index(method) else (transform(img), -1)
                   for i, img in enumerate(images)]
        batch = collate(samples, rng=random.Random(seed))
    out = {}
    for k, v in batch.items():
        if torch.is_tensor(v):
            if v.dtype == torch.uint8 and v.ndim >= 4:
                v = v.float()
            v = v.to(device)
        out[k] = v
    return out
