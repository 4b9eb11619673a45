"""Launch grids of the split backward kernels (dQ blocks over splits of the windows, then dK/dV blocks), of the
whole-window backward, and of the forward's streamed kind.

The kernels rely on these invariants: every split has at least one window (its first window writes the split's
dbias partial instead of adding to it, so an empty split would leave the partial unwritten), the partial sums stay
within their memory budget, and the block count is what the kernel's index arithmetic expects.
"""
from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import pytest

from fwagen.problem import Problem
from fwagen.variant import (DBIAS_PARTIAL_BUDGET_BYTES, TILE_DBIAS_PARTIAL_BYTES, BackwardSimtVariant,
                            BackwardTileVariant, BackwardVariant, ForwardStreamVariant, choose_splits,
                            choose_tile_splits)

# (windows, heads, mask windows): the bench's Swin shapes and small odd ones.
CALLS = [(8192, 3, 64), (2048, 4, 64), (1024, 4, 64), (256, 8, 16), (128, 24, 0), (5, 2, 0), (12, 2, 4), (3, 7, 1)]
RESIDENT = (1, 132, 264, 1056)


def tile_variants(n, has_bias):
    problem = Problem(n, 32, "bfloat16", has_bias, True, "bwd")
    return [BackwardTileVariant(problem, own_rows=own, tile_rows=32, windows_per_block=wpb)
            for own, wpb in itertools.product((32, 48, 64), (1, 2, 4))]


