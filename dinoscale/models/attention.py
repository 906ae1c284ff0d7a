"""Multi-head self-attention with interchangeable kernels.

Three backends compute the same function, ``softmax(Q K^T / sqrt(d)) V`` per head:

* ``"sdpa"`` -- ``torch.nn.functional.scaled_dot_product_attention`` (default; fused kernels on GPU).
  On CPU it runs as :func:`cpu_matmul_attention` instead (two batched matmuls, fp32 scores and
  softmax under autocast too, the backward's matmuls in the input dtype as FlashAttention-2's) for
  bfloat16/float16 tensors, where that is 2-3x faster than the fused CPU kernel for ViT sequence
  lengths and just as accurate, and for float32 sequences of up to
  ``CPU_FP32_MATMUL_MAX_TOKENS`` keys, where it is 1.1-1.5x faster (forward and backward, 2 cores;
  for longer sequences the fused kernel is as fast or faster). It keeps the ``N x N`` scores for the
  backward, so it is used only while they stay under ``CPU_ATTN_MAX_SCORES`` elements per call.
* ``"xformers"`` -- ``xformers.ops.memory_efficient_attention``. Only used when the tensors are on CUDA
  and xformers imports; otherwise the module falls back to sdpa and warns once.
* ``"math"`` -- the explicit formula, kept as the reference and for debugging.

The backend is picked by the ``attn_backend`` constructor argument; the environment variable
``DINOSCALE_ATTN`` (``sdpa``/``xformers``/``math``) overrides it for every module built while it is set,
so a run can be switched without touching configs.

A module accepts one token tensor ``(B, N, C)``, a list of them with different ``N`` (the multi-crop
forward), or such a list packed into one ``(sum_i B_i * N_i, C)`` tensor with its ``crop_shapes``
``((B_1, N_1), ...)`` (what the ViT's blocks pass). For several crops the token-wise projections run once
over all tokens, and attention stays within each crop: per crop for sdpa/math, through one
block-diagonal xformers call otherwise.

Rotary position embeddings (DINOv3): ``forward(..., rope=(sin, cos))`` rotates the queries and keys of the
*last* ``HW`` tokens (the patches; the class and storage tokens in front stay unrotated) before attention;
packed crops take one ``(sin, cos)`` per crop. With RoPE the xformers backend is not used (sdpa instead,
said once). ``mask_k_bias=True`` makes ``qkv`` a :class:`MaskedKeyBiasLinear` (DINOv3's layout).
"""

from __future__ import annotations

import os
import warnings
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

ATTN_BACKENDS = ("sdpa", "xformers", "math")
ATTN_ENV_VAR = "DINOSCALE_ATTN"

_UNSET = object()
_xformers_ops_cache: object = _UNSET
_warned_xformers_fallback = False
_warned_xformers_rope = False

RopeSinCos = tuple[torch.Tensor, torch.Tensor]  # (sin, cos), each (HW, head_dim)


def resolve_attn_backend(attn_backend: str | None = None) -> str:
    """Return the backend name to use: ``$DINOSCALE_ATTN`` if set, else ``attn_backend``, else ``"sdpa"``."""
    env_value = os.environ.get(ATTN_ENV_VAR, "").strip().lower()
    if env_value:
        name, source = env_value, f"environment variable {ATTN_ENV_VAR}"
    else:
        name, source = (attn_backend or "sdpa").strip().lower(), "attn_backend argument"
    if name not in ATTN_BACKENDS:
        raise ValueError(f"unknown attention backend {name!r} (from the {source}); expected one of {ATTN_BACKENDS}")
    return name


def _xformers_ops():
    """``xformers.ops`` if it imports, else None (imported lazily: xformers is an optional CUDA extra)."""
    global _xformers_ops_cache
    if _xformers_ops_cache is _UNSET:
        try:
            from xformers import ops as xops

            _xformers_ops_cache = xops
        except Exception:  # ImportError, or a broken build that fails while loading its kernels
            _xformers_ops_cache = None
    return _xformers_ops_cache


_xformers_cuda_problem_cache: object = _UNSET


