"""FLOPs of one training step, the hardware's peak, and the model FLOPs utilisation (MFU) in between.

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

The count comes from tracing the method once with fvcore (``FlopCountAnalysis``), on this rank's batch, so
it is the FLOPs *per optimizer step for this rank*. Usage in a training loop (count before FSDP wraps the
networks; :func:`throughput_meter` does both look-ups and returns None if the step cannot be traced)::

    flops = step_flops(method, student, teacher, example_batch(method, patch_size, batch_size, device=device))
    peak, source = peak_flops(device, torch.bfloat16)
    meter = ThroughputMeter(flops, peak, window=log_every)
    ...
    meter.update()                  # after every optimizer step
    stats = meter.stats()           # {"tflops_per_s": ..., "mfu": ...} over the last log_every steps
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import random
import time
import warnings
from collections import deque
from math import prod
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from dinoscale import distributed
from dinoscale.device import dtype_name as short_dtype_name

__all__ = [
    "ZERO_FLOP_OPS",
    "FlopBreakdown",
    "ThroughputMeter",
    "clear_flops_cache",
    "count_forward_flops",
    "example_batch",
    "flops_breakdown",
    "peak_flops",
    "sdpa_flop_jit",
    "step_flops",
    "throughput_meter",
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
def _without_collectives() -> Iterator[None]:
    """Make ``dinoscale.distributed`` report a single process while the step is traced.

    The JIT tracer cannot record collectives. The method's all-reduces and gathers (loss centers, Sinkhorn
    sums, KoLeo's gathered neighbour search) change values, not this rank's FLOPs, except that the KoLeo
    search is then counted over the local batch only (a few thousand multiply-adds). As a result the count
    needs no other rank: it may run on one rank only.
    """
    with distributed.hide_process_group():
        yield


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
    method's buffers (loss centers) restored afterwards, and collectives turned off (see
    :func:`_without_collectives`), so it may be called on any subset of ranks.
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
    nets = [student] + ([teacher] if teacher is not None else [])
    with _traceable(nets), _no_side_effects([method, *nets], tensors), _without_collectives(), warnings.catch_warnings():
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
        samples = [(transform(img), -1) for img in images]
        batch = collate(samples, rng=random.Random(seed))
    out = {}
    for k, v in batch.items():
        if torch.is_tensor(v):
            if v.dtype == torch.uint8 and v.ndim >= 4:
                v = v.float()
            v = v.to(device)
        out[k] = v
    return out


# ----------------------------------------------------------------------------------------------- peak FLOP/s

# Dense (no sparsity) tensor-core figures from NVIDIA's data sheets, FLOP/s. "tf32" is used for float32
# when TF32 matmuls are allowed (torch.backends.cuda.matmul), "fp32" otherwise. Matched in order, so more
# specific names come first.
GPU_PEAK_FLOPS: list[tuple[str, dict[str, float]]] = [
    ("H200 NVL", {"bf16": 835.5e12, "fp16": 835.5e12, "tf32": 417.5e12, "fp32": 60e12}),
    ("H200", {"bf16": 989.4e12, "fp16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12}),
    ("GH200", {"bf16": 989.4e12, "fp16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12}),
    ("H100 NVL", {"bf16": 835.5e12, "fp16": 835.5e12, "tf32": 417.5e12, "fp32": 60e12}),
    ("H100 PCIe", {"bf16": 756.5e12, "fp16": 756.5e12, "tf32": 378e12, "fp32": 51.2e12}),
    ("H100", {"bf16": 989.4e12, "fp16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12}),  # SXM (HBM3)
    ("A100", {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12}),
    ("L40S", {"bf16": 362.05e12, "fp16": 362.05e12, "tf32": 183e12, "fp32": 91.6e12}),
    ("L40", {"bf16": 181e12, "fp16": 181e12, "tf32": 90.5e12, "fp32": 90.5e12}),
    ("L4", {"bf16": 121e12, "fp16": 121e12, "tf32": 60e12, "fp32": 30.3e12}),
    ("A40", {"bf16": 149.7e12, "fp16": 149.7e12, "tf32": 74.8e12, "fp32": 37.4e12}),
    ("A10", {"bf16": 125e12, "fp16": 125e12, "tf32": 62.5e12, "fp32": 31.2e12}),
    ("V100", {"fp16": 125e12, "fp32": 15.7e12}),  # no bf16 tensor cores: bf16 is measured
]

_PROBE_SIZE = {"cpu": 2048, "cuda": 8192}
_PROBE_REPEATS = 10  # best of 10: a shared machine rarely slows every run


def default_cache_path() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dinoscale" / "peak_flops.json"


def _gpu_table_entry(name: str, dtype_name: str) -> tuple[float, str] | None:
    if dtype_name == "fp32" and torch.get_float32_matmul_precision() != "highest":
        dtype_name = "tf32"
    for pattern, figures in GPU_PEAK_FLOPS:
        # word match, so that "A100" is not taken for "A10" and "L40S" not for "L4"
        tokens = name.replace("-", " ").split()
        words = pattern.split()
        if any(tokens[i : i + len(words)] == words for i in range(len(tokens))) and dtype_name in figures:
            return figures[dtype_name], f"table: {name}, dense {dtype_name}"
    return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown-cpu"


def _measure_matmul(device: torch.device, dtype: torch.dtype, n: int, repeats: int) -> float:
    """Best FLOP/s of an ``n x n @ n x n`` matmul over ``repeats`` timed runs (after one warm-up)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.matmul(a, b)
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.matmul(a, b)
        sync()
        best = min(best, time.perf_counter() - start)
    return 2.0 * n**3 / best


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_cache(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)  # atomic: ranks probing at once never leave a half-written file


