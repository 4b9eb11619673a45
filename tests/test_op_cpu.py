"""The public op `fwagen.window_attention` on CPU: fallback, layouts, errors, opcheck, autograd, torch.compile.

On CPU the op runs `fwagen.reference` itself, so float64 results must match the float64 reference to float64
rounding (1e-12) and float32 results the float32 reference exactly up to a few ulps (the same ops in the same
order; 1e-6 covers a different reduction order inside matmul).
"""
from __future__ import annotations

import warnings

import pytest
import torch

import fwagen
import fwagen.op
from fwagen.reference import relative_position_bias, window_attention_reference

OP = torch.ops.fwagen.window_attention_fwd.default
TOLERANCE = {torch.float64: dict(rtol=0, atol=1e-12), torch.float32: dict(rtol=1e-6, atol=1e-6)}


@pytest.fixture
def quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="fwagen: ")
        yield


def fresh_generator() -> torch.Generator:
    gen = torch.Generator()
    gen.manual_seed(torch.seed() % (2**31))
    return gen


def make_inputs(windows=4, heads=2, n=5, d=8, dtype=torch.float64, *, bias=True, mask_windows=0,
                qkv_strided=False, requires_grad=False):
    """Fresh random q, k, v, bias and a 0/-100 mask (every row keeps itself)."""
    gen = fresh_generator()
    if qkv_strided:
        qkv = torch.randn(windows, n, 3, heads, d, generator=gen, dtype=dtype)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    else:
        q, k, v = torch.randn(3, windows, heads, n, d, generator=gen, dtype=dtype).unbind(0)
    b = torch.randn(heads, n, n, generator=gen, dtype=dtype) * 2 if bias else None
    m = None
    if mask_windows:
        keep = (torch.rand(mask_windows, n, n, generator=gen) < 0.6) | torch.eye(n, dtype=torch.bool)
        m = torch.where(keep, 0.0, -100.0).to(dtype)
    if requires_grad:
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
        if b is not None:
            b.requires_grad_()
    return q, k, v, b, m


# --- the CPU fallback ------------------------------------------------------------------------------------------


def test_cpu_fallback_warns_once_and_says_why():
    q, k, v, b, m = make_inputs(mask_windows=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # Python's own once-per-location filter must not do fwagen's job
        fwagen.window_attention(q, k, v, b, m)
        fwagen.window_attention(q, k, v, b, m, layout="bnc")
        fwagen.window_attention(q.float(), k.float(), v.float())
    ours = [w for w in caught if "fwagen" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in ours]
    message = str(ours[0].message)
    assert "cpu" in message and "reference" in message, message
    assert issubclass(ours[0].category, UserWarning)


def test_fallback_warning_points_at_the_caller():
    q, k, v, b, _ = make_inputs()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fwagen.window_attention(q, k, v, b)
    ours = [w for w in caught if "fwagen" in str(w.message)]
    assert len(ours) == 1
    assert ours[0].filename == __file__, f"{ours[0].filename}:{ours[0].lineno}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("bias, mask_windows", [(True, 2), (True, 0), (False, 2), (False, 0)],
                         ids=["bias-mask", "bias", "mask", "plain"])
def test_cpu_result_equals_reference(dtype, bias, mask_windows, quiet):
    q, k, v, b, m = make_inputs(6, 3, 9, 8, dtype, bias=bias, mask_windows=mask_windows)
    out = fwagen.window_attention(q, k, v, b, m)
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out, window_attention_reference(q, k, v, b, m), **TOLERANCE[dtype])


def test_custom_scale_reaches_the_computation(quiet):
    q, k, v, b, m = make_inputs(4, 2, 9, 16, mask_windows=2)
    out = fwagen.window_attention(q, k, v, b, m, scale=0.9)
    torch.testing.assert_close(out, window_attention_reference(q, k, v, b, m, 0.9), **TOLERANCE[torch.float64])
    assert (out - fwagen.window_attention(q, k, v, b, m)).abs().max() > 1e-3


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_layouts_are_the_transpose_and_reshape_of_each_other(dtype, quiet):
    windows, heads, n, d = 6, 3, 7, 8
    q, k, v, b, m = make_inputs(windows, heads, n, d, dtype, mask_windows=3)
    bhnd = fwagen.window_attention(q, k, v, b, m, layout="bhnd")
    bnc = fwagen.window_attention(q, k, v, b, m, layout="bnc")
    assert bhnd.shape == (windows, heads, n, d)
    assert bnc.shape == (windows, n, heads * d)
    assert torch.equal(bnc, bhnd.transpose(1, 2).reshape(windows, n, heads * d))
    # Channel c of token i is head c // d, column c % d: the layout the output projection expects.
    assert torch.equal(bnc[2, 4, 2 * d + 5], bhnd[2, 2, 4, 5])
    torch.testing.assert_close(bhnd, window_attention_reference(q, k, v, b, m), **TOLERANCE[dtype])


