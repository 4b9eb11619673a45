"""Forward kernels against the float64 reference on the GPU (marker gpu)."""
from __future__ import annotations

import math
import random
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import fwagen
from fwagen.compiler import compile_variant, device_arch
from fwagen.launch import empty_lse, launch_forward
from fwagen.problem import Problem
from fwagen.reference import log_sum_exp_reference
from fwagen.space import candidates, default_variant, resource_violation, static_violation, wgmma_variants
from fwagen.variant import (ForwardStreamVariant, ForwardWgmmaStreamTmaVariant, ForwardWgmmaStreamVariant,
                            ForwardWgmmaTmaVariant, ForwardWgmmaVariant)

from helpers import DTYPES, allowed_error, make_inputs, minus_inf_mask, reference64

pytestmark = pytest.mark.gpu

AXES = {
    "n": (1, 9, 16, 25, 49, 64, 100, 144, 256, 576, 1024),
    "d": (16, 32, 64, 128),
    "heads": (1, 3, 4, 7),
    "dtype": ("float16", "bfloat16", "float32"),
    "bias": (True, False),
    "mask": (True, False),
    "qkv_strided": (True, False),
    "token_major": (True, False),
}


def grid_sample(count=66, seed=0):
    """A seeded sample of the product in which every value of every axis appears."""
    rng = random.Random(seed)
    orders = {axis: rng.sample(values, len(values)) for axis, values in AXES.items()}
    return [{axis: orders[axis][(i + rng.randrange(len(v))) % len(v) if i >= len(v) else i]
             for axis, v in orders.items()} for i in range(count)]