@pytest.mark.parametrize("n", [49, 144, 256, 576, 1024])
def test_tiled_grid_gives_every_split_a_window_and_bounds_the_partial_sums(n):
    for variant, (windows, heads, mask_windows), resident in itertools.product(tile_variants(n, True), CALLS, RESIDENT):
        blocks, splits = variant.grid(windows, heads, mask_windows, resident)
        images = windows // max(mask_windows, 1)
        owners = heads * variant.chunks_per_item
        assert 1 <= splits <= images
        assert splits == 1 or splits * heads * n * n * 4 <= TILE_DBIAS_PARTIAL_BYTES <= DBIAS_PARTIAL_BUDGET_BYTES
        groups = -(-images // variant.windows_per_block)
        assert blocks == owners * splits + owners * max(mask_windows, 1) * groups
        assert variant.dbias_partials(heads, mask_windows, splits) == (splits, heads, 1, n, n)


def test_tiled_grid_without_bias_has_no_partials_and_no_partial_budget():
    for variant, (windows, heads, mask_windows) in itertools.product(tile_variants(576, False), CALLS):
        blocks, splits = variant.grid(windows, heads, mask_windows, 264)
        images = windows // max(mask_windows, 1)
        assert 1 <= splits <= images
        assert variant.dbias_partials(heads, mask_windows, splits) == (0,)
        owners = heads * variant.chunks_per_item  # no partial sums: the split rule is not held to their budget
        assert splits == choose_tile_splits(owners, images, max(mask_windows, 1), variant.windows_per_block, 264,
                                            images)


def test_cuda_core_grid_gives_every_split_a_window_and_bounds_the_partial_sums():
    for n, (windows, heads, mask_windows), resident in itertools.product((49, 576, 1024), CALLS, RESIDENT):
        variant = BackwardSimtVariant(Problem(n, 32, "float32", True, mask_windows > 0, "bwd"))
        blocks, splits = variant.grid(windows, heads, mask_windows, resident)
        assert 1 <= splits <= windows
        assert splits == 1 or splits * heads * n * n * 4 <= DBIAS_PARTIAL_BUDGET_BYTES
        owners = heads * variant.chunks_per_item
        assert blocks == owners * splits + windows * owners


def test_whole_window_grid_is_at_most_one_wave_of_head_and_mask_window_pairs():
    # bwd_mma.cu.j2 and bwd_mma_large.cu.j2 without a mask: block i holds pair i / splits (head, mask window) and walks
    # every splits-th of its windows, summing its dbias partial in one place; a second, nearly empty wave would cost a
    # whole wave's time, so splits round down (a pair has one block even where pairs outnumber what the GPU holds).
    for n, (windows, heads, mask_windows), resident in itertools.product((64, 144), CALLS, RESIDENT):
        variant = BackwardVariant(Problem(n, 32, "bfloat16", True, mask_windows > 0, "bwd"))
        if variant.shares_mask_windows:
            continue
        blocks, splits = variant.grid(windows, heads, mask_windows, resident)
        pairs = heads * max(mask_windows, 1)
        assert blocks == pairs * splits and 1 <= splits <= max(windows // max(mask_windows, 1), 1)
        assert blocks <= max(resident, pairs)
        assert variant.dbias_partials(heads, mask_windows, splits) == (max(mask_windows, 1), heads, splits, n, n)


def mask_window_share(split, splits, windows, mask_windows):
    """The windows block `split` of a head walks, in its order: MaskWindowShare (mma_tiles.cuh) step by step."""
    first, end = windows * split // splits, windows * (split + 1) // splits
    steps, images = end - first, windows // mask_windows
    to_next_mask_window = (images - first % images) % images
    start = first + (to_next_mask_window if to_next_mask_window < steps else 0)
    positions = [start + step if start + step < end else start + step - steps for step in range(steps)]
    return [at % images * mask_windows + at // images for at in positions]


def test_large_window_grid_with_a_mask_shares_each_heads_windows_evenly_and_in_step():
    # bwd_mma_large.cu.j2 with a mask: block i walks share i % splits of head i / splits's windows, across mask
    # windows. Every window in exactly one share, shares within one window of each other, the mask window changing at
    # most once a mask window's images plus once at the wrap; and a share starting at a mask window's first image where
    # one starts in it, so that blocks walk images in step.
    variant = BackwardVariant(Problem(144, 32, "float16", True, True, "bwd"))
    assert variant.shares_mask_windows
    for (windows, heads, mask_windows), resident in itertools.product(
            [c for c in CALLS if c[2] > 0] + [(2048, 4, 64), (396, 1, 198), (40, 3, 8)], RESIDENT):
        blocks, splits = variant.grid(windows, heads, mask_windows, resident)
        assert blocks == heads * splits and splits == choose_splits(heads, windows, resident)
        assert variant.dbias_partials(heads, mask_windows, splits) == (1, heads, splits, 144, 144)
        images = windows // mask_windows
        walked = []
        for split in range(splits):
            share = mask_window_share(split, splits, windows, mask_windows)
            assert windows // splits <= len(share) <= -(-windows // splits)
            changes = sum(a % mask_windows != b % mask_windows for a, b in zip(share, share[1:]))
            assert changes <= -(-len(share) // images) + 1
            crosses = len({b % mask_windows for b in share}) > 1
            if crosses:
                assert share[0] // mask_windows == 0  # image 0 of the first mask window starting in the share
            walked += share
        assert sorted(walked) == list(range(windows))
    assert variant.grid(0, 4, 64, 132)[0] == 0
    # Swin's window 12 on an H100 (4 heads, 32 images of 64 mask windows, 132 blocks): 62 or 63 windows a block, all
    # in one wave, against whole pairs' 256 blocks of 32 in two.
    assert variant.grid(2048, 4, 64, 132) == (132, 33)


def test_no_windows_launch_nothing():
    assert tile_variants(49, True)[0].grid(0, 3, 0, 132)[0] == 0
    assert BackwardSimtVariant(Problem(49, 32, "float32", True, False, "bwd")).grid(0, 3, 0, 132)[0] == 0


SPLITS_MEASURED = json.loads((Path(__file__).parent / "data" / "h100_tile_backward_splits.json").read_text())


@pytest.mark.parametrize("row", SPLITS_MEASURED["rows"], ids=lambda r: f"{r['shape']}-{r['variant']}")
def test_tiled_split_rule_picks_a_measured_near_best_split_count(row):
    """On an H100's measurement of six tiled variants at forced split counts (times 1x to 4x apart over the split
    counts), the split count the grid rule picks runs within 7% of the fastest one the memory budget allows."""
    wpb = int(re.search(r"_w(\d+)_", row["variant"]).group(1))
    images = row["windows"] // row["mask_windows"]
    max_splits = TILE_DBIAS_PARTIAL_BYTES // (row["heads"] * row["n"] ** 2 * 4)
    splits = choose_tile_splits(row["owners"], images, row["mask_windows"], wpb, row["resident_blocks"], max_splits)
    measured = {int(count): ms for count, ms in row["ms_by_splits"].items() if int(count) <= max_splits}
    assert measured[splits] <= 1.07 * min(measured.values()), (splits, measured)


def test_streamed_forward_grid_is_one_wave_and_never_idles_a_block():
    # The forward's streamed kind (the one forward grid not split per owner) shares out its units of work from
    # gridDim: never more blocks than the GPU holds at once (a second wave would idle), none without work, and every
    # place filled where the work is plentiful.
    for (windows, heads, mask_windows), resident in itertools.product(CALLS, RESIDENT):
        variant = ForwardStreamVariant(Problem(576, 32, "float16", True, mask_windows > 0), windows_per_block=2,
                                       query_chunk=64, rows_per_warp=32, key_tile=32, stages=2)
        blocks, splits = variant.grid(windows, heads, mask_windows, resident)
        windows_of_a_chunk = heads * windows  # each (head, window) is in one unit of each query chunk
        assert splits == 1 and 1 <= blocks <= resident
        assert blocks <= windows_of_a_chunk * variant.chunks_per_item
        if windows_of_a_chunk >= 2 * resident:  # at least one window pair per place in every chunk
            assert blocks == resident
    assert variant.grid(0, 3, 0, 132)[0] == 0
    with pytest.raises(ValueError, match="q: .* more work than one launch indexes"):
        variant.grid(2**26, 64, 0, 132)