def test_qkv_strided_views_are_accepted(quiet):
    q, k, v, b, m = make_inputs(4, 3, 9, 8, qkv_strided=True, mask_windows=2)
    assert not q.is_contiguous() and q.data_ptr() != k.data_ptr()
    out = fwagen.window_attention(q, k, v, b, m, layout="bnc")
    expected = window_attention_reference(q.contiguous(), k.contiguous(), v.contiguous(), b, m)
    torch.testing.assert_close(out, expected.transpose(1, 2).reshape(4, 9, 24), **TOLERANCE[torch.float64])


def test_float32_bias_and_mask_with_float64_inputs(quiet):
    """Under autocast Swin's table and mask are float32; bias and mask dtypes need not match q's."""
    q, k, v, b, m = make_inputs(4, 2, 9, 8, mask_windows=2)
    out = fwagen.window_attention(q, k, v, b.float(), m.float())
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, window_attention_reference(q, k, v, b.float(), m.float()),
                               **TOLERANCE[torch.float64])


def test_bias_and_mask_reach_the_kernels_float32_contiguous_and_16_byte_aligned():
    """The kernels copy bias and mask rows 16 bytes at a time: a contiguous view that starts one float into its
    storage is copied, an aligned float32 one passed as it is."""
    storage = torch.randn(1 + 2 * 12 * 12)
    shifted = storage[1:].view(2, 12, 12)
    assert shifted.is_contiguous() and shifted.data_ptr() % 16 == 4
    operand = fwagen.op._float32_operand(shifted)
    assert operand.dtype == torch.float32 and operand.is_contiguous() and operand.data_ptr() % 16 == 0
    torch.testing.assert_close(operand, shifted, rtol=0, atol=0)
    aligned = torch.randn(2, 12, 12)
    assert fwagen.op._float32_operand(aligned).data_ptr() == aligned.data_ptr()
    assert fwagen.op._float32_operand(None) is None


# --- errors that name the argument -----------------------------------------------------------------------------


def test_wrong_rank_names_the_argument():
    q, k, v, _, _ = make_inputs()
    with pytest.raises(ValueError, match=r"^q: expected 4 dimensions.*got shape \(2, 5, 8\)"):
        fwagen.window_attention(q[0], k, v)
    with pytest.raises(ValueError, match=r"^v: expected 4 dimensions"):
        fwagen.window_attention(q, k, v.unsqueeze(0))


def test_mismatched_k_or_v_shape_names_them():
    q, k, v, _, _ = make_inputs()
    with pytest.raises(ValueError, match=r"k and v: expected the shape of q \(4, 2, 5, 8\).*k \(4, 2, 6, 8\)"):
        fwagen.window_attention(q, torch.randn(4, 2, 6, 8, dtype=q.dtype), v)
    with pytest.raises(ValueError, match=r"k and v: .*v \(4, 2, 5, 16\)"):
        fwagen.window_attention(q, k, torch.randn(4, 2, 5, 16, dtype=q.dtype))


def test_mixed_dtypes_name_the_arguments():
    q, k, v, _, _ = make_inputs()
    with pytest.raises(TypeError, match=r"k and v: expected q's dtype torch.float64.*torch.float32"):
        fwagen.window_attention(q, k.float(), v)


def test_mixed_devices_name_the_arguments():
    q, k, v, _, _ = make_inputs()
    with pytest.raises(ValueError, match=r"k and v: expected q's device cpu.*meta"):
        fwagen.window_attention(q, k, v.to("meta"))
    b = torch.randn(2, 5, 5, device="meta", dtype=q.dtype)
    with pytest.raises(ValueError, match=r"^bias: expected q's device"):
        fwagen.window_attention(q, k, v, b)