def windows_for(n, d):
    """Enough windows to fill a few blocks, even so that a 2-window mask divides them."""
    return max(2, min(64, (1 << 19) // (n * d)) // 2 * 2)


def run_poisoned(variant, q, k, v, b, m, token_major=False, scale=None):
    """Launch into NaN-poisoned buffers so an unwritten element cannot pass."""
    windows, heads, n, d = q.shape
    scale = d ** -0.5 if scale is None else scale
    if token_major:
        out = torch.full((windows, n, heads * d), float("nan"), dtype=q.dtype, device=q.device)
        out_bhnd = out.view(windows, n, heads, d).transpose(1, 2)
    else:
        out = out_bhnd = torch.full_like(q, float("nan"), memory_format=torch.contiguous_format)
    lse = empty_lse(q).fill_(float("nan"))
    launch_forward(variant, q, k, v, out_bhnd, lse, b, m, scale)
    torch.cuda.synchronize()
    return out_bhnd, lse


def check(variant, q, k, v, b, m, token_major=False, scale=None):
    out, lse = run_poisoned(variant, q, k, v, b, m, token_major, scale)
    assert torch.isfinite(out).all(), f"{variant.key()}: unwritten or non-finite output"
    expected = reference64(q, k, v, b, m, scale)
    error = (out.double() - expected).abs().max().item()
    allowed = allowed_error(q, k, v, b, m, expected, scale)
    assert error <= allowed, f"{variant.key()}: error {error:.3g} > allowed {allowed:.3g}"
    lse_error = (lse.double() - log_sum_exp_reference(q, k, b, m, scale)).abs().max().item()
    assert lse_error < 1e-2, f"{variant.key()}: log-sum-exp error {lse_error:.3g}"


@pytest.mark.parametrize("case", grid_sample(), ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_default_variant_matches_float64_reference(case):
    n, d, heads = case["n"], case["d"], case["heads"]
    windows = windows_for(n, d)
    mask_windows = 2 if case["mask"] else 0
    q, k, v, b, m = make_inputs(windows, heads, n, d, DTYPES[case["dtype"]], bias=case["bias"],
                                mask_windows=mask_windows, qkv_strided=case["qkv_strided"])
    variant = default_variant(Problem(n, d, case["dtype"], case["bias"], bool(mask_windows)))
    check(variant, q, k, v, b, m, case["token_major"])


# Scales far from head_dim ** -0.5 on each side (the op accepts any positive normal float32), for the default variants
# of Swin-T, window 12 (resident bias and mask term) and window 24 (streamed).
@pytest.mark.parametrize("scale", [0.004, 2.5])
@pytest.mark.parametrize("problem", [Problem(49, 32, "float16", True, True), Problem(144, 32, "bfloat16", True, True),
                                     Problem(576, 32, "float16", True, True)], ids=lambda p: p.key())
def test_default_variant_at_scales_far_from_the_default_matches_reference(problem, scale):
    q, k, v, b, m = make_inputs(8, 2, problem.n, problem.head_dim, DTYPES[problem.dtype], mask_windows=2)
    check(default_variant(problem), q, k, v, b, m, scale=scale)


SWEPT = [Problem(49, 32, "float16", True, True), Problem(144, 32, "bfloat16", True, False),
         Problem(576, 32, "float16", True, True), Problem(100, 64, "float32", True, True)]


def runnable_variants(problem, variants=None):
    """Those of `variants` (default: every legal variant of `problem`) that are legal on this GPU and compile within
    their resource limits."""
    arch = device_arch()
    if variants is None:
        legal = candidates(problem, arch)[0]
    else:
        legal = [var for var in variants if static_violation(var, arch) is None]
    with ThreadPoolExecutor(8) as pool:
        compiled = list(pool.map(lambda var: compile_variant(var, arch), legal))
    runnable = [var for var, c in zip(legal, compiled) if resource_violation(var, c.resources) is None]
    assert runnable, "no variant survived the resource checks"
    return runnable


@pytest.mark.parametrize("problem", SWEPT, ids=lambda p: p.key())
def test_every_legal_variant_matches_reference(problem):
    runnable = runnable_variants(problem)
    q, k, v, b, m = make_inputs(7, 3, problem.n, problem.head_dim, DTYPES[problem.dtype],
                                bias=problem.has_bias, mask_windows=7 if problem.has_mask else 0, qkv_strided=True)
    for variant in runnable:
        check(variant, q, k, v, b, m, token_major=True)


# Streamed bias and mask tiles where the window sweep above does not reach: rows not 16-byte aligned (4-byte copies),
# a last key tile past N (its keys must get -inf), a padded head dim, bias or mask alone; knobs span key tiles,
# windows per block and a chunk of half the window.
STREAMED = [(Problem(250, 40, "bfloat16", True, True), (2, 64, 16, 32, 2, 1)),
            (Problem(250, 40, "bfloat16", True, True), (1, 128, 32, 64, 2, 1)),
            (Problem(257, 32, "float16", True, False), (4, 32, 16, 16, 2, 2)),
            (Problem(300, 64, "float16", False, True), (2, 64, 32, 64, 2, 1))]


@pytest.mark.parametrize("problem, knobs", STREAMED, ids=lambda x: x.key() if isinstance(x, Problem) else str(x))
def test_streamed_bias_and_mask_at_ragged_sizes_match_reference(problem, knobs):
    variant = ForwardStreamVariant(problem, *knobs)
    assert static_violation(variant, device_arch()) is None
    q, k, v, b, m = make_inputs(6, 3, problem.n, problem.head_dim, DTYPES[problem.dtype], bias=problem.has_bias,
                                mask_windows=3 if problem.has_mask else 0, qkv_strided=True)
    check(variant, q, k, v, b, m, token_major=True)


# Products by wgmma (sm_90 only; skipped elsewhere), each legal knob combination of `wgmma_variants`, also where the
# space does not offer them: window 12 (three 64-row chunks for 144 tokens, the last one 48 rows of padding), a ragged
# window with a padded head dim (200 tokens, d 24: a last key tile past N, zero-filled columns in the swizzled tiles)
# and window 16 with the mask alone (streamed and resident). Window 24 is in SWEPT.
WGMMA_PROBLEMS = [Problem(144, 32, "bfloat16", True, True), Problem(200, 24, "float16", True, False),
                  Problem(256, 32, "bfloat16", False, True)]


@pytest.mark.parametrize("problem", WGMMA_PROBLEMS, ids=lambda p: p.key())
def test_wgmma_variants_match_reference(problem):
    if device_arch() != "sm_90":
        pytest.skip("wgmma variants are legal on sm_90 only")
    runnable = runnable_variants(problem, wgmma_variants(problem))
    assert len(runnable) >= 8, "too few wgmma variants survived the static and resource checks"
    q, k, v, b, m = make_inputs(7, 3, problem.n, problem.head_dim, DTYPES[problem.dtype], bias=problem.has_bias,
                                mask_windows=7 if problem.has_mask else 0, qkv_strided=True)
    for variant in runnable:
        check(variant, q, k, v, b, m, token_major=True)


@pytest.mark.parametrize("problem", WGMMA_PROBLEMS[:2], ids=lambda p: p.key())
def test_tma_variants_read_separate_head_major_tensors(problem):
    # The TMA kinds read K and V through tensor maps of each tensor's own strides: here (windows, heads, N, d) tensors
    # of their own, where the test above reads views into one token-major qkv buffer.
    if device_arch() != "sm_90":
        pytest.skip("wgmma variants are legal on sm_90 only")
    runnable = runnable_variants(problem, [v for v in wgmma_variants(problem) if v.tensor_maps])
    q, k, v, b, m = make_inputs(5, 2, problem.n, problem.head_dim, DTYPES[problem.dtype], bias=problem.has_bias,
                                mask_windows=5 if problem.has_mask else 0, qkv_strided=False)
    for variant in runnable[:: max(1, len(runnable) // 6)]:
        check(variant, q, k, v, b, m)


def on_few_blocks(variant, blocks):
    """`variant` (streamed) launched on `blocks` blocks whatever the GPU holds, so that each block walks several
    (owner, window group) items of uneven shares, from one head, mask window or query chunk into the next. Its own
    key, so that neither its plan nor its kernel is shared with the variant's."""

    class OnFewBlocks(ForwardStreamVariant):
        def key(self):
            return f"{super().key()}_g{blocks}"

        def grid(self, windows, heads, mask_windows, resident_blocks):
            return super().grid(windows, heads, mask_windows, blocks)

    return OnFewBlocks(variant.problem, **variant.knobs())


# (problem, knobs, windows): STREAMED[0] with 3 mask windows and two windows a group at 6 windows (one whole group a
# mask window) and at 9 (two groups, the last half empty); STREAMED[2], no mask, four windows a group (two groups, the
# last half empty).
FEW_BLOCK_CASES = [(*STREAMED[0], 6), (*STREAMED[0], 9), (*STREAMED[2], 6)]


@pytest.mark.parametrize("blocks", [1, 5, 7])
@pytest.mark.parametrize("problem, knobs, windows", FEW_BLOCK_CASES,
                         ids=lambda x: x.key() if isinstance(x, Problem) else str(x))
def test_streamed_blocks_walking_many_owners_match_reference(problem, knobs, windows, blocks):
    variant = on_few_blocks(ForwardStreamVariant(problem, *knobs), blocks)
    mask_windows = 3 if problem.has_mask else 0
    q, k, v, b, m = make_inputs(windows, 3, problem.n, problem.head_dim, DTYPES[problem.dtype], bias=problem.has_bias,
                                mask_windows=mask_windows, qkv_strided=True)
    grid_blocks, _ = variant.grid(windows, 3, mask_windows, 10**6)
    assert grid_blocks == blocks  # far fewer than the units: 3 heads x 3 mask windows (or 1) x chunks x groups
    check(variant, q, k, v, b, m, token_major=True)


@pytest.mark.parametrize("n, dtype", [(49, "float16"), (144, "bfloat16"), (576, "float16"), (100, "float32")])
def test_minus_inf_mask_over_leading_key_tiles_matches_reference(n, dtype):
    # A row whose first key tiles are all -inf must give the softmax of its later keys, not NaN: the online
    # softmax has seen no finite logit there yet. Every legal variant, since each splits the keys differently.
    q, k, v, b, _ = make_inputs(6, 2, n, 32, DTYPES[dtype])
    m = minus_inf_mask(3, n)
    for variant in runnable_variants(Problem(n, 32, dtype, True, True)):
        check(variant, q, k, v, b, m)


# The online softmax over key tiles whose maxima rise steeply along the keys (a new maximum, and so a rescaling of O,
# at every tile), rise by 7.8 (log2 units) after the first 48 keys, and fall (the first tile's maximum throughout), in
# fp16; variants of three key tiles or more. (A lazily moved maximum, rescaling only past a slack of 8, was measured
# and dropped: bench/results/nvidia-h100-80gb-hbm3-forward-lazy-rescale.md.)
RISING_AND_FALLING_BIASES = {"rising": lambda key: 0.4 * key,
                             "edge": lambda key: 7.8 * math.log(2) * (key >= 48),
                             "falling": lambda key: -0.4 * key}


@pytest.mark.parametrize("n", [144, 576])
@pytest.mark.parametrize("profile", list(RISING_AND_FALLING_BIASES))
def test_online_softmax_over_rising_and_falling_logits_matches_reference(n, profile):
    problem = Problem(n, 32, "float16", True, False)
    arch = device_arch()
    many_tiles = [var for var in candidates(problem, arch)[0] if var.key_tiles >= 3]
    sample = many_tiles[::max(1, len(many_tiles) // 12)] + [default_variant(problem)]
    variants = [var for var in sample if resource_violation(var, compile_variant(var, arch).resources) is None]
    assert len(variants) >= 6, "too few variants of three key tiles or more survived the resource checks"
    q, k, v, b, _ = make_inputs(6, 2, n, 32, torch.float16)
    b += RISING_AND_FALLING_BIASES[profile](torch.arange(n, device=b.device, dtype=torch.float32))
    for variant in variants:
        check(variant, q, k, v, b, None)


def test_op_matches_reference_and_takes_qkv_views_in_place():
    windows, heads, n, d = 128, 3, 49, 32
    q, k, v, b, m = make_inputs(windows, heads, n, d, torch.float16, mask_windows=64, qkv_strided=True)
    out = fwagen.window_attention(q, k, v, b, m, layout="bnc")
    expected = reference64(q, k, v, b, m).transpose(1, 2).reshape(windows, n, heads * d)
    assert out.shape == (windows, n, heads * d)
    assert (out.double() - expected).abs().max().item() <= allowed_error(q, k, v, b, m, reference64(q, k, v, b, m))


def test_mask_applies_per_window_not_per_batch():
    windows, heads, n, d = 8, 2, 16, 32
    q, k, v, b, _ = make_inputs(windows, heads, n, d, torch.float16)
    m = torch.zeros(4, n, n, device="cuda")
    m[1, :, n // 2:] = -100.0  # only window 1 of each image masks its second half
    out = fwagen.window_attention(q, k, v, b, m)
    expected = reference64(q, k, v, b, m)
    assert (out.double() - expected).abs().max().item() <= allowed_error(q, k, v, b, m, expected)
    unmasked = reference64(q, k, v, b, None)
    assert (out[1].double() - unmasked[1]).abs().max() > 1e-2  # window 1 really is masked
    assert (out[5].double() - unmasked[5]).abs().max() > 1e-2  # and so is window 1 of the second image


def test_batch_change_does_not_recompile():
    from fwagen import compiler

    q, k, v, b, m = make_inputs(64, 3, 49, 32, torch.float16, mask_windows=16)
    fwagen.window_attention(q, k, v, b, m)
    loaded = len(compiler._loaded)
    for windows in (16, 48, 256):
        q, k, v, b, m = make_inputs(windows, 3, 49, 32, torch.float16, mask_windows=16)
        fwagen.window_attention(q, k, v, b, m)
    assert len(compiler._loaded) == loaded


def test_launch_is_capturable_in_a_cuda_graph():
    q, k, v, b, m = make_inputs(64, 3, 49, 32, torch.bfloat16, mask_windows=16)
    fwagen.window_attention(q, k, v, b, m)  # compile and load outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fwagen.window_attention(q, k, v, b, m)
    q2, k2, v2, _, _ = make_inputs(64, 3, 49, 32, torch.bfloat16)
    q.copy_(q2), k.copy_(k2), v.copy_(v2)
    graph.replay()
    torch.cuda.synchronize()
    expected = reference64(q, k, v, b, m)
    assert (out.double() - expected).abs().max().item() <= allowed_error(q, k, v, b, m, expected)


SANITIZED_WGMMA = (2, 128, 32, 64, 2, 1)  # two windows a block, 32 rows a warp, resident term


def test_small_grid_for_sanitizer():
    """A few tiny launches; the device run executes this one under compute-sanitizer."""
    for dtype, n, d in (("float16", 49, 32), ("bfloat16", 9, 16), ("float32", 25, 64), ("float16", 100, 128),
                        ("bfloat16", 144, 32)):
        q, k, v, b, m = make_inputs(4, 2, n, d, DTYPES[dtype], mask_windows=2, qkv_strided=True)
        check(default_variant(Problem(n, d, dtype, True, True)), q, k, v, b, m, token_major=True)
    problem, knobs = STREAMED[0]  # the streamed bias and mask, 4-byte copies and a ragged last key tile
    q, k, v, b, m = make_inputs(2, 2, problem.n, problem.head_dim, DTYPES[problem.dtype], mask_windows=2,
                                qkv_strided=True)
    check(ForwardStreamVariant(problem, *knobs), q, k, v, b, m, token_major=True)
    check(on_few_blocks(ForwardStreamVariant(problem, *knobs), 3), q, k, v, b, m)  # blocks walking several items
    if device_arch() == "sm_90":  # wgmma: swizzled K and V tiles, a ragged window and padded head dim, both terms
        problem = Problem(200, 24, "bfloat16", True, True)
        q, k, v, b, m = make_inputs(3, 2, problem.n, problem.head_dim, torch.bfloat16, mask_windows=3, qkv_strided=True)
        check(ForwardWgmmaVariant(problem, *SANITIZED_WGMMA), q, k, v, b, m, token_major=True)
        check(ForwardWgmmaStreamVariant(problem, 1, 64, 16, 32, 2, 2), q, k, v, b, m, token_major=True)
        # K and V by TMA: a stage's mbarrier, windows past the last (two a block over three) read as zeros
        check(ForwardWgmmaTmaVariant(problem, *SANITIZED_WGMMA), q, k, v, b, m, token_major=True)
        check(ForwardWgmmaStreamTmaVariant(problem, 2, 64, 16, 32, 2, 1), q, k, v, b, m, token_major=True)
