"""Backward kernels against float64 autograd of the reference on the GPU (marker gpu)."""
from __future__ import annotations

import random

import pytest
import torch

import fwagen
from fwagen.problem import Problem
from fwagen.reference import window_attention_reference
from fwagen.launch import launch_backward, sum_dbias_partials
from fwagen.space import backward_candidates, default_backward, static_violation
from fwagen.variant import BackwardVariant

from helpers import DTYPES, make_inputs, minus_inf_mask

pytestmark = pytest.mark.gpu

AXES = {
    "n": (1, 9, 16, 25, 49, 64, 100, 121, 144, 256, 576, 1024),  # tensor cores up to 144 (16-bit), CUDA cores past
    "d": (16, 32, 64, 128),
    "heads": (1, 3, 4, 7),
    "dtype": ("float16", "bfloat16", "float32"),
    "bias": (True, False),
    "mask": (True, False),
    "qkv_strided": (True, False),
    "token_major": (True, False),
}
RELATIVE_FLOOR = {torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float32: 1e-6}


def grid_sample(count=40, seed=1):
    rng = random.Random(seed)
    orders = {axis: rng.sample(values, len(values)) for axis, values in AXES.items()}
    return [{axis: orders[axis][i] if i < len(v) else rng.choice(v) for axis, v in orders.items()}
            for i in range(count)]


def gradients(q, k, v, b, m, grad_out, fn):
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    bias = None if b is None else b.detach().requires_grad_()
    out = fn(*leaves, bias, m)
    out.backward(grad_out)
    return [t.grad for t in leaves] + ([bias.grad] if bias is not None else [])


def run_case(windows, heads, n, d, dtype, *, bias, mask_windows, qkv_strided, token_major, mask=None):
    q, k, v, b, m = make_inputs(windows, heads, n, d, dtype, bias=bias, mask_windows=mask_windows,
                                qkv_strided=qkv_strided)
    m = m if mask is None else mask
    layout = "bnc" if token_major else "bhnd"
    grad_shape = (windows, n, heads * d) if token_major else (windows, heads, n, d)
    grad_out = torch.randn(grad_shape, device="cuda").to(dtype)

    def to_layout(out):
        return out.transpose(1, 2).reshape(windows, n, heads * d) if token_major else out

    def ours(q, k, v, b, m):
        return fwagen.window_attention(q, k, v, b, m, layout=layout)

    def reference(q, k, v, b, m):
        return to_layout(window_attention_reference(q, k, v, b, m))

    got = gradients(q, k, v, b, m, grad_out, ours)
    eager = gradients(q, k, v, b, m, grad_out, reference)
    expected = gradients(q.double(), k.double(), v.double(), None if b is None else b.double(),
                         None if m is None else m.double(), grad_out.double(), reference)
    assert_within_twice_eager(got, eager, expected, dtype)
    return got


def assert_within_twice_eager(got, eager, expected, dtype, label=""):
    """Each gradient's max error against float64 is at most twice eager's in the same dtype, plus a floor."""
    for name, g, e, x in zip(("dq", "dk", "dv", "dbias"), got, eager, expected):
        assert g is not None and torch.isfinite(g).all(), f"{label}{name}: missing or non-finite"
        error = (g.double() - x).abs().max().item()
        # Plus one unit in the last place at the gradient's scale (at least 1: with N = 1 the true dq and dk
        # are exactly zero, which eager hits exactly and any other summation order misses by rounding).
        floor = RELATIVE_FLOOR[dtype] * max(x.abs().max().item(), 1.0)
        allowed = 2 * (e.double() - x).abs().max().item() + floor
        assert error <= allowed, f"{label}{name}: error {error:.3g} > allowed {allowed:.3g}"


