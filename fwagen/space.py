"""The legal variants of a problem, their static constraints, and the built-in default.

Static constraints are checked before anything compiles; `static_violation` says why a variant is out.
Compiled resources (spills, registers x threads) are checked afterwards by `resource_violation`.
"""
from __future__ import annotations

import itertools

from .compiler import Resources, compile_variant
from .problem import Problem, pad_to
from .variant import (DEFAULT_MAX_SMEM, MAX_SMEM_PER_BLOCK, BackwardSimtVariant, BackwardTileVariant, BackwardVariant,
                      ForwardStreamVariant, ForwardVariant, ForwardWgmmaStreamTmaVariant, ForwardWgmmaStreamVariant,
                      ForwardWgmmaTmaVariant, ForwardWgmmaVariant, SimtVariant, Variant)

MAX_THREADS = 512
# The whole-window backward holds one warp per 16 query rows. Past 96 tokens a lane keeps n_pad / 2 dbias sums, the dQ
# accumulator (head_dim_pad / 2) and its rows' q fragments (head_dim_pad / 4) in registers beside the products of one
# key tile: past this budget ptxas spills (bwd_mma_large.cu.j2; measured with ptxas -v).
MAX_BACKWARD_WINDOW = 144
MAX_BACKWARD_ROW_REGISTERS = 176
# Score and output accumulators live in registers: MT * (KT + DP) / 2 floats per thread. Past this bound
# the compiler spills for every configuration we tried, so such variants are not worth compiling.
MAX_ACCUMULATOR_COLUMNS = 320
REGISTERS_PER_SM = 65536


def max_smem(arch: str) -> int:
    return MAX_SMEM_PER_BLOCK.get(arch, DEFAULT_MAX_SMEM)


def _min_blocks_violation(variant: Variant, arch: str) -> str | None:
    """Whether `min_blocks` blocks of the variant fit one SM's registers (at 32 a thread) and shared memory."""
    if variant.min_blocks * variant.threads * 32 > REGISTERS_PER_SM:
        return f"{variant.min_blocks} blocks of {variant.threads} threads leave under 32 registers a thread"
    if variant.min_blocks * variant.smem_bytes > max_smem(arch):
        return f"{variant.min_blocks} blocks of {variant.smem_bytes} B shared memory do not fit one SM"
    return None