def peak_flops(
    device: torch.device | str,
    dtype: torch.dtype = torch.bfloat16,
    *,
    cache_path: str | os.PathLike | None = None,
    refresh: bool = False,
) -> tuple[float, str]:
    """Peak dense matmul FLOP/s of ``device`` for ``dtype``, and where the figure comes from.

    Known GPUs (by ``torch.cuda.get_device_name``) come from ``GPU_PEAK_FLOPS``. Anything else -- CPUs
    included -- is measured once with a square matmul (2048 on CPU, 8192 on GPU; best of 10) and cached in
    ``cache_path`` (default ``~/.cache/dinoscale/peak_flops.json``) under the CPU model (or GPU name), the
    thread count and the dtype. ``refresh=True`` measures again.
    """
    device = torch.device(device)
    try:
        dtype_name = short_dtype_name(dtype)
    except ValueError as e:
        raise ValueError(f"peak_flops: {e}") from None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        entry = _gpu_table_entry(name, dtype_name)
        if entry is not None:
            return entry
        key = f"cuda|{name}|{dtype_name}"
    elif device.type == "cpu":
        key = f"cpu|{_cpu_model()}|threads={torch.get_num_threads()}|{dtype_name}"
    else:
        raise ValueError(f"peak_flops: unsupported device type '{device.type}' (cpu or cuda)")
    path = Path(cache_path) if cache_path is not None else default_cache_path()
    cache = _read_cache(path)
    if not refresh and isinstance(cache.get(key), (int, float)) and cache[key] > 0:
        return float(cache[key]), f"measured (cached in {path}): {key}"
    n = _PROBE_SIZE[device.type]
    value = _measure_matmul(device, dtype, n, _PROBE_REPEATS)
    cache = _read_cache(path)  # another process may have written meanwhile
    cache[key] = value
    _write_cache(path, cache)
    return value, f"measured now ({n}^3 matmul, best of {_PROBE_REPEATS}; cached in {path}): {key}"


# ------------------------------------------------------------------------------------------------ throughput


class ThroughputMeter:
    """Achieved FLOP/s and MFU over the last ``window`` optimizer steps.

    ``flops_per_step``: from :func:`step_flops` (this rank). ``peak_flops_per_s``: from :func:`peak_flops` (one
    device). ``mfu = flops_per_step * steps / seconds / peak_flops_per_s``. Time is host wall time between
    :meth:`update` calls; in a loop with one host sync per step it tracks the device. Nothing is read from the
    device. With ``window = log_every`` the figures cover the same steps as the logger's images/s.
    """

    def __init__(self, flops_per_step: float, peak_flops_per_s: float, *, window: int = 10) -> None:
        if not flops_per_step > 0:
            raise ValueError(f"flops_per_step must be > 0, got {flops_per_step}")
        if not peak_flops_per_s > 0:
            raise ValueError(f"peak_flops_per_s must be > 0, got {peak_flops_per_s}")
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.flops_per_step = float(flops_per_step)
        self.peak_flops_per_s = float(peak_flops_per_s)
        # Times of the last window + 1 step ends; the first entry is the meter's creation.
        self._times: deque[float] = deque([time.perf_counter()], maxlen=window + 1)

    def restart(self) -> None:
        """Forget the window: time from now on (e.g. when the loop starts, or after a checkpoint or an evaluation,
        whose time is not training's)."""
        self._times = deque([time.perf_counter()], maxlen=self._times.maxlen)

    def update(self) -> None:
        """Mark the end of one optimizer step."""
        self._times.append(time.perf_counter())

    def stats(self) -> dict[str, float]:
        """``{"tflops_per_s", "mfu"}`` over the steps in the window (zeros before the first step)."""
        steps = len(self._times) - 1
        elapsed = self._times[-1] - self._times[0]
        if steps == 0 or elapsed <= 0:
            return {"tflops_per_s": 0.0, "mfu": 0.0}
        achieved = self.flops_per_step * steps / elapsed
        return {"tflops_per_s": achieved / 1e12, "mfu": achieved / self.peak_flops_per_s}


def throughput_meter(
    method: nn.Module,
    student: nn.Module,
    teacher: nn.Module | None,
    batch: Mapping[str, Any],
    *,
    device: torch.device | str,
    dtype: torch.dtype,
    window: int = 10,
) -> ThroughputMeter | None:
    """:class:`ThroughputMeter` for a run: counts the step (:func:`step_flops`, on unsharded networks) and looks up
    the peak (:func:`peak_flops`). Returns None, with a warning, when either fails: a metric must not stop a run.
    """
    try:
        flops = step_flops(method, student, teacher, batch)
        peak, source = peak_flops(device, dtype)
    except (RuntimeError, ValueError, OSError) as exc:
        log.warning("no tflops_per_s / mfu in the logs: %s", exc)
        return None
    log.info("FLOPs per step and rank: %.4g; peak: %.4g FLOP/s (%s)", flops, peak, source)
    return ThroughputMeter(flops, peak, window=window)