@pytest.mark.parametrize("position", ["q", "k", "v"])
def test_integer_tensors_are_rejected_by_name(position):
    tensors = dict(zip("qkv", make_inputs()[:3]))
    tensors[position] = torch.randint(0, 5, (4, 2, 5, 8))
    with pytest.raises(TypeError, match=rf"^{position}: expected a floating-point tensor, got torch.int64"):
        fwagen.window_attention(tensors["q"], tensors["k"], tensors["v"])


def test_integer_bias_and_mask_are_rejected_by_name():
    q, k, v, _, _ = make_inputs()
    with pytest.raises(TypeError, match=r"^bias: expected a floating-point tensor"):
        fwagen.window_attention(q, k, v, torch.zeros(2, 5, 5, dtype=torch.int32))
    with pytest.raises(TypeError, match=r"^mask: expected a floating-point tensor"):
        fwagen.window_attention(q, k, v, None, torch.zeros(2, 5, 5, dtype=torch.bool))


@pytest.mark.parametrize("shape", [(3, 5, 5), (2, 5, 4), (2, 5), (1, 2, 5, 5)], ids=str)
def test_bias_of_wrong_shape_names_bias_and_the_expected_shape(shape):
    q, k, v, _, _ = make_inputs()
    with pytest.raises(ValueError, match=r"^bias: expected shape \(heads=2, 5, 5\), got " + r"\(" + ", ".join(
            str(s) for s in shape) + r"\)"):
        fwagen.window_attention(q, k, v, torch.randn(*shape, dtype=q.dtype))


@pytest.mark.parametrize("shape", [(2, 5, 4), (2, 4, 5), (5, 5), (1, 2, 5, 5)], ids=str)
def test_mask_of_wrong_shape_names_mask_and_the_expected_shape(shape):
    q, k, v, _, _ = make_inputs()
    with pytest.raises(ValueError, match=r"^mask: expected shape \(windows_per_image, 5, 5\)"):
        fwagen.window_attention(q, k, v, None, torch.zeros(*shape, dtype=q.dtype))


@pytest.mark.parametrize("mask_windows", [3, 8, 0])
def test_windows_not_divisible_by_mask_windows_names_mask(mask_windows):
    q, k, v, b, _ = make_inputs(windows=4)
    with pytest.raises(ValueError, match=rf"^mask: its {mask_windows} windows per image must divide the 4 windows"):
        fwagen.window_attention(q, k, v, b, torch.zeros(mask_windows, 5, 5, dtype=q.dtype))


def test_mask_requiring_grad_is_rejected():
    q, k, v, b, m = make_inputs(mask_windows=2)
    with pytest.raises(ValueError, match=r"^mask: .*no gradient.*detach"):
        fwagen.window_attention(q, k, v, b, m.requires_grad_())


@pytest.mark.parametrize("layout", ["bnhd", "BHND", "", None])
def test_bad_layout_string_names_layout(layout):
    q, k, v, _, _ = make_inputs()
    with pytest.raises(ValueError, match=r"^layout: expected one of \('bhnd', 'bnc'\)"):
        fwagen.window_attention(q, k, v, layout=layout)


@pytest.mark.parametrize("scale", [0.0, -0.25, float("inf"), float("nan"), 1e-39, 1e39])
def test_scale_that_is_not_a_positive_normal_float32_names_scale(scale):
    q, k, v, b, m = make_inputs(mask_windows=2)
    with pytest.raises(ValueError, match=r"^scale: expected a positive finite number"):
        fwagen.window_attention(q, k, v, b, m, scale=scale)


@pytest.mark.parametrize("scale", ["0.5", True, [0.5], torch.ones(2)])
def test_scale_that_is_not_a_number_names_scale(scale):
    q, k, v, _, _ = make_inputs()
    with pytest.raises(TypeError, match=r"^scale: expected a number or None"):
        fwagen.window_attention(q, k, v, scale=scale)


