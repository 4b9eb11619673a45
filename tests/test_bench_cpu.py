"""CPU tests of the benchmark's logic: the floor, the shift mask, the cases, the reports, the timing summary."""

import json
import math

import pytest
import torch

from fwagen.bench import (
    SHAPES,
    Inputs,
    Shape,
    build_eager,
    build_sdpa,
    cases,
    floor_ms,
    forward_bytes,
    forward_flops,
    gpu_slug,
    markdown_table,
    swin_shift_mask,
    write_reports,
)
from fwagen.timing import Timing

SWIN_T_STAGE1 = next(s for s in SHAPES if s.name == "swin-t-s1-w7")
WINDOW_24 = next(s for s in SHAPES if s.name == "w24-n576")


# --- the floor -----------------------------------------------------------------------------------------


def test_floor_of_swin_t_stage1_is_memory_bound_and_matches_design_note():
    # 8192 * 3 * 49 * 32 = 38,535,168 elements per tensor; 4 tensors of 2 bytes.
    assert forward_bytes(SWIN_T_STAGE1, 2) == 308_281_344
    # 4 * 8192 * 3 * 49^2 * 32
    assert forward_flops(SWIN_T_STAGE1) == 7_552_892_928
    # DESIGN.md: 4.28 TB/s on the H200 gives a 0.072 ms floor; 700 TFLOP/s would allow 0.011 ms.
    floor = floor_ms(SWIN_T_STAGE1, 2, copy_gbs=4280, tflops=700)
    assert floor == pytest.approx(308_281_344 / 4.28e12 * 1e3)
    assert round(floor, 3) == 0.072


def test_floor_of_window_24_is_compute_bound_at_h100_rates():
    # 256 * 8 * 576 * 32 = 37,748,736 elements; 4 tensors of 2 bytes -> 0.0755 ms at 4 TB/s.
    assert forward_bytes(WINDOW_24, 2) == 301_989_888
    # 4 * 256 * 8 * 576^2 * 32 flops -> 0.124 ms at 700 TFLOP/s: the matrix units set the floor.
    assert forward_flops(WINDOW_24) == 86_973_087_744
    assert floor_ms(WINDOW_24, 2, copy_gbs=4000, tflops=700) == pytest.approx(86_973_087_744 / 700e12 * 1e3)


def test_floor_scales_with_element_size():
    assert forward_bytes(SWIN_T_STAGE1, 4) == 2 * forward_bytes(SWIN_T_STAGE1, 2)


# --- the shift mask ------------------------------------------------------------------------------------


def test_shift_mask_shape_dtype_and_values():
    mask = swin_shift_mask(7, 14)
    assert mask.shape == (4, 49, 49)
    assert mask.dtype == torch.float32
    assert set(mask.unique().tolist()) == {0.0, -100.0}
    assert torch.equal(mask, mask.transpose(1, 2))
    assert torch.all(mask.diagonal(dim1=1, dim2=2) == 0)


def test_shift_mask_first_window_is_open_and_last_is_cut_in_four():
    mask = swin_shift_mask(7, 14)
    assert torch.all(mask[0] == 0)
    last = mask[-1]
    assert torch.any(last != 0)
    # With shift 3 the last window's rows and columns split 4 + 3: regions of 16, 12, 12 and 9 tokens.
    assert int((last[0] == 0).sum()) == 16  # token (0, 0): top-left region, 4 x 4
    assert int((last[48] == 0).sum()) == 9  # token (6, 6): bottom-right region, 3 x 3
    assert last[0, 1] == 0 and last[0, 4 * 7 + 4] == -100


def test_shift_mask_cuts_only_the_last_row_and_column_of_windows():
    mask = swin_shift_mask(7, 56)
    assert mask.shape == (64, 49, 49)
    cut = (mask != 0).flatten(1).any(dim=1).view(8, 8)
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[-1, :] = True
    expected[:, -1] = True
    assert torch.equal(cut, expected)


def test_shift_mask_matches_swin_reference_construction():
    window, size, shift = 7, 28, 3
    img_mask = torch.zeros((1, size, size, 1))
    slices = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    cnt = 0
    for h in slices:
        for w in slices:
            img_mask[:, h, w, :] = cnt
            cnt += 1
    x = img_mask.view(1, size // window, window, size // window, window, 1)
    mask_windows = x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, window * window)
    attn_mask = mask_windows.unsqueeze(1) - mask_windows.unsqueeze(2)
    attn_mask = attn_mask.masked_fill(attn_mask != 0, -100.0).masked_fill(attn_mask == 0, 0.0)
    assert torch.equal(swin_shift_mask(window, (size, size)), attn_mask)


def test_shift_mask_refuses_a_map_that_is_one_window():
    with pytest.raises(ValueError, match="never shifted"):
        swin_shift_mask(7, 7)


# --- the cases and the implementations' semantics ------------------------------------------------------


def test_single_window_stage_has_no_masked_case():
    stage4 = next(s for s in SHAPES if s.nw == 1)
    assert [c.masked for c in cases([stage4], ["float16"])] == [False]
    assert [c.masked for c in cases([SWIN_T_STAGE1], ["float16", "bfloat16"])] == [False, True, False, True]


def test_shape_table_is_consistent():
    for s in SHAPES:
        assert s.d == 32
        assert s.window**2 == s.n
        assert s.windows % s.nw == 0
    with pytest.raises(ValueError):
        Shape("bad", windows=100, heads=1, n=49, d=32, nw=64)


def _small_inputs(windows=6, nw=2, heads=2, window=3):
    n = window * window
    q, k, v = (torch.randn(windows, heads, n, 8, dtype=torch.float64) for _ in range(3))
    bias = torch.randn(heads, n, n, dtype=torch.float64)
    mask = torch.where(torch.rand(nw, n, n) < 0.3, -100.0, 0.0).double()
    return Inputs(q, k, v, bias, mask, nw, 8**-0.5)