@pytest.mark.parametrize("case", grid_sample(), ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_gradients_match_float64_autograd(case):
    n, d = case["n"], case["d"]
    windows = max(2, min(32, (1 << 18) // (n * d)) // 2 * 2)
    run_case(windows, case["heads"], n, d, DTYPES[case["dtype"]], bias=case["bias"],
             mask_windows=2 if case["mask"] else 0, qkv_strided=case["qkv_strided"],
             token_major=case["token_major"])


def test_swin_stage1_uses_the_backward_kernel_and_matches():
    assert default_backward(Problem(49, 32, "float16", True, True, "bwd")) is not None
    run_case(256, 3, 49, 32, torch.float16, bias=True, mask_windows=64, qkv_strided=True, token_major=True)


def test_swin_window12_uses_the_large_window_backward_kernel_and_matches():
    problem = Problem(144, 32, "bfloat16", True, True, "bwd")
    variant = default_backward(problem)
    assert variant.kind == "bwd_mma" and variant.large_window
    run_case(128, 4, 144, 32, torch.bfloat16, bias=True, mask_windows=16, qkv_strided=True, token_major=True)


def test_float32_uses_the_cuda_core_and_window24_the_tiled_backward_kernel_and_both_match():
    for n, dtype, kind in ((49, "float32", "bwd_simt"), (576, "bfloat16", "bwd_tile")):
        assert default_backward(Problem(n, 32, dtype, True, True, "bwd")).kind == kind
    run_case(256, 3, 49, 32, torch.float32, bias=True, mask_windows=64, qkv_strided=True, token_major=True)
    run_case(32, 4, 576, 32, torch.bfloat16, bias=True, mask_windows=16, qkv_strided=True, token_major=True)


@pytest.mark.parametrize("n, dtype", [(49, "bfloat16"), (144, "bfloat16"), (49, "float32"), (256, "float16")])
def test_gradients_are_bitwise_deterministic(n, dtype):
    dtype = DTYPES[dtype]
    windows = 512 if n <= 144 else 64
    q, k, v, b, m = make_inputs(windows, 3, n, 32, dtype, mask_windows=64, qkv_strided=True)
    grad_out = torch.randn(windows, 3, n, 32, device="cuda").to(dtype)

    def run():
        return gradients(q, k, v, b, m, grad_out, lambda *a: fwagen.window_attention(*a))

    first, second = run(), run()
    for name, a, c in zip(("dq", "dk", "dv", "dbias"), first, second):
        assert torch.equal(a, c), f"{name} differs between two runs"


# The tiled kernel at sizes dispatch gives to the whole-window one too (padding, one tile, many tiles, wide heads),
# as (problem, windows, heads, mask windows): image counts of 3 and 5 leave sets of a window group idle.
TILED_CASES = [
    (Problem(1, 16, "float16", True, True, "bwd"), 12, 2, 4),
    (Problem(49, 32, "bfloat16", True, True, "bwd"), 20, 3, 4),
    (Problem(100, 64, "float16", True, False, "bwd"), 5, 2, 0),
    (Problem(144, 32, "bfloat16", True, True, "bwd"), 48, 2, 16),
    (Problem(200, 16, "float16", False, True, "bwd"), 6, 3, 2),
    (Problem(576, 32, "bfloat16", True, True, "bwd"), 20, 2, 4),
    (Problem(1024, 128, "float16", True, False, "bwd"), 3, 2, 0),
]


def tiled_variants(problem):
    """The default and a spread of the other legal tiled variants: every own_rows, tile_rows, windows_per_block."""
    legal = [v for v in backward_candidates(problem)[0] if v.kind == "bwd_tile" and v.min_blocks == 1]
    picked = {default_backward(problem)} if default_backward(problem).kind == "bwd_tile" else set()
    for knob in ("own_rows", "tile_rows", "windows_per_block"):
        for value in {getattr(v, knob) for v in legal}:
            picked.add(next(v for v in legal if getattr(v, knob) == value))
    return sorted(picked, key=lambda v: v.key())


def check_variants(problem, windows, heads, mask_windows, variants, scale=None):
    """Each of `variants` (launched directly, not dispatched) against float64 autograd on fresh inputs."""
    n, d, dtype = problem.n, problem.head_dim, DTYPES[problem.dtype]
    q, k, v, b, m = make_inputs(windows, heads, n, d, dtype, bias=problem.has_bias, mask_windows=mask_windows,
                                qkv_strided=True)
    scale = d ** -0.5 if scale is None else scale
    out, lse = torch.ops.fwagen.window_attention_fwd(q, k, v, b, m, scale, False)
    grad_out = torch.randn_like(out)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)] + ([b.double().requires_grad_()] if b is not None
                                                                           else [])
    window_attention_reference(*leaves[:3], leaves[3] if b is not None else None,
                               None if m is None else m.double(), scale).backward(grad_out.double())
    expected = [t.grad for t in leaves]
    eager = gradients(q, k, v, b, m, grad_out, lambda *args: window_attention_reference(*args, scale))
    for variant in variants:
        dqkv, dbias = launch_backward(variant, q, k, v, out, grad_out, lse, b, m, scale)
        got = list(dqkv.permute(2, 0, 3, 1, 4).unbind(0)) + ([dbias] if b is not None else [])
        assert_within_twice_eager(got, eager, expected, dtype, label=f"{variant.key()} ")


# The large-window kernel (window 12) fills (bias + mask) / scale, the units of q k^T, to start its score
# accumulators: scales far from head_dim ** -0.5 on each side, for the default backward of Swin-T, window 12 and
# window 24.
@pytest.mark.parametrize("scale", [0.004, 2.5])
@pytest.mark.parametrize("n, dtype", [(49, "float16"), (144, "bfloat16"), (576, "float16")])
def test_default_backward_at_scales_far_from_the_default_matches_float64_autograd(n, dtype, scale):
    problem = Problem(n, 32, dtype, True, True, "bwd")
    check_variants(problem, 16, 2, 4, [default_backward(problem)], scale=scale)


@pytest.mark.parametrize("case", TILED_CASES, ids=lambda c: c[0].key())
def test_tiled_variants_match_float64_autograd(case):
    problem, windows, heads, mask_windows = case
    variants = tiled_variants(problem)
    assert len(variants) >= 2
    check_variants(problem, windows, heads, mask_windows, variants)


# The whole-window kernel's large-window layout (bwd_mma_large.cu.j2: 97 to 144 tokens), which only tuning picks, as
# (problem, windows, heads, mask windows): blocks that walk several windows (dbias summed in registers across them),
# padded keys and rows (100, 120 tokens; 121, odd, writes its dbias partial a float at a time), head dims 8, 16, 24,
# 32 and 64, with and without bias and mask; 7, 8 and 9 warps (dK and dV by warps of 32 keys, and with an odd count a
# last warp of 16 keys of both).
LARGE_WINDOW_CASES = [
    (Problem(144, 32, "bfloat16", True, True, "bwd"), 256, 2, 4),
    (Problem(144, 32, "float16", True, False, "bwd"), 400, 2, 0),
    (Problem(100, 32, "bfloat16", False, True, "bwd"), 24, 3, 4),
    (Problem(120, 16, "float16", True, True, "bwd"), 48, 2, 8),
    (Problem(112, 64, "bfloat16", True, False, "bwd"), 300, 1, 0),
    (Problem(144, 16, "float16", False, False, "bwd"), 7, 3, 0),
    (Problem(121, 32, "bfloat16", True, True, "bwd"), 40, 2, 4),
    (Problem(137, 24, "float16", True, True, "bwd"), 30, 2, 3),
    (Problem(129, 8, "bfloat16", True, False, "bwd"), 20, 3, 0),
]


@pytest.mark.parametrize("case", LARGE_WINDOW_CASES, ids=lambda c: c[0].key())
def test_large_window_whole_window_kernel_matches_float64_autograd(case):
    problem, windows, heads, mask_windows = case
    variant = BackwardVariant(problem)
    assert variant.large_window and static_violation(variant) is None
    check_variants(problem, windows, heads, mask_windows, [variant])


def on_few_shares(variant, splits):
    """`variant` (large-window, with a mask) launched with `splits` shares of each head's windows whatever the GPU
    holds, so that each block walks several windows across mask windows (its term filled anew at each change, and
    wrapping around to its share's start) in uneven shares. Its own key, so that neither its plan nor its kernel is
    shared with the variant's."""

    class OnFewShares(BackwardVariant):
        def key(self):
            return f"{super().key()}_g{splits}"

        def grid(self, windows, heads, mask_windows, resident_blocks):
            return heads * splits, splits

    return OnFewShares(variant.problem, **variant.knobs())


# (problem, windows, heads, mask windows): bias or not, padded rows and keys (121), head dims 32 and 64.
FEW_SHARE_CASES = [
    (Problem(144, 32, "bfloat16", True, True, "bwd"), 24, 2, 4),
    (Problem(121, 32, "float16", True, True, "bwd"), 18, 1, 3),
    (Problem(144, 32, "float16", False, True, "bwd"), 20, 3, 5),
    (Problem(112, 64, "bfloat16", True, True, "bwd"), 16, 2, 2),
]


@pytest.mark.parametrize("splits", [1, 4, 7])
@pytest.mark.parametrize("case", FEW_SHARE_CASES, ids=lambda c: c[0].key())
def test_large_window_blocks_walking_across_mask_windows_match_float64_autograd(case, splits):
    problem, windows, heads, mask_windows = case
    variant = on_few_shares(BackwardVariant(problem), splits)
    assert variant.shares_mask_windows and static_violation(variant) is None
    check_variants(problem, windows, heads, mask_windows, [variant])


@pytest.mark.parametrize("n, dtype", [(49, "float16"), (144, "bfloat16"), (576, "bfloat16"), (100, "float32")])
def test_minus_inf_mask_gradients_match_float64_autograd(n, dtype):
    # -inf logits must give p = 0 and no gradient, never inf - inf = NaN, in every backward layout.
    run_case(6, 2, n, 32, DTYPES[dtype], bias=True, mask_windows=3, qkv_strided=False, token_major=False,
             mask=minus_inf_mask(3, n))


@pytest.mark.parametrize("n, dtype, mask_windows", [(49, "float16", 4), (144, "bfloat16", 4), (256, "float16", 0)])
def test_qkv_entry_gradients_match_float64_autograd_with_no_stack_of_q_k_v(n, dtype, mask_windows):
    # window_attention_qkv: the gradient of qkv is the backward's buffer itself, where q, k and v views of qkv would
    # have autograd stack three gradients (UnbindBackward): no such node may sit between the output and the leaf.
    dtype = DTYPES[dtype]
    windows, heads, d = 8, 3, 32
    _, _, _, b, m = make_inputs(windows, heads, n, d, dtype, mask_windows=mask_windows)
    qkv = torch.randn(windows, n, 3, heads, d, device="cuda").to(dtype)
    grad_out = torch.randn(windows, n, heads * d, device="cuda").to(dtype)

    def grads(qkv, b, m, fn):
        leaf, bias = qkv.detach().requires_grad_(), b.detach().requires_grad_()
        out = fn(leaf, bias, m)
        out.backward(grad_out.to(out.dtype))
        return out, list(leaf.grad.unbind(2)) + [bias.grad]

    def reference(qkv, b, m):
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        return window_attention_reference(q, k, v, b, m).transpose(1, 2).reshape(windows, n, heads * d)

    out, got = grads(qkv, b, m, lambda qkv, b, m: fwagen.window_attention_qkv(qkv, b, m, layout="bnc"))
    seen, pending = set(), [out.grad_fn]
    while pending:
        node = pending.pop()
        if node is not None and node not in seen:
            seen.add(node)
            pending += [next_node for next_node, _ in node.next_functions]
    assert not [node.name() for node in seen if "Unbind" in node.name() or "Stack" in node.name()]
    _, eager = grads(qkv, b, m, reference)
    _, expected = grads(qkv.double(), b.double(), None if m is None else m.double(), reference)
    assert_within_twice_eager(got, eager, expected, dtype)


@pytest.mark.parametrize("n", [7, 12])
def test_dbias_partials_are_summed_outer_then_inner_in_float32_bit_for_bit(n):
    # N * N odd (7): a float a thread; even (12): a float4. Partials of mixed magnitudes, so that another order of the
    # float32 adds would round differently; the output poisoned first.
    outer, heads, inner = 3, 2, 5
    magnitudes = 10.0 ** torch.randint(-3, 4, (outer, heads, inner, 1, 1), device="cuda")
    partial = torch.randn(outer, heads, inner, n, n, device="cuda") * magnitudes
    dbias = torch.full((heads, n, n), float("nan"), device="cuda")
    sum_dbias_partials(BackwardVariant(Problem(n, 32, "float16", True, True, "bwd")), partial, dbias)
    expected = partial[0, :, 0].clone()
    for o in range(outer):
        for i in range(inner):
            if (o, i) != (0, 0):
                expected = expected + partial[o, :, i]
    assert torch.equal(dbias, expected)
    in_another_order = partial.double().sum((0, 2)).float()
    assert not torch.equal(dbias, in_another_order)  # the order is what makes the bits


def test_mask_requiring_grad_is_refused():
    q, k, v, b, m = make_inputs(4, 2, 16, 32, torch.float16, mask_windows=2)
    with pytest.raises(ValueError, match="mask"):
        fwagen.window_attention(q, k, v, b, m.requires_grad_())


def test_small_backward_grid_for_sanitizer():
    """A few tiny backward launches; the device run executes this one under compute-sanitizer."""
    for dtype, n, d in (("float16", 49, 32), ("bfloat16", 9, 16), ("float16", 64, 64), ("bfloat16", 144, 32),
                        ("float32", 49, 32), ("bfloat16", 200, 16), ("float16", 300, 32)):
        run_case(4, 2, n, d, DTYPES[dtype], bias=True, mask_windows=2, qkv_strided=True, token_major=True)
    # The large-window kernel with blocks that walk three windows each across two mask windows, the term filled anew
    # between them (the calls above give a block one window).
    # Its values are checked against float64 in test_large_window_whole_window_kernel_matches_float64_autograd;
    # eager bf16 here would bring cuBLAS kernels that racecheck flags on its own.
    q, k, v, b, m = make_inputs(396, 1, 144, 32, torch.bfloat16, mask_windows=198, qkv_strided=True)
    out, lse = torch.ops.fwagen.window_attention_fwd(q, k, v, b, m, 32 ** -0.5, False)
    problem = Problem(144, 32, "bfloat16", True, True, "bwd")
    dqkv, dbias = launch_backward(BackwardVariant(problem), q, k, v, out, torch.randn_like(out), lse, b, m, 32 ** -0.5)
    assert dqkv.float().isfinite().all() and dbias.isfinite().all() and dbias.abs().sum() > 0