@pytest.mark.parametrize("position", ["q", "k", "v", "bias", "mask"])
def test_non_tensor_input_names_the_argument(position):
    q, k, v, b, m = make_inputs(mask_windows=2)
    arguments = {"q": q, "k": k, "v": v, "bias": b, "mask": m}
    arguments[position] = arguments[position].tolist()
    with pytest.raises(TypeError, match=rf"^{position}: expected a torch.Tensor.*got list"):
        fwagen.window_attention(**arguments)


# --- torch.library registration ------------------------------------------------------------------------------


# A covering sample of dtype x (bias, mask) x layout: each pair of values appears (opcheck takes seconds per call).
OPCHECK_CASES = [
    (torch.float64, True, 2, False), (torch.float64, False, 0, True), (torch.float64, True, 0, False),
    (torch.float32, True, 2, True), (torch.float32, False, 0, False), (torch.float32, False, 2, True),
]


@pytest.mark.parametrize("dtype, bias, mask_windows, token_major", [
    pytest.param(*case, id=f"{str(case[0])[6:]}-{'bias' if case[1] else 'nobias'}-{'mask' if case[2] else 'nomask'}-"
                 f"{'bnc' if case[3] else 'bhnd'}") for case in OPCHECK_CASES])
def test_opcheck(dtype, bias, mask_windows, token_major, quiet):
    q, k, v, b, m = make_inputs(4, 2, 9, 8, dtype, bias=bias, mask_windows=mask_windows, requires_grad=True)
    torch.library.opcheck(OP, (q, k, v, b, m, 0.35, token_major))


def test_opcheck_on_qkv_strided_views(quiet):
    q, k, v, b, m = make_inputs(4, 2, 9, 8, qkv_strided=True, mask_windows=2)
    torch.library.opcheck(OP, (q, k, v, b, m, 8 ** -0.5, True))


def test_log_sum_exp_output_is_not_silently_non_differentiable(quiet):
    """The op returns (out, lse); a gradient flowing into lse must either be right or be refused."""
    q, k, v, b, m = make_inputs(4, 2, 9, 8, mask_windows=2, requires_grad=True)
    out, lse = OP(q, k, v, b, m, 0.35, False)
    if not lse.requires_grad:
        return  # marked non-differentiable: nobody can build on a wrong gradient
    got = torch.autograd.grad(lse.sum(), (q, k, v, b), allow_unused=True)
    logits = (q * 0.35) @ k.transpose(-2, -1) + b
    logits = (logits.view(2, 2, 2, 9, 9) + m.unsqueeze(1).unsqueeze(0)).view(4, 2, 9, 9)
    expected = torch.autograd.grad(logits.logsumexp(-1).sum(), (q, k, v, b), allow_unused=True)
    for name, a, e in zip("qkvb", got, expected):
        a = torch.zeros_like(q if name != "b" else b) if a is None else a
        e = torch.zeros_like(a) if e is None else e
        torch.testing.assert_close(a, e, rtol=0, atol=1e-6, msg=name)  # lse is float32


# --- autograd ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["bhnd", "bnc"])
@pytest.mark.parametrize("mask_windows", [0, 2], ids=["no-mask", "mask"])
def test_gradcheck_q_k_v_and_bias(layout, mask_windows, quiet):
    q, k, v, b, m = make_inputs(4, 2, 5, 8, bias=True, mask_windows=mask_windows, requires_grad=True)

    def fn(q, k, v, b):
        return fwagen.window_attention(q, k, v, b, m, scale=0.45, layout=layout)

    # fast_mode checks a random projection of the Jacobian (one op call per direction, not per element):
    # the same check of the backward formula, minutes faster on CI; the test below runs the full Jacobian.
    assert torch.autograd.gradcheck(fn, (q, k, v, b), fast_mode=True)


def test_gradcheck_with_a_head_dim_no_kernel_takes(quiet):
    """validate accepts any head dim; the reference fallback must differentiate it too (full Jacobian)."""
    q, k, v, b, _ = make_inputs(2, 2, 3, 3, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, k, v, b: fwagen.window_attention(q, k, v, b), (q, k, v, b))