def test_eager_applies_mask_of_window_b_mod_nw():
    x = _small_inputs()
    out = build_eager(x)()
    for b in range(x.q.shape[0]):
        scores = (x.q[b] @ x.k[b].transpose(-2, -1)) * x.scale + x.bias + x.mask[b % x.nw]
        assert torch.allclose(out[b], scores.softmax(-1) @ x.v[b], atol=1e-12)


def test_sdpa_combined_mask_matches_eager():
    x = _small_inputs()
    assert torch.allclose(build_sdpa(x)(), build_eager(x)(), atol=1e-12)
    unmasked = Inputs(x.q, x.k, x.v, x.bias, None, x.nw, x.scale)
    assert torch.allclose(build_sdpa(unmasked)(), build_eager(unmasked)(), atol=1e-12)


# --- reports -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, slug",
    [
        ("NVIDIA H100 80GB HBM3", "nvidia-h100-80gb-hbm3"),
        ("NVIDIA H200", "nvidia-h200"),
        ("Tesla V100-SXM2-16GB", "tesla-v100-sxm2-16gb"),
    ],
)
def test_gpu_slug(name, slug):
    assert gpu_slug(name) == slug


def _row(impl, **fields):
    row = dict(shape="swin-t-s1-w7", dtype="float16", mask=True, impl=impl, floor_ms=0.0720, ms=None)
    row.update(spread=None, x_floor=None, err=None, ok=None, error=None)
    row.update(fields)
    return row


ROWS = [
    _row("eager", ms=1.1834, x_floor=16.436, spread=0.021, err=9.8e-4, ok=True),
    _row("flex", ms=0.49, x_floor=6.8, spread=0.05, err=0.5, ok=False),
    _row("fwagen", error="ImportError: no window_attention | here\nsecond line"),
]


def test_markdown_table_has_one_line_per_row_with_formatted_cells():
    lines = markdown_table(ROWS).splitlines()
    assert lines[0].startswith("| shape | dtype | mask | impl | ms |")
    assert len(lines) == 2 + len(ROWS)
    cells = [[c.strip() for c in line.strip("|").split(" | ")] for line in lines[2:]]
    assert cells[0] == ["swin-t-s1-w7", "float16", "yes", "eager", "1.183", "0.072", "16.4", "2%", "9.8e-04", ""]
    assert cells[1][-1] == "WRONG"
    assert cells[2][4] == "-" and cells[2][6] == "-"
    assert "no window_attention \\| here" in lines[4] and "second line" not in lines[4]


def test_train_table_shows_graph_replay_times_beside_eager_ones():
    rows = [_row("fwagen", ms=0.684, graph_ms=0.402, x_floor=1.86, spread=0.47, err=5.8e-4, ok=True, peak_mb=302.0,
                 grads_mb=441.0),
            _row("flex", ms=4.049, x_floor=18.7, spread=0.0, err=5.8e-4, ok=True, peak_mb=303.0, grads_mb=441.0)]
    lines = markdown_table(rows).splitlines()
    header = [c.strip() for c in lines[0].strip("|").split(" | ")]
    assert header[4:6] == ["ms", "graph ms"] and "peak MB" in header
    cells = [[c.strip() for c in line.strip("|").split(" | ")] for line in lines[2:]]
    assert cells[0][4:7] == ["0.684", "0.402", "0.072"] and cells[1][5] == "-"  # flex: not captured
    assert len(cells[0]) == len(header) == len(lines[1].strip("|").split("|"))


def test_write_reports_names_files_by_gpu_and_writes_valid_json(tmp_path):
    env = {"device": "NVIDIA H200", "capability": "9.0", "torch": "2.11.0", "cuda": "13.0", "date": "2026-01-01"}
    ceilings = {"copy_gbs": 4280.0, "matmul_tflops": {"float16": 790.0}}
    rows = ROWS + [_row("sdpa", ms=0.84, err=math.nan, ok=False)]
    json_path, md_path = write_reports(rows, env, ceilings, tmp_path / "results")
    assert json_path.name == "nvidia-h200-forward.json" and md_path.name == "nvidia-h200-forward.md"
    report = json.loads(json_path.read_text(), parse_constant=lambda c: pytest.fail(f"invalid JSON constant {c}"))
    assert report["device"] == "NVIDIA H200" and report["ceilings"] == ceilings
    assert [r["impl"] for r in report["rows"]] == ["eager", "flex", "fwagen", "sdpa"]
    assert report["rows"][-1]["err"] == "nan"
    assert "4280 GB/s" in md_path.read_text()


# --- timing summary ------------------------------------------------------------------------------------


def test_timing_summary_uses_order_statistics():
    samples = [7.0, 1.0, 11.0, 3.0, 5.0, 9.0, 2.0, 4.0, 6.0, 8.0, 10.0]
    t = Timing.from_samples(samples)
    assert (t.median_ms, t.p20_ms, t.p80_ms, t.min_ms, t.reps) == (6.0, 3.0, 9.0, 1.0, 11)
    assert t.spread == pytest.approx(1.0)
    t = Timing.from_samples([1.0, 2.0])
    assert (t.median_ms, t.p20_ms, t.p80_ms) == (1.5, 1.2, 1.8)


def test_every_bench_dtype_has_its_tolerances():
    from fwagen.bench import BENCH_DTYPES, DEFAULT_DTYPES, TOLERANCE, TRAIN_TOLERANCE

    assert set(DEFAULT_DTYPES) < set(BENCH_DTYPES) == set(TOLERANCE) == set(TRAIN_TOLERANCE)