def _xformers_cuda_problem(device: torch.device | str = "cuda") -> str | None:
    """None when xformers runs on ``device``, else why not (checked once per process, with a tiny call).

    An xformers wheel built for another torch or CUDA imports fine but has no kernels: every call
    then raises NotImplementedError ("xFormers wasn't build with CUDA support"), seen with xformers
    0.0.35 (built for torch 2.10) beside torch 2.11.
    """
    global _xformers_cuda_problem_cache
    if _xformers_cuda_problem_cache is _UNSET:
        xops = _xformers_ops()
        if xops is None:
            _xformers_cuda_problem_cache = "xformers could not be imported"
        else:
            q = torch.zeros(1, 8, 1, 64, device=device, dtype=torch.bfloat16)
            try:
                xops.memory_efficient_attention(q, q, q)
                _xformers_cuda_problem_cache = None
            except Exception as e:  # NotImplementedError (no kernels), RuntimeError (e.g. no kernel for this GPU)
                summary = _xformers_failure_summary(str(e)) or type(e).__name__
                built_for = _xformers_build_mismatch()
                if built_for:
                    summary += f"; {built_for}"
                _xformers_cuda_problem_cache = f"xformers has no usable CUDA kernel here ({summary})"
    return _xformers_cuda_problem_cache


def _xformers_failure_summary(message: str) -> str:
    """One line from xformers' dispatch error: its first line and each operator's reasons.

    The error reads ``No operator found for `NAME` with inputs:``, the inputs, then per operator
    ```OP` is not supported because:`` and one indented reason per line; the inputs are left out.
    """
    lines = message.strip().splitlines()
    if not lines:
        return ""
    head = lines[0].strip().removesuffix(":").replace(" with inputs", "")
    reasons: dict[str, list[str]] = {}
    op = None
    for line in lines[1:]:
        if line.endswith("is not supported because:") and line.startswith("`"):
            op = line.split("`")[1]
            reasons[op] = []
        elif op is not None and line.startswith("    ") and line.strip():
            reasons[op].append(line.strip())
        else:
            op = None
    if not reasons:
        return head
    return head + ": " + "; ".join(f"{name}: {', '.join(why) or '?'}" for name, why in reasons.items())


def _xformers_build_mismatch() -> str:
    """What xformers said when its compiled library did not load (the torch/CUDA it was built for), or ""."""
    try:
        from xformers import _cpp_lib  # private; read defensively

        problem = getattr(_cpp_lib, "_cpp_library_load_exception", None)
    except Exception:
        return ""
    if problem is None:
        return ""
    lines = [line.strip() for line in str(problem).splitlines() if line.strip().startswith(("PyTorch", "Python"))]
    return "xformers was built for " + ", ".join(lines) if lines else str(problem).strip().splitlines()[0]