def static_violation(variant: Variant, arch: str = "sm_90") -> str | None:
    """None if the variant may be compiled, else the reason it may not."""
    if isinstance(variant, BackwardVariant) and variant.n_pad > MAX_BACKWARD_WINDOW:
        return (f"tensor-core backward kernels cover windows of up to {MAX_BACKWARD_WINDOW} tokens "
                "(the tiled kernel runs past that)")
    if variant.smem_bytes > max_smem(arch):
        return f"shared memory {variant.smem_bytes} B > {max_smem(arch)} B on {arch}"
    if variant.threads > MAX_THREADS or variant.threads % 32:
        return f"threads {variant.threads} not a multiple of 32 up to {MAX_THREADS}"
    if isinstance(variant, BackwardVariant):
        if not variant.large_window and 3 * variant.n_pad + variant.head_dim_pad > MAX_ACCUMULATOR_COLUMNS:
            return "P, dS and dbias accumulators exceed the register budget"
        if variant.large_window and variant.stages != 1:
            return "the large-window layout has one stage (the next window's k and v load during dK and dV)"
        if variant.large_window and variant.n_pad // 2 + variant.head_dim_pad > MAX_BACKWARD_ROW_REGISTERS:
            return "a lane's dbias sums, dQ accumulator and q and dO fragments exceed the register budget"
        return _min_blocks_violation(variant, arch)
    if isinstance(variant, BackwardTileVariant):
        if max(variant.own_rows, variant.tile_rows) > pad_to(variant.n_pad, 32):
            return "own_rows or tile_rows larger than the window"
        if variant.tile_rows + variant.head_dim_pad > MAX_ACCUMULATOR_COLUMNS:
            return "score and gradient accumulators exceed the register budget"
        return _min_blocks_violation(variant, arch)
    if isinstance(variant, BackwardSimtVariant):
        if variant.cols_per_thread > 32:
            return "more than 32 head-dim columns per thread"
        if variant.own_rows > max(pad_to(variant.problem.n, 16), 32 // variant.threads_per_row):
            return "own_rows larger than the window (beyond the one warp a block needs)"
        return None
    if isinstance(variant, SimtVariant):
        if variant.problem.head_dim % variant.threads_per_row:
            return "threads_per_row does not divide head_dim"
        if variant.cols_per_thread > 32:
            return "more than 32 head-dim columns per thread"
        return None
    reason = _min_blocks_violation(variant, arch) or (_wgmma_violation(variant, arch) if variant.wgmma else None)
    if reason is not None:
        return reason
    if variant.stream_add and not (variant.problem.has_bias or variant.problem.has_mask):
        return "a streamed (bias + mask) term needs a bias or a mask to stream"
    if variant.stream_add and variant.key_tiles < 3:
        return "a streamed (bias + mask) term needs three key tiles or more (its copies advance from the first)"
    if variant.query_chunk % variant.rows_per_warp:
        return "query_chunk not a multiple of rows_per_warp"
    if variant.query_chunk > pad_to(variant.n_pad, variant.rows_per_warp):
        return "query_chunk larger than the padded window"
    if variant.key_tile > variant.n_pad or variant.key_tile % 16:
        return "key_tile not a multiple of 16 up to the padded window"
    if variant.m_tiles_per_warp * (variant.key_tile + variant.head_dim_pad) > MAX_ACCUMULATOR_COLUMNS:
        return "accumulators exceed the register budget"
    return None


WGMMA_ARCH = "sm_90"  # wgmma exists on sm_90a; later architectures have other warpgroup instructions
WGMMA_HEAD_DIM_PAD = 32  # the 64-byte swizzle of wgmma.cuh: rows of 32 16-bit elements


def _wgmma_violation(variant: ForwardVariant, arch: str) -> str | None:
    if arch != WGMMA_ARCH:
        return f"wgmma runs on {WGMMA_ARCH} only"
    if variant.head_dim_pad != WGMMA_HEAD_DIM_PAD:
        return f"wgmma tiles hold head dims of 17 to {WGMMA_HEAD_DIM_PAD}"
    if variant.warps_per_item % 4:
        return "wgmma needs whole warpgroups (four warps of rows_per_warp rows to a query chunk)"
    return None


# ptxas at -O3 often parks a few loop-invariant values (strides, pointers) in local memory, which costs
# nothing measurable; real spills of accumulators run to hundreds of bytes.
MAX_SPILL_BYTES = 128


def resource_violation(variant: Variant, resources: Resources) -> str | None:
    if resources.spill_bytes > MAX_SPILL_BYTES:
        return f"spills {resources.spill_bytes} B"
    if resources.registers * variant.threads > REGISTERS_PER_SM:
        return f"{resources.registers} registers x {variant.threads} threads exceed one SM"
    return None


STREAM_ADD_FROM = 256  # padded window size from which the forward space also streams the (bias + mask) term
# Padded window size from which the forward space also has wgmma variants: at window 12 (144 tokens in three 64-row
# chunks, 48 rows of padding) the best of them took 1.26-1.38x the mma.sync pick, at windows 16 and 24 0.93-0.95x
# without the mask (H100, bench/wgmma_forward.py; bench/results/nvidia-h100-80gb-hbm3-forward-wgmma.md).
WGMMA_FROM = 256


def _offers_streamed(problem: Problem, n_pad: int) -> bool:
    """Whether the forward space (and the default) has streamed variants for `problem`: a term to stream, and
    enough keys that keeping it resident costs real shared memory."""
    return n_pad >= STREAM_ADD_FROM and (problem.has_bias or problem.has_mask)


def _mma_candidates(problem: Problem):
    n_pad = pad_to(problem.n, 16)
    # A third of the window where that is whole m tiles (48 of 144 tokens at window 12): three equal query
    # chunks and key tiles, where powers of two leave a padded remainder.
    thirds = {n_pad // 3} if n_pad % 48 == 0 else set()
    chunks = sorted({16, 32, 64, 128, 256, n_pad} | thirds)
    # A whole-window key tile keeps K and V resident; past 256 keys it only costs registers.
    tiles = sorted({16, 32, 64, 128} | ({n_pad} if n_pad <= 256 else set()) | {t for t in thirds if t <= 128})
    for wpb, rpw, qc, kt, st, mb in itertools.product((1, 2, 4), (16, 32), chunks, tiles, (1, 2), (1, 4, 6)):
        yield ForwardVariant(problem, windows_per_block=wpb, query_chunk=qc, rows_per_warp=rpw,
                             key_tile=kt, stages=st, min_blocks=mb)
    # From 256 tokens the resident term of a 64-row chunk takes 64 KB and more of shared memory: there, the same
    # knobs with the term streamed beside K and V, two stages, and the block counts the freed memory allows.
    if _offers_streamed(problem, n_pad):
        for wpb, rpw, qc, kt, mb in itertools.product((1, 2, 4), (16, 32), chunks, (16, 32, 64), (1, 2, 3)):
            yield ForwardStreamVariant(problem, windows_per_block=wpb, query_chunk=qc, rows_per_warp=rpw,
                                       key_tile=kt, stages=2, min_blocks=mb)


def wgmma_variants(problem: Problem):
    """The forward kernels with their products by wgmma (legal on sm_90, head dims up to 32; `_wgmma_violation`) at
    any window size: whole warpgroups, so query chunks of 64 rows (16 a warp) and 128 (16 or 32 a warp). The space
    offers them from WGMMA_FROM tokens."""
    n_pad = pad_to(problem.n, 16)
    tiles = (32, 64, 128)
    shapes = ((64, 16), (128, 16), (128, 32))  # (query_chunk, rows_per_warp)
    for cls in (ForwardWgmmaVariant, ForwardWgmmaTmaVariant):
        for wpb, (qc, rpw), kt, st, mb in itertools.product((1, 2), shapes, tiles, (1, 2), (1, 2)):
            yield cls(problem, windows_per_block=wpb, query_chunk=qc, rows_per_warp=rpw, key_tile=kt, stages=st,
                      min_blocks=mb)
    if _offers_streamed(problem, n_pad):
        for cls in (ForwardWgmmaStreamVariant, ForwardWgmmaStreamTmaVariant):
            for wpb, (qc, rpw), kt, mb in itertools.product((1, 2), shapes, (32, 64), (1, 2, 3)):
                yield cls(problem, windows_per_block=wpb, query_chunk=qc, rows_per_warp=rpw, key_tile=kt, stages=2,
                          min_blocks=mb)


def _simt_candidates(problem: Problem):
    for qc, tpr, kt in itertools.product((16, 32, 64, 128), (1, 2, 4, 8), (16, 32, 64)):
        yield SimtVariant(problem, query_chunk=qc, threads_per_row=tpr, key_tile=kt)


def _partition(variants, arch: str) -> tuple[list[Variant], dict[str, str]]:
    """(legal variants, {key: reason} for those pruned statically)."""
    legal, pruned = [], {}
    for variant in variants:
        reason = static_violation(variant, arch)
        if reason is None:
            legal.append(variant)
        else:
            pruned[variant.key()] = reason
    return legal, pruned


def candidates(problem: Problem, arch: str = "sm_90") -> tuple[list[Variant], dict[str, str]]:
    """All forward variants of `problem`: (legal ones, {key: reason} for those pruned statically)."""
    if not problem.uses_tensor_cores:
        return _partition(_simt_candidates(problem), arch)
    wgmma = wgmma_variants(problem) if pad_to(problem.n, 16) >= WGMMA_FROM else ()
    return _partition(itertools.chain(_mma_candidates(problem), wgmma), arch)


# Built-in defaults, most preferred first, as (windows_per_block, query_chunk, rows_per_warp, key_tile, stages);
# None stands for the padded window. Ordered from sweeps of every legal variant on an H200
# (bench/results/*-sweep.json); the first one legal on the target architecture is used.
_DEFAULT_PREFERENCE = {
    64: [(1, 64, 16, None, 2), (1, 32, 16, None, 1)],
    128: [(1, None, 16, None, 2), (1, 64, 16, None, 2), (1, 32, 16, None, 2)],
    # Windows of 129-144 tokens: thirds of the window (H100, window 12: 0.251 ms against 0.324 for the whole
    # window; bench/results/forward-window12-thirds.md).
    144: [(1, 48, 16, 48, 2)],
    1024: [(4, 64, 16, 32, 2), (2, 64, 16, 64, 2), (4, 64, 16, 64, 1), (1, 64, 16, 64, 2), (1, 32, 16, 64, 2), (1, 16, 16, 64, 2),
           (1, 16, 16, 32, 2), (1, 16, 16, 16, 1)],
}

# Ahead of those from STREAM_ADD_FROM tokens with a bias or mask: the streamed variant (windows_per_block,
# query_chunk, rows_per_warp, key_tile, stages, min_blocks) that came within 11% of the best of the H200 classes at
# N 576 and within 8-28% at N 256, where the resident preference above took 1.18-1.61x and 1.30-1.58x the best
# (bench/results/nvidia-h200-tune-forward-stream.md).
_STREAM_DEFAULT = (2, 64, 32, 32, 2, 2)


def _default_preference(problem: Problem, n_pad: int):
    """The built-in defaults of `problem`, most preferred first, as variants (some may be illegal on an arch)."""
    if _offers_streamed(problem, n_pad):
        yield ForwardStreamVariant(problem, *_STREAM_DEFAULT)
    preference = [entry for limit, entries in sorted(_DEFAULT_PREFERENCE.items()) if n_pad <= limit
                  for entry in entries] + _DEFAULT_PREFERENCE[1024]
    for wpb, chunk, rows, tile, stages in preference:
        chunk = chunk or n_pad
        yield ForwardVariant(problem, windows_per_block=wpb, query_chunk=min(chunk, pad_to(n_pad, rows)),
                             rows_per_warp=rows, key_tile=min(tile or n_pad, n_pad), stages=stages)


def default_variant(problem: Problem, arch: str = "sm_90") -> Variant:
    """The untuned choice: legal on `arch` and compiled there without spills (ptxas may spill a preference
    on one architecture or dtype and not another; the next preference is taken), the baseline that tuned
    winners are measured against."""
    if not problem.uses_tensor_cores:
        return SimtVariant(problem, query_chunk=64, threads_per_row=4, key_tile=32)
    for variant in _default_preference(problem, pad_to(problem.n, 16)):
        if static_violation(variant, arch) is None:
            resources = compile_variant(variant, arch).resources
            if resources.spill_bytes == 0 and resource_violation(variant, resources) is None:
                return variant
    raise AssertionError(f"no default variant is legal for {problem.key()} on {arch}")


def _backward_simt_candidates(problem: Problem):
    for chunk, tpr, tile in itertools.product((16, 32, 64, 128), (1, 2, 4, 8), (16, 32, 64)):
        yield BackwardSimtVariant(problem, own_rows=chunk, threads_per_row=tpr, tile_rows=tile)


def _backward_tensor_core_candidates(problem: Problem):
    for stages, min_blocks in itertools.product((1, 2), (1, 2, 3, 4)):
        yield BackwardVariant(problem, stages=stages, min_blocks=min_blocks)
    # 48 rows: windows of 12 (144 tokens) without padding, and fewer, larger steps at 24 (576 tokens).
    for own, tile, wpb, min_blocks in itertools.product((32, 48, 64, 128), (32, 48, 64), (1, 2, 4), (1, 2, 3, 4)):
        yield BackwardTileVariant(problem, own_rows=own, tile_rows=tile, windows_per_block=wpb, min_blocks=min_blocks)


def backward_candidates(problem: Problem, arch: str = "sm_90") -> tuple[list[Variant], dict[str, str]]:
    """All backward variants of `problem`: (legal ones, {key: reason} for the pruned). Tensor-core variants where
    one is legal (float16/bfloat16: whole-window up to 144 tokens, tiled at any size), else the CUDA-core ones
    (float32, and whatever the tensor-core kernels cannot hold)."""
    pruned = {}
    if problem.uses_tensor_cores:
        legal, pruned = _partition(_backward_tensor_core_candidates(problem), arch)
        if legal:
            return legal, pruned
    legal, simt_pruned = _partition(_backward_simt_candidates(problem), arch)
    return legal, {**pruned, **simt_pruned}


# CUDA-core backward defaults, most preferred first, as (own_rows, tile_rows); threads_per_row keeps 16 head-dim
# columns a thread (four such arrays live in registers in the dK/dV blocks). Chosen unmeasured: a starting point
# the tuner replaces; the smaller ones fit architectures with less shared memory.
_SIMT_BACKWARD_PREFERENCE = ((64, 32), (32, 32), (32, 16), (16, 16))


# Tiled tensor-core backward defaults, most preferred first, as (own_rows, tile_rows, windows_per_block, min_blocks).
# On an H100 (bench/variants_backward.py, bf16, no mask / mask, backward kernel alone): the first ran windows 16 and
# 24 in 1.13/1.25 and 2.50-2.54/2.83-2.86 ms, the second window 12 in 0.85/0.92 (o32_n32_w2_b2: 0.97/1.10) and window
# 24 in 2.59-2.64/2.88-2.92; (32, 32, 2, 2), next (0.97/1.10 at window 12), fits an A100's shared memory.
_TILE_BACKWARD_PREFERENCE = ((64, 32, 4, 1), (48, 48, 4, 1), (32, 32, 2, 2), (32, 64, 4, 1), (64, 32, 2, 1),
                             (32, 32, 1, 4))


def _tile_preference(problem: Problem) -> list[BackwardTileVariant]:
    """_TILE_BACKWARD_PREFERENCE with the variants that pad the window's rows least first (at 144 tokens, 64-row
    chunks compute 192 rows, 32-row ones 160 and 48-row ones 144), otherwise in the listed order."""
    variants = [BackwardTileVariant(problem, own_rows=own, tile_rows=tile, windows_per_block=wpb, min_blocks=blocks)
                for own, tile, wpb, blocks in _TILE_BACKWARD_PREFERENCE]
    return sorted(variants, key=lambda v: v.chunks_per_item * v.own_rows - problem.n)  # stable: listed order next


# The large-window whole-window backward is the default up to this head dim (measured at 32, on an H100 and an H200;
# narrower heads hold fewer registers); wider ones (64 fits up to 128 tokens) spill more and are left to the tiled
# kernel unless tuning picks it.
LARGE_WINDOW_DEFAULT_HEAD_DIM = 32


def default_backward(problem: Problem, arch: str = "sm_90") -> Variant | None:
    """The untuned backward kernel for `problem`: compiled on `arch` without spills (the large-window layout: within
    the tuner's allowance); None where none is legal (the op then differentiates the PyTorch reference)."""
    legal, _ = backward_candidates(problem, arch)
    whole_window = [v for v in legal if isinstance(v, BackwardVariant)]
    if whole_window and not whole_window[0].large_window:
        # One stage, registers capped for three blocks per SM, measured fastest on an H200 for windows of 7 and 8
        # (bench/sweep_backward.py); the next legal choices follow.
        return min(whole_window, key=lambda v: (v.stages, abs(v.min_blocks - 3)))
    if whole_window and problem.head_dim <= LARGE_WINDOW_DEFAULT_HEAD_DIM:
        # Past 96 tokens, the large-window layout (its one legal variant) ran window 12 in 0.48/0.52 ms against
        # 0.85/0.93 for the tiled default (H100, bf16, no mask/mask, bench/variants_backward.py; the same on an H200). It parks a few
        # loop-invariant values in local memory (28 B at 144 tokens with a bias), which resource_violation allows.
        variant = whole_window[0]
        if resource_violation(variant, compile_variant(variant, arch).resources) is None:
            return variant
    tiled = [v for v in legal if isinstance(v, BackwardTileVariant)]
    cuda_core = [v for v in legal if isinstance(v, BackwardSimtVariant)]
    tpr = max(1, problem.head_dim // 16)
    return (_first_compiling_cleanly(_tile_preference(problem), tiled, arch)
            or _first_compiling_cleanly(sorted(whole_window, key=lambda v: (v.stages, abs(v.min_blocks - 3))),
                                        whole_window, arch)
            or _first_compiling_cleanly([BackwardSimtVariant(problem, own_rows=own, threads_per_row=tpr, tile_rows=tile)
                                         for own, tile in _SIMT_BACKWARD_PREFERENCE], cuda_core, arch))


def _first_compiling_cleanly(preferred: list[Variant], legal: list[Variant], arch: str) -> Variant | None:
    """The first of `preferred` that is legal, else of the rest of `legal`, that compiles on `arch` without spills
    and within one SM's registers."""
    for variant in [v for v in preferred if v in legal] + [v for v in legal if v not in preferred]:
        resources = compile_variant(variant, arch).resources
        if resources.spill_bytes == 0 and resource_violation(variant, resources) is None:
            return variant
    return None