def test_gradients_equal_those_of_the_reference(quiet):
    q, k, v, b, m = make_inputs(4, 2, 9, 8, mask_windows=2, requires_grad=True)
    grad_out = torch.randn(4, 9, 16, dtype=torch.float64)
    out = fwagen.window_attention(q, k, v, b, m, layout="bnc")
    ours = torch.autograd.grad(out, (q, k, v, b), grad_out)
    expected_out = window_attention_reference(q, k, v, b, m).transpose(1, 2).reshape(4, 9, 16)
    theirs = torch.autograd.grad(expected_out, (q, k, v, b), grad_out)
    for name, a, e in zip("qkvb", ours, theirs):
        torch.testing.assert_close(a, e, rtol=0, atol=1e-12, msg=name)


def test_backward_of_a_broadcast_gradient_in_token_major_layout(quiet):
    """`out.sum()` hands the backward an expanded (stride 0) gradient; the bnc view of it must still work."""
    q, k, v, b, _ = make_inputs(4, 2, 5, 8, requires_grad=True)
    fwagen.window_attention(q, k, v, b, layout="bnc").sum().backward()
    expected = torch.autograd.grad(window_attention_reference(q, k, v, b).sum(), (q, k, v, b))
    for a, e in zip((q.grad, k.grad, v.grad, b.grad), expected):
        torch.testing.assert_close(a, e, rtol=0, atol=1e-12)


def test_gradient_reaches_the_relative_position_bias_table(quiet):
    gen = fresh_generator()
    window_h, window_w, heads = 3, 5, 2
    table = torch.randn((2 * window_h - 1) * (2 * window_w - 1), heads, generator=gen, dtype=torch.float64,
                        requires_grad=True)
    q, k, v, _, m = make_inputs(4, heads, window_h * window_w, 8, mask_windows=2)

    def fn(table):
        return fwagen.window_attention(q, k, v, relative_position_bias(table, window_h, window_w), m)

    weights = torch.randn(4, heads, 15, 8, generator=gen, dtype=torch.float64)
    (fn(table) * weights).sum().backward()
    assert table.grad is not None and table.grad.abs().max() > 0
    reference_table = table.detach().clone().requires_grad_()
    reference = window_attention_reference(q, k, v, relative_position_bias(reference_table, window_h, window_w), m)
    (reference * weights).sum().backward()
    torch.testing.assert_close(table.grad, reference_table.grad, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(fn, (table,), fast_mode=True)


def test_second_order_gradients_are_refused_not_silently_zero(quiet):
    q, k, v, b, _ = make_inputs(2, 2, 3, 4, requires_grad=True)
    out = fwagen.window_attention(q, k, v, b)
    with pytest.raises(RuntimeError, match="second-order"):
        torch.autograd.grad(out.sum(), (q, k, v, b), create_graph=True)


def test_inputs_without_grad_get_none_and_no_bias_grad(quiet):
    q, k, v, b, _ = make_inputs(4, 2, 5, 8)
    q.requires_grad_()
    fwagen.window_attention(q, k, v, b).sum().backward()
    assert q.grad is not None and k.grad is None and b.grad is None


# --- torch.compile -------------------------------------------------------------------------------------------
# backend="aot_eager": it traces the op through its fake implementation and runs AOTAutograd (so the autograd
# registration is traced too), which is everything fwagen contributes to a compiled graph; inductor would add
# only C++ code generation for the surrounding torch ops, minutes of compiler time on a 2-core CI machine.


def test_torch_compile_fullgraph_matches_eager(quiet):
    q, k, v, b, m = make_inputs(4, 2, 9, 8, mask_windows=2, qkv_strided=True)

    def fn(q, k, v, b, m):
        return fwagen.window_attention(q, k, v, b, m, layout="bnc") * 2 + 1

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v, b, m), fn(q, k, v, b, m), rtol=0, atol=1e-12)


def test_torch_compile_fullgraph_backward_matches_eager(quiet):
    q, k, v, b, m = make_inputs(4, 2, 9, 8, mask_windows=2, requires_grad=True)

    def fn(q, k, v, b):
        return fwagen.window_attention(q, k, v, b, m, scale=0.3).square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(q, k, v, b), (q, k, v, b))
    expected = torch.autograd.grad(fn(q, k, v, b), (q, k, v, b))
    for a, e in zip(got, expected):
        torch.testing.assert_close(a, e, rtol=0, atol=1e-12)


