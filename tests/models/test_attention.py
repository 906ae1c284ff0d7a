import pytest
import torch
import torch.nn.functional as F

import dinoscale.models.attention as attention_module
from dinoscale.models.attention import Attention, math_attention, resolve_attn_backend


def _pair(attn_backend_a, attn_backend_b, dim=32, num_heads=4):
    torch.manual_seed(0)
    a = Attention(dim, num_heads, attn_backend=attn_backend_a)
    b = Attention(dim, num_heads, attn_backend=attn_backend_b)
    b.load_state_dict(a.state_dict())
    return a, b


@pytest.fixture(autouse=True)
def _no_env_override(monkeypatch):
    monkeypatch.delenv("DINOSCALE_ATTN", raising=False)


def test_math_attention_matches_hand_computed_softmax():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 2, 5, 8).unbind(0)
    expected = torch.empty_like(q)
    for b in range(2):
        for h in range(2):
            scores = q[b, h] @ k[b, h].T / 8**0.5
            weights = torch.exp(scores - scores.max(dim=-1, keepdim=True).values)
            expected[b, h] = (weights / weights.sum(dim=-1, keepdim=True)) @ v[b, h]
    torch.testing.assert_close(math_attention(q, k, v), expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("shape", [(2, 17, 32), (1, 5, 32), (3, 50, 32)])
def test_sdpa_equals_math_reference(shape):
    sdpa, math = _pair("sdpa", "math")
    assert (sdpa.attn_backend, math.attn_backend) == ("sdpa", "math")
    x = torch.randn(shape)
    torch.testing.assert_close(sdpa(x), math(x), atol=1e-5, rtol=1e-5)


def test_list_of_crops_equals_separate_calls_and_backends_agree():
    sdpa, math = _pair("sdpa", "math")
    xs = [torch.randn(2, 17, 32), torch.randn(3, 5, 32)]
    out_sdpa, out_math = sdpa(xs), math(xs)
    assert [o.shape for o in out_sdpa] == [x.shape for x in xs]
    for x, o_s, o_m in zip(xs, out_sdpa, out_math):
        # Separate calls: proves that no token attends to another crop or another image.
        torch.testing.assert_close(o_s, sdpa(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(o_s, o_m, atol=1e-5, rtol=1e-5)


def test_none_means_sdpa():
    assert Attention(16, 2).attn_backend == "sdpa"
    assert resolve_attn_backend(None) == "sdpa"


def test_env_var_overrides_constructor_argument(monkeypatch):
    calls = []
    real_sdpa = F.scaled_dot_product_attention

    def counting_sdpa(*args, **kwargs):
        calls.append(1)
        return real_sdpa(*args, **kwargs)

    monkeypatch.setattr(attention_module.F, "scaled_dot_product_attention", counting_sdpa)
    monkeypatch.setattr(attention_module, "CPU_FP32_MATMUL_MAX_TOKENS", 0)  # short fp32 would take the matmul path
    x = torch.randn(2, 9, 16)

    Attention(16, 2, attn_backend="sdpa")(x)
    assert len(calls) == 1  # without the variable the constructor argument is used

    monkeypatch.setenv("DINOSCALE_ATTN", "math")
    attn = Attention(16, 2, attn_backend="sdpa")
    assert attn.attn_backend == "math"
    attn(x)
    assert len(calls) == 1  # the math path never touched sdpa


def test_unknown_backend_is_a_clear_error(monkeypatch):
    with pytest.raises(ValueError, match="unknown attention backend 'flash'.*attn_backend"):
        Attention(16, 2, attn_backend="flash")
    monkeypatch.setenv("DINOSCALE_ATTN", "fast")
    with pytest.raises(ValueError, match="unknown attention backend 'fast'.*DINOSCALE_ATTN"):
        Attention(16, 2)


def test_dim_not_divisible_by_heads():
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        Attention(30, 4)


def test_xformers_on_cpu_falls_back_to_sdpa_with_one_warning(monkeypatch):
    monkeypatch.setattr(attention_module, "_warned_xformers_fallback", False)
    sdpa, xf = _pair("sdpa", "xformers")
    assert xf.attn_backend == "xformers"
    x = torch.randn(2, 9, 32)
    with pytest.warns(UserWarning, match="using 'sdpa' instead"):
        out = xf(x)
    torch.testing.assert_close(out, sdpa(x))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        xf([x, torch.randn(1, 4, 32)])  # no second warning


def test_attention_probs_rows_sum_to_one_and_reproduce_output():
    attn = Attention(32, 4)
    x = torch.randn(2, 11, 32)
    probs = attn.attention_probs(x)
    assert probs.shape == (2, 4, 11, 11)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 4, 11))
    v = attn.qkv(x).reshape(2, 11, 3, 4, 8)[:, :, 2].transpose(1, 2)
    manual = attn.proj((probs @ v).transpose(1, 2).reshape(2, 11, 32))
    torch.testing.assert_close(manual, attn(x), atol=1e-5, rtol=1e-5)


def test_xformers_without_kernels_is_detected_once(monkeypatch):
    """An xformers that imports but raises on every call (built for another torch) is reported, not called again."""
    calls = []

    class NoKernels:
        @staticmethod
        def memory_efficient_attention(q, k, v):
            calls.append(q.shape)
            raise NotImplementedError("No operator found for `memory_efficient_attention_forward` with inputs:\n ...")

    monkeypatch.setattr(attention_module, "_xformers_ops_cache", NoKernels)
    monkeypatch.setattr(attention_module, "_xformers_cuda_problem_cache", attention_module._UNSET)
    problem = attention_module._xformers_cuda_problem("cpu")
    assert problem == ("xformers has no usable CUDA kernel here "
                       "(No operator found for `memory_efficient_attention_forward`)")
    assert attention_module._xformers_cuda_problem("cpu") == problem and len(calls) == 1

    class Works:
        @staticmethod
        def memory_efficient_attention(q, k, v):
            return q

    monkeypatch.setattr(attention_module, "_xformers_ops_cache", Works)
    monkeypatch.setattr(attention_module, "_xformers_cuda_problem_cache", attention_module._UNSET)
    assert attention_module._xformers_cuda_problem("cpu") is None
    monkeypatch.setattr(attention_module, "_xformers_ops_cache", None)
    monkeypatch.setattr(attention_module, "_xformers_cuda_problem_cache", attention_module._UNSET)
    assert attention_module._xformers_cuda_problem("cpu") == "xformers could not be imported"


def test_xformers_failure_summary_names_each_operator_and_its_reasons():
    # the layout of xformers' dispatch error (xformers/ops/fmha/dispatch.py), as 0.0.35 raised it beside torch 2.11
    message = (
        "No operator found for `memory_efficient_attention_forward` with inputs:\n"
        "     query       : shape=(1, 8, 1, 64) (torch.bfloat16)\n"
        "     key         : shape=(1, 8, 1, 64) (torch.bfloat16)\n"
        "`fa3F@0.0.0` is not supported because:\n"
        "    xFormers wasn't build with CUDA support\n"
        "    operator wasn't built - see `python -m xformers.info` for more info\n"
        "`cutlassF-pt` is not supported because:\n"
        "    xFormers wasn't build with CUDA support"
    )
    assert attention_module._xformers_failure_summary(message) == (
        "No operator found for `memory_efficient_attention_forward`: "
        "fa3F@0.0.0: xFormers wasn't build with CUDA support, operator wasn't built - see `python -m xformers.info` "
        "for more info; cutlassF-pt: xFormers wasn't build with CUDA support"
    )
    assert attention_module._xformers_failure_summary("CUDA error: no kernel image\nmore") == "CUDA error: no kernel image"
    assert attention_module._xformers_failure_summary("  ") == ""


def test_xformers_build_mismatch_names_the_build(monkeypatch):
    import sys
    import types

    assert attention_module._xformers_build_mismatch() == ""  # no xformers here, or one whose library loaded
    # what xformers' _cpp_lib keeps when its compiled library did not load (xformers/_cpp_lib.py)
    cpp_lib = types.ModuleType("xformers._cpp_lib")
    cpp_lib._cpp_library_load_exception = RuntimeError(
        "xFormers can't load C++/CUDA extensions. xFormers was built for:\n"
        "    PyTorch 2.10.0+cu128 with CUDA 1208 (you have 2.11.0+cu130)\n"
        "    Python  3.10.19 (you have 3.12.3)\n"
        "  Please reinstall xformers (see https://github.com/facebookresearch/xformers#installing-xformers)"
    )
    package = types.ModuleType("xformers")
    package._cpp_lib = cpp_lib
    monkeypatch.setitem(sys.modules, "xformers", package)
    monkeypatch.setitem(sys.modules, "xformers._cpp_lib", cpp_lib)
    assert attention_module._xformers_build_mismatch() == (
        "xformers was built for PyTorch 2.10.0+cu128 with CUDA 1208 (you have 2.11.0+cu130), "
        "Python  3.10.19 (you have 3.12.3)"
    )
    cpp_lib._cpp_library_load_exception = None
    assert attention_module._xformers_build_mismatch() == ""


@pytest.mark.gpu
def test_xformers_matches_sdpa_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    pytest.importorskip("xformers.ops")
    problem = attention_module._xformers_cuda_problem()
    if problem is not None:  # e.g. a wheel built for another torch: it imports but has no kernels
        pytest.skip(problem)
    sdpa, xf = _pair("sdpa", "xformers", dim=64, num_heads=4)
    sdpa, xf = sdpa.cuda(), xf.cuda()
    xs = [torch.randn(2, 17, 64, device="cuda"), torch.randn(3, 5, 64, device="cuda")]
    for o_x, o_s in zip(xf(xs), sdpa(xs)):
        torch.testing.assert_close(o_x, o_s, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(xf(xs[0]), sdpa(xs[0]), atol=1e-4, rtol=1e-4)