def _warn_xformers_fallback(reason: str) -> None:
    global _warned_xformers_fallback
    if not _warned_xformers_fallback:
        _warned_xformers_fallback = True
        warnings.warn(f"attention backend 'xformers' requested but {reason}; using 'sdpa' instead", stacklevel=3)


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Reference attention on ``(B, heads, N, d)`` tensors: ``softmax(q k^T / sqrt(d)) v``."""
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    return scores.softmax(dim=-1) @ v


# B * heads * Nq * Nk above which the CPU low-precision path hands over to the fused kernel: its
# autograd keeps 6 bytes per score for the backward (fp32 and bf16 probabilities), ~200 MiB here.
CPU_ATTN_MAX_SCORES = 2**25


# Keys up to which float32 attention on CPU runs as two matmuls. Forward + backward from a packed qkv,
# 2 threads, 6 heads of 64: 0.65x the fused kernel's time at 17 keys, 0.78x at 50, 0.83x at 122, 0.88x
# at 150; from about 200 keys the two are within noise of each other, and at 257 the fused kernel wins.
CPU_FP32_MATMUL_MAX_TOKENS = 160


def scaled_linear(linear: nn.Linear, x: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """``linear(x) * scale`` (per output channel) with ``scale`` folded into the weight and bias.

    Scaling the ``(out, in)`` weight costs nothing next to scaling the ``(tokens, out)`` output, and the
    backward then keeps only the input it keeps anyway (LayerScale's gradient comes from the weight's).
    """
    if scale is None:
        return linear(x)
    bias = None if linear.bias is None else linear.bias * scale
    return F.linear(x, linear.weight * scale.unsqueeze(-1), bias)


class _CPUMatmulAttention(torch.autograd.Function):
    """Attention over packed ``(3, B * heads, N, d)`` q/k/v as batched matmuls; see :func:`cpu_matmul_attention`.

    Forward: the scores ``scale * q k^T`` and their softmax in float32 (autocast off: under a bf16 autocast a
    plain ``@`` would cast the float32 copies back to bf16), the probabilities cast to the input dtype for
    ``p v``. Saved for the backward: the packed input, the float32 probabilities and their cast (no float32
    copies of q and k). Backward, as FlashAttention-2 does it on GPUs: ``dp = do v^T`` in the input dtype,
    the softmax gradient ``ds`` in float32, then ``ds`` rounded to the input dtype for ``dq = ds k`` and
    ``dk = ds^T q`` (matmuls in the input dtype with float32 accumulation, where float32 operands would run
    at the CPU's float32 rate). The gradient is written straight into one packed tensor.
    """

    @staticmethod
    def forward(ctx, qkv: torch.Tensor, scale: float) -> torch.Tensor:
        q, k, v = qkv.unbind(0)
        with torch.autocast(qkv.device.type, enabled=False):
            scores = torch.bmm(q.to(torch.float32, copy=True).mul_(scale), k.float().transpose(1, 2))
            probs = torch.softmax(scores, dim=-1)
            probs_low = probs.to(qkv.dtype)
            out = torch.bmm(probs_low, v)
        ctx.save_for_backward(qkv, probs, probs_low)
        ctx.scale = scale
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor, None]:
        qkv, probs, probs_low = ctx.saved_tensors
        q, k, v = qkv.unbind(0)
        grad_out = grad_out.to(qkv.dtype).contiguous()
        grad = torch.empty_like(qkv)
        with torch.autocast(qkv.device.type, enabled=False):
            torch.bmm(probs_low.transpose(1, 2), grad_out, out=grad[2])
            grad_probs = torch.bmm(grad_out, v.transpose(1, 2)).float()
            grad_scores = torch._softmax_backward_data(grad_probs, probs, -1, torch.float32)
            grad_scores = grad_scores.mul_(ctx.scale).to(qkv.dtype)
            torch.bmm(grad_scores, k, out=grad[0])
            torch.bmm(grad_scores.transpose(1, 2), q, out=grad[1])
        return grad, None


def cpu_matmul_attention_packed(qkv: torch.Tensor) -> torch.Tensor:
    """:func:`cpu_matmul_attention` on q, k and v packed as one contiguous ``(3, B * heads, N, d)`` tensor ->
    ``(B * heads, N, d)``. The layout the batched matmuls want, made with one copy of the projection's
    output; the backward hands its gradient back in the same layout."""
    return _CPUMatmulAttention.apply(qkv.contiguous(), qkv.shape[-1] ** -0.5)


def cpu_matmul_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``softmax(q k^T / sqrt(d)) v`` for ``(B, heads, N, d)`` tensors on CPU, as two batched matmuls.

    The scores and the softmax are computed in float32, with or without autocast (so bf16/fp16 inputs do not
    round large logits to 8 bits: the accuracy of a fused kernel); the probabilities are cast back to the
    input dtype for the product with ``v``, which runs in the input dtype. Result in the input dtype. The
    backward rounds the scores' gradient to the input dtype before its two matmuls, as FlashAttention-2
    does (:class:`_CPUMatmulAttention`).
    """
    B, H, N, d = q.shape
    out = cpu_matmul_attention_packed(torch.stack((q, k, v)).view(3, B * H, N, d))
    return out.view(B, H, N, d)


def _use_cpu_matmul_attention(q: torch.Tensor, k: torch.Tensor) -> bool:
    # A JIT trace (the FLOP count) records a Python autograd Function as an opaque op: it gets the sdpa op,
    # the same function.
    if torch.jit.is_tracing() or q.device.type != "cpu":
        return False
    if q.shape[:-1].numel() * k.shape[-2] > CPU_ATTN_MAX_SCORES:
        return False
    if q.dtype in (torch.bfloat16, torch.float16):
        return True
    return q.dtype == torch.float32 and k.shape[-2] <= CPU_FP32_MATMUL_MAX_TOKENS


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[x1, x2] -> [-x2, x1]`` over the last dimension (its two halves)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(q: torch.Tensor, k: torch.Tensor, rope: RopeSinCos) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate the patch tokens of ``q`` and ``k`` (``(B, heads, N, d)``): ``t * cos + rotate_half(t) * sin``.

    ``sin``/``cos`` are ``(HW, d)`` for the last ``HW`` tokens; the ``N - HW`` tokens in front (class and
    storage tokens) are left as they are. The rotation runs in the dtype of ``sin`` (the RoPE dtype, fp32 in
    the releases) and the result is cast back to the dtype of ``q``/``k``.
    """
    sin, cos = rope
    n_prefix = q.shape[-2] - sin.shape[-2]
    if n_prefix < 0:
        raise ValueError(f"RoPE for {sin.shape[-2]} patches but only {q.shape[-2]} tokens")

    def rotate(t: torch.Tensor) -> torch.Tensor:
        patches = t[..., n_prefix:, :].to(sin.dtype)
        patches = (patches * cos + rotate_half(patches) * sin).to(t.dtype)
        return torch.cat((t[..., :n_prefix, :], patches), dim=-2)

    return rotate(q), rotate(k)


class MaskedKeyBiasLinear(nn.Linear):
    """The qkv projection of DINOv3: its bias is multiplied by the fixed buffer ``bias_mask``, 1 on the query
    and value thirds and 0 on the key third, so the key bias is always zero (``F.linear(x, W, b * mask)``).

    ``bias_mask`` is a persistent buffer because the official checkpoints hold it (``attn.qkv.bias_mask``).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias=bias)
        if out_features % 3 != 0:
            raise ValueError(f"a qkv projection needs out_features divisible by 3, got {out_features}")
        if bias:
            self.register_buffer("bias_mask", torch.empty(out_features, device=self.weight.device))
            self.reset_bias_mask()
        else:
            self.bias_mask = None

    @torch.no_grad()
    def reset_bias_mask(self) -> None:
        if self.bias_mask is not None:
            third = self.out_features // 3
            self.bias_mask.fill_(1.0)
            self.bias_mask[third : 2 * third] = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias * self.bias_mask.to(self.bias.dtype)
        return F.linear(x, self.weight, bias)