def test_torch_compile_traces_one_graph_with_the_custom_op(quiet):
    from torch._dynamo.testing import CompileCounterWithBackend

    q, k, v, b, m = make_inputs(4, 2, 9, 8, mask_windows=2)
    counter = CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    compiled = torch.compile(lambda q, k, v, b, m: fwagen.window_attention(q, k, v, b, m), backend=counter,
                             fullgraph=True)
    compiled(q, k, v, b, m)
    assert counter.frame_count == 1
    targets = [node.target for graph in counter.graphs for node in graph.graph.nodes]
    assert any("window_attention_fwd" in str(target) for target in targets), targets


# --- window_attention_qkv: q, k and v packed as a qkv Linear's output ------------------------------------------

QKV_OP = torch.ops.fwagen.window_attention_qkv_fwd.default


def make_qkv(windows=4, heads=2, n=9, d=8, dtype=torch.float64, *, mask_windows=2):
    """A fresh (windows, N, 3, heads, d) qkv leaf, bias leaf and 0/-100 mask."""
    _, _, _, b, m = make_inputs(windows, heads, n, d, dtype, mask_windows=mask_windows, requires_grad=True)
    qkv = torch.randn(windows, n, 3, heads, d, generator=fresh_generator(), dtype=dtype, requires_grad=True)
    return qkv, b, m


@pytest.mark.parametrize("layout", ["bhnd", "bnc"])
def test_qkv_entry_gives_the_values_and_gradients_of_q_k_v_views(layout, quiet):
    qkv, b, m = make_qkv()
    out = fwagen.window_attention_qkv(qkv, b, m, scale=0.3, layout=layout)
    grad_out = torch.randn_like(out)
    got = torch.autograd.grad(out, (qkv, b), grad_out)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    expected_out = fwagen.window_attention(q, k, v, b, m, scale=0.3, layout=layout)
    expected = torch.autograd.grad(expected_out, (qkv, b), grad_out)
    torch.testing.assert_close(out, expected_out, rtol=0, atol=1e-12)
    for name, a, e in zip(("qkv", "bias"), got, expected):
        assert a.shape == e.shape, name
        torch.testing.assert_close(a, e, rtol=0, atol=1e-12, msg=name)


def test_gradcheck_qkv_and_bias(quiet):
    qkv, b, m = make_qkv(4, 2, 5, 8)
    assert torch.autograd.gradcheck(lambda qkv, b: fwagen.window_attention_qkv(qkv, b, m, layout="bnc"), (qkv, b),
                                    fast_mode=True)


@pytest.mark.parametrize("dtype, token_major", [(torch.float64, True), (torch.float32, False)], ids=str)
def test_opcheck_qkv(dtype, token_major, quiet):
    qkv, b, m = make_qkv(dtype=dtype)
    torch.library.opcheck(QKV_OP, (qkv, b, m, 0.35, token_major))


@pytest.mark.parametrize("shape", [(4, 9, 2, 8), (4, 9, 2, 2, 8), (4, 9, 3, 2, 8, 1)], ids=str)
def test_qkv_of_wrong_shape_names_qkv(shape):
    with pytest.raises(ValueError, match=r"qkv: expected shape \(windows, tokens, 3, heads, head_dim\)"):
        fwagen.window_attention_qkv(torch.randn(shape))


def test_qkv_that_is_not_a_tensor_names_qkv():
    with pytest.raises(TypeError, match="qkv: expected a torch.Tensor"):
        fwagen.window_attention_qkv([[1.0]])


def test_qkv_fallback_warning_points_at_the_caller():
    qkv, b, _ = make_qkv()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fwagen.window_attention_qkv(qkv.detach(), b.detach())
    ours = [w for w in caught if "fwagen" in str(w.message)]
    assert len(ours) == 1 and ours[0].filename == __file__, [(w.filename, w.lineno) for w in ours]


def test_torch_compile_fullgraph_backward_of_qkv_matches_eager(quiet):
    qkv, b, m = make_qkv()

    def fn(qkv, b):
        return fwagen.window_attention_qkv(qkv, b, m, scale=0.3, layout="bnc").square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(qkv, b), (qkv, b))
    expected = torch.autograd.grad(fn(qkv, b), (qkv, b))
    for a, e in zip(got, expected):
        torch.testing.assert_close(a, e, rtol=0, atol=1e-12)