class Attention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` projection and an output ``proj`` (DINOv2 names).

    Args:
        dim: token dimension ``C``.
        num_heads: number of heads; must divide ``dim``.
        qkv_bias: bias in the qkv projection.
        proj_bias: bias in the output projection.
        attn_backend: ``"sdpa"`` (None means sdpa), ``"xformers"`` or ``"math"``; ``$DINOSCALE_ATTN`` wins.
        mask_k_bias: the qkv projection keeps its key bias at zero (:class:`MaskedKeyBiasLinear`, DINOv3).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        attn_backend: str | None = None,
        mask_k_bias: bool = False,
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.attn_backend = resolve_attn_backend(attn_backend)
        self.qkv = (MaskedKeyBiasLinear if mask_k_bias else nn.Linear)(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, attn_backend={self.attn_backend!r}"

    def _use_xformers(self, x: torch.Tensor, rope: object = None) -> bool:
        global _warned_xformers_rope
        if self.attn_backend != "xformers":
            return False
        if rope is not None:
            if not _warned_xformers_rope:
                _warned_xformers_rope = True
                warnings.warn("attention backend 'xformers' has no RoPE path here; using 'sdpa'", stacklevel=3)
            return False
        if not x.is_cuda:
            _warn_xformers_fallback("the tensors are not on CUDA")
            return False
        problem = _xformers_cuda_problem(x.device)
        if problem is not None:
            _warn_xformers_fallback(problem)
            return False
        return True

    def _attend(self, qkv: torch.Tensor, rope: RopeSinCos | None = None) -> torch.Tensor:
        """Attention over packed ``qkv`` of shape ``(B, N, 3, heads, d)`` with sdpa or math -> ``(B, N, heads*d)``."""
        B, N = qkv.shape[:2]
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, d)
        if rope is not None:
            q, k = apply_rope(q, k, rope)
        if self.attn_backend == "math":
            out = math_attention(q, k, v)
        elif _use_cpu_matmul_attention(q, k):
            # the matmul path's layout, (3, B * heads, N, d): one copy of qkv (or of the rotated q and k)
            packed = qkv.permute(2, 0, 3, 1, 4) if rope is None else torch.stack((q, k, v))
            out = cpu_matmul_attention_packed(packed.reshape(3, B * self.num_heads, N, self.head_dim))
            out = out.view(B, self.num_heads, N, self.head_dim)
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        return out.transpose(1, 2).reshape(B, N, -1)

    def forward(
        self,
        x: torch.Tensor | Sequence[torch.Tensor],
        crop_shapes: tuple[tuple[int, int], ...] | None = None,
        out_scale: torch.Tensor | None = None,
        rope: RopeSinCos | Sequence[RopeSinCos] | None = None,
    ) -> torch.Tensor | list[torch.Tensor]:
        """``(B, N, C)`` -> ``(B, N, C)``; a list of ``(B_i, N_i, C)`` -> a list; packed ``(sum B_i N_i, C)`` with
        ``crop_shapes`` -> packed. Tokens attend only within their own image of their own crop.
        ``out_scale``: a per-channel factor on the output (LayerScale), folded into ``proj``.
        ``rope``: ``(sin, cos)`` for one tensor, one such pair per crop for a list or packed crops."""
        if isinstance(x, (list, tuple)):
            return self._forward_list(list(x), out_scale, rope)
        if crop_shapes is not None:
            return self._forward_packed(x, crop_shapes, out_scale, rope)
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)
        if self._use_xformers(x, rope):
            q, k, v = qkv.unbind(2)  # xformers wants (B, N, heads, d)
            out = _xformers_ops().memory_efficient_attention(q, k, v).reshape(B, N, C)
        else:
            out = self._attend(qkv, rope)
        return scaled_linear(self.proj, out, out_scale)

    def _forward_list(
        self,
        xs: list[torch.Tensor],
        out_scale: torch.Tensor | None = None,
        rope: Sequence[RopeSinCos] | None = None,
    ) -> list[torch.Tensor]:
        if not xs:
            raise ValueError("Attention got an empty list of token tensors")
        C = xs[0].shape[-1]
        shapes = tuple((int(x.shape[0]), int(x.shape[1])) for x in xs)
        out = self._forward_packed(torch.cat([x.reshape(-1, C) for x in xs]), shapes, out_scale, rope)
        return [o.view(b, n, C) for o, (b, n) in zip(out.split([b * n for b, n in shapes]), shapes)]

    def _forward_packed(
        self,
        x: torch.Tensor,
        crop_shapes: tuple[tuple[int, int], ...],
        out_scale: torch.Tensor | None = None,
        rope: Sequence[RopeSinCos] | None = None,
    ) -> torch.Tensor:
        """Packed tokens ``(sum_i B_i * N_i, C)`` of the crops ``((B_i, N_i), ...)`` -> packed output."""
        T, C = x.shape
        if T != sum(b * n for b, n in crop_shapes):
            raise ValueError(f"{T} packed tokens do not match the crop shapes {crop_shapes}")
        if rope is not None and len(rope) != len(crop_shapes):
            raise ValueError(f"got {len(rope)} RoPE (sin, cos) pairs for {len(crop_shapes)} crops")
        # Projections are token-wise: one matmul over all crops' tokens each.
        qkv = self.qkv(x)
        if self._use_xformers(x, rope):
            fmha = _xformers_ops().fmha
            # One kernel call over all crops; the block-diagonal bias keeps each image's tokens separate.
            attn_bias = fmha.BlockDiagonalMask.from_seqlens([n for b, n in crop_shapes for _ in range(b)])
            q, k, v = qkv.reshape(1, T, 3, self.num_heads, self.head_dim).unbind(2)
            out = _xformers_ops().memory_efficient_attention(q, k, v, attn_bias=attn_bias).reshape(T, C)
        else:
            sizes = [b * n for b, n in crop_shapes]
            ropes = rope if rope is not None else [None] * len(crop_shapes)
            outs = [
                self._attend(part.view(b, n, 3, self.num_heads, self.head_dim), r).reshape(-1, C)
                for part, (b, n), r in zip(qkv.split(sizes), crop_shapes, ropes)
            ]
            out = torch.cat(outs) if len(outs) > 1 else outs[0]
        return scaled_linear(self.proj, out, out_scale)

    def attention_probs(self, x: torch.Tensor, rope: RopeSinCos | None = None) -> torch.Tensor:
        """Attention probabilities ``(B, heads, N, N)`` for ``x`` of shape ``(B, N, C)`` (explicit softmax)."""
        B, N, _ = x.shape
        q, k, _v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if rope is not None:
            q, k = apply_rope(q, k, rope)
        return ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
