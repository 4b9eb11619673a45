"""Forward benchmark: fwagen beside eager PyTorch, SDPA and FlexAttention on real Swin stage sizes.

Every implementation is checked against a float64 reference before it is timed, and a wrong one is
reported but still timed. Every time is set against the floor of DESIGN.md section 2,
max(bytes / copy bandwidth, flops / matmul rate), with both ceilings measured on the card in the same run.

Each implementation does all the work a caller of it pays for on every call: SDPA's combined
full-size mask is rebuilt per call, as timm's fused path does.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from fwagen.reference import shifted_window_mask
from fwagen.timing import copy_bandwidth_gbs, matmul_tflops, require_cuda, time_cuda

DEFAULT_DTYPES = ("float16", "bfloat16")
BENCH_DTYPES = DEFAULT_DTYPES + ("float32",)  # float32 on request: fwagen computes it without TF32
# Max abs error against float64 beyond which an output is flagged wrong; eager PyTorch rounds the logits
# to the input dtype (unit roundoff 2^-11 in fp16, 2^-8 in bf16, 2^-24 in fp32) and its error sits well inside.
TOLERANCE = {"float16": 2e-2, "bfloat16": 1e-1, "float32": 1e-4}
# Gradients are checked relative to their largest element (dbias sums over every window).
TRAIN_TOLERANCE = {"float16": 2e-2, "bfloat16": 1e-1, "float32": 1e-4}


@dataclass(frozen=True)
class Shape:
    name: str
    windows: int  # B_ = batch x nW
    heads: int
    n: int  # tokens per window, a square
    d: int
    nw: int  # windows per image, a square

    def __post_init__(self):
        if math.isqrt(self.n) ** 2 != self.n or math.isqrt(self.nw) ** 2 != self.nw:
            raise ValueError(f"{self.name}: N={self.n} and nW={self.nw} must be squares")
        if self.windows % self.nw:
            raise ValueError(f"{self.name}: {self.windows} windows is not a whole number of {self.nw}-window images")

    @property
    def window(self) -> int:
        return math.isqrt(self.n)

    @property
    def feature(self) -> int:
        """Side of the (square) feature map the windows tile."""
        return self.window * math.isqrt(self.nw)


# Real stage sizes at inference batch sizes; d = 32 in every released configuration.
SHAPES = (
    Shape("swin-t-s1-w7", windows=8192, heads=3, n=49, d=32, nw=64),  # 224 px, 56x56 map, batch 128
    Shape("swin-t-s2-w7", windows=2048, heads=6, n=49, d=32, nw=16),  # 28x28 map
    Shape("swin-t-s3-w7", windows=512, heads=12, n=49, d=32, nw=4),  # 14x14 map
    Shape("swin-t-s4-w7", windows=128, heads=24, n=49, d=32, nw=1),  # 7x7 map: one window, never shifted
    Shape("w8-n64", windows=8192, heads=3, n=64, d=32, nw=64),  # Swin V2, 256 px, 64x64 map, batch 128
    Shape("w12-n144", windows=2048, heads=4, n=144, d=32, nw=64),  # 384 px, 96x96 map, batch 32
    Shape("w16-n256", windows=1024, heads=4, n=256, d=32, nw=64),  # 128x128 map, batch 16
    Shape("w24-n576", windows=256, heads=8, n=576, d=32, nw=16),  # 96x96 map, batch 16
)


@dataclass(frozen=True)
class Case:
    shape: Shape
    dtype: str
    masked: bool

    @property
    def name(self) -> str:
        return f"{self.shape.name} {self.dtype} {'mask' if self.masked else 'nomask'}"


def cases(shapes: Iterable[Shape], dtypes: Iterable[str]) -> list[Case]:
    """Every shape with bias, without and with the shift mask (only where the map holds several windows)."""
    return [
        Case(shape, dtype, masked)
        for shape in shapes
        for dtype in dtypes
        for masked in ((False, True) if shape.nw > 1 else (False,))
    ]


# --- the floor -----------------------------------------------------------------------------------------


def forward_bytes(shape: Shape, elem_size: int) -> int:
    """q, k, v read and o written; bias and mask are small and stay in L2."""
    return 4 * shape.windows * shape.heads * shape.n * shape.d * elem_size


def forward_flops(shape: Shape) -> int:
    """q @ k^T and p @ v, 2 N^2 d each per window and head."""
    return 4 * shape.windows * shape.heads * shape.n * shape.n * shape.d


def floor_ms(shape: Shape, elem_size: int, copy_gbs: float, tflops: float, train: bool = False) -> float:
    """Forward, or with `train` forward plus backward: the backward reads q, k, v, o, dO and writes dq, dk, dv
    (twice the forward's bytes) and does 10 N^2 d flops against the forward's 4 (DESIGN.md section 2)."""
    memory_s = forward_bytes(shape, elem_size) * (3 if train else 1) / (copy_gbs * 1e9)
    compute_s = forward_flops(shape) * (14 / 4 if train else 1) / (tflops * 1e12)
    return max(memory_s, compute_s) * 1e3


def measure_ceilings(dtypes: Iterable[str]) -> dict:
    return {"copy_gbs": copy_bandwidth_gbs(), "matmul_tflops": {dtype: matmul_tflops(dtype) for dtype in dtypes}}


# --- inputs and the reference --------------------------------------------------------------------------


def swin_shift_mask(window: int, feature_hw: int | tuple[int, int]) -> torch.Tensor:
    """Swin's mask for shifted windows, (nW, N, N) float32: 0 within one image region, -100 across regions.

    The shift is window // 2; fwagen.reference.shifted_window_mask builds it. Maps that are never shifted,
    or that windows do not tile, are refused here with the reason.
    """
    h, w = (feature_hw, feature_hw) if isinstance(feature_hw, int) else feature_hw
    if min(h, w) <= window:
        raise ValueError(f"a {h}x{w} map is no larger than the {window} window: it is never shifted, so has no mask")
    if h % window or w % window:
        raise ValueError(f"a {h}x{w} map is not a whole number of {window}x{window} windows")
    return shifted_window_mask(h, w, window, window // 2)


@dataclass(frozen=True)
class Inputs:
    q: torch.Tensor  # (B_, H, N, d), contiguous
    k: torch.Tensor
    v: torch.Tensor
    bias: torch.Tensor  # (H, N, N) float32
    mask: torch.Tensor | None  # (nW, N, N) float32
    nw: int
    scale: float


def make_inputs(case: Case, device: str = "cuda") -> Inputs:
    s = case.shape
    dtype = getattr(torch, case.dtype)
    q, k, v = (torch.randn(s.windows, s.heads, s.n, s.d, dtype=dtype, device=device) for _ in range(3))
    bias = torch.randn(s.heads, s.n, s.n, device=device)
    mask = swin_shift_mask(s.window, s.feature).to(device) if case.masked else None
    return Inputs(q, k, v, bias, mask, s.nw, s.d**-0.5)


def eager_attention(q, k, v, bias, mask, nw: int, scale: float) -> torch.Tensor:
    """The reference code's op order. The float32 bias and mask promote the logits to float32, as under
    autocast; autocast would cast the probabilities back to v's dtype for the last product, done here by hand."""
    b_, h, n, _ = q.shape
    attn = (q * scale) @ k.transpose(-2, -1)
    attn = attn + bias.unsqueeze(0)
    if mask is not None:
        attn = attn.view(b_ // nw, nw, h, n, n) + mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, h, n, n)
    attn = attn.softmax(dim=-1)
    return attn.to(v.dtype) @ v


def reference_output(x: Inputs) -> torch.Tensor:
    mask = None if x.mask is None else x.mask.double()
    return eager_attention(x.q.double(), x.k.double(), x.v.double(), x.bias.double(), mask, x.nw, x.scale)


# --- implementations: name -> builder(inputs) -> zero-argument callable --------------------------------


def build_eager(x: Inputs) -> Callable[[], torch.Tensor]:
    return lambda: eager_attention(x.q, x.k, x.v, x.bias, x.mask, x.nw, x.scale)


def combined_mask(x: Inputs) -> torch.Tensor:
    """timm's fused path: bias plus the per-window mask, expanded to full (B_, H, N, N), in q's dtype."""
    b_, h, n, _ = x.q.shape
    attn_mask = x.bias.unsqueeze(0)
    if x.mask is not None:
        per_window = x.mask.view(1, x.nw, 1, n, n).expand(b_ // x.nw, -1, h, -1, -1)
        attn_mask = attn_mask + per_window.reshape(-1, h, n, n)
    return attn_mask.to(x.q.dtype)


def build_sdpa(x: Inputs) -> Callable[[], torch.Tensor]:
    return lambda: F.scaled_dot_product_attention(x.q, x.k, x.v, attn_mask=combined_mask(x), scale=x.scale)


def build_flex(x: Inputs) -> Callable[[], torch.Tensor]:
    from torch.nn.attention.flex_attention import flex_attention

    # Flex compiles anew for each shape anyway; clearing the caches keeps it under the recompile limit,
    # past which it silently runs a slow unfused path (DESIGN.md section 4).
    torch.compiler.reset()
    compiled = torch.compile(flex_attention)
    bias, mask, nw = x.bias, x.mask, x.nw

    if mask is None:

        def score_mod(score, b, h, q_idx, kv_idx):
            return score + bias[h, q_idx, kv_idx]

    else:

        def score_mod(score, b, h, q_idx, kv_idx):
            return score + bias[h, q_idx, kv_idx] + mask[b % nw, q_idx, kv_idx]

    return lambda: compiled(x.q, x.k, x.v, score_mod=score_mod, scale=x.scale)


def build_fwagen(x: Inputs) -> Callable[[], torch.Tensor]:
    import fwagen

    return lambda: fwagen.window_attention(x.q, x.k, x.v, bias=x.bias, mask=x.mask)


IMPLEMENTATIONS: dict[str, Callable[[Inputs], Callable[[], torch.Tensor]]] = {
    "eager": build_eager,
    "sdpa": build_sdpa,
    "flex": build_flex,
    "fwagen": build_fwagen,
}


def with_grad_leaves(x: Inputs) -> Inputs:
    """The same inputs as fresh leaves that require grad (q, k, v and a learnable bias); the mask never does."""
    leaf = lambda t: t.detach().clone().requires_grad_()  # noqa: E731
    return Inputs(leaf(x.q), leaf(x.k), leaf(x.v), leaf(x.bias), x.mask, x.nw, x.scale)


def build_train(build, x: Inputs, grad_out: torch.Tensor) -> Callable[[], tuple[torch.Tensor, ...]]:
    """One forward plus backward of an implementation: the gradients of q, k, v and bias."""
    forward = build(x)
    leaves = (x.q, x.k, x.v, x.bias)
    return lambda: torch.autograd.grad(forward(), leaves, grad_out)


def reference_grads(x: Inputs, grad_out: torch.Tensor) -> tuple[torch.Tensor, ...]:
    leaves = [t.detach().double().requires_grad_() for t in (x.q, x.k, x.v, x.bias)]
    mask = None if x.mask is None else x.mask.double()
    out = eager_attention(*leaves[:3], leaves[3], mask, x.nw, x.scale)
    return torch.autograd.grad(out, leaves, grad_out.double())


def relative_error(got: Sequence[torch.Tensor], expected: Sequence[torch.Tensor]) -> float:
    """Worst over the gradients of max |got - expected| / max |expected|."""
    return max(((g.double() - e).abs().max() / e.abs().max()).item() for g, e in zip(got, expected))


# --- measuring -----------------------------------------------------------------------------------------


def measure(build, x: Inputs, ref: torch.Tensor, tolerance: float) -> dict:
    """Check, then time. A failure is recorded as the row's error, never raised: the run goes on."""
    result: dict = {}
    try:
        fn = build(x)
        result["err"] = (fn().double() - ref).abs().max().item()
        result["ok"] = result["err"] <= tolerance  # False for NaN too
        timing = time_cuda(fn)
        result.update(ms=timing.median_ms, p20_ms=timing.p20_ms, p80_ms=timing.p80_ms, spread=timing.spread)
    except Exception as exc:  # noqa: BLE001 - any failure of a candidate is a measurement
        result["error"] = f"{type(exc).__name__}: {exc}"
    return result


def measure_train(build, x: Inputs, grad_out: torch.Tensor, expected, tolerance: float) -> dict:
    """Check the gradients (relative error), then time forward plus backward and record its peak memory
    above what the inputs already hold. A failure is recorded, never raised."""
    result: dict = {}
    try:
        fn = build_train(build, with_grad_leaves(x), grad_out)
        result["err"] = relative_error(fn(), expected)
        result["ok"] = result["err"] <= tolerance
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        result["peak_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        timing = time_cuda(fn)
        result.update(ms=timing.median_ms, p20_ms=timing.p20_ms, p80_ms=timing.p80_ms, spread=timing.spread)
    except Exception as exc:  # noqa: BLE001 - any failure of a candidate is a measurement
        result["error"] = f"{type(exc).__name__}: {exc}"
        return result
    # The same forward plus backward as CUDA graph replays: GPU time alone. An eager autograd call costs the
    # host more than a small shape costs the GPU, so the eager median carries host gaps (and their noise).
    try:
        graphed = time_cuda(fn, use_graph=True)
        result.update(graph_ms=graphed.median_ms, graph_spread=graphed.spread)
    except Exception as exc:  # noqa: BLE001 - an implementation that cannot be captured keeps its eager time
        result["graph_error"] = f"{type(exc).__name__}: {exc}"
    return result


def bench_case(case: Case, ceilings: dict, impls=IMPLEMENTATIONS, train: bool = False) -> list[dict]:
    x = make_inputs(case)
    floor = floor_ms(case.shape, x.q.element_size(), ceilings["copy_gbs"], ceilings["matmul_tflops"][case.dtype],
                     train)
    if train:
        grad_out = torch.randn_like(x.q)
        expected = reference_grads(x, grad_out)
        # The gradients' sizes: what a training step must hold anyway, the scale of the peak-memory column.
        grads_mb = sum(t.numel() * t.element_size() for t in expected) / 2 / 2**20
    else:
        ref = reference_output(x)
    s = case.shape
    rows = []
    for name, build in impls.items():
        row = dict(shape=s.name, windows=s.windows, heads=s.heads, n=s.n, d=s.d, nw=s.nw, dtype=case.dtype)
        row.update(mask=case.masked, impl=name, floor_ms=floor, ms=None, spread=None, err=None, ok=None, error=None)
        if train:
            row.update(measure_train(build, x, grad_out, expected, TRAIN_TOLERANCE[case.dtype]), grads_mb=grads_mb)
        else:
            row.update(measure(build, x, ref, TOLERANCE[case.dtype]))
        timed = row.get("graph_ms") or row["ms"]
        row["x_floor"] = timed / floor if timed is not None else None
        rows.append(row)
    return rows


def host_overhead_us(calls: int = 2000) -> dict:
    """Host microseconds per call of the public op, of the bare kernel launch it ends in, and of the dispatch
    lookup alone, on a problem too small for the GPU to be the bottleneck."""
    import time

    import fwagen
    from fwagen import dispatch
    from fwagen.compiler import device_arch
    from fwagen.launch import empty_lse, launch_forward
    from fwagen.problem import Problem

    q, k, v = (torch.randn(8, 2, 49, 32, dtype=torch.float16, device="cuda") for _ in range(3))
    bias = torch.randn(2, 49, 49, device="cuda")
    problem, arch = Problem(49, 32, "float16", True, False), device_arch(q.device.index)
    variant = dispatch.choose_for(problem, 16, arch).variant
    out, lse = torch.empty_like(q), empty_lse(q)

    def per_call(fn) -> float:
        fn()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        elapsed = time.perf_counter() - start
        torch.cuda.synchronize()
        return elapsed / calls * 1e6

    return {
        "op_us": per_call(lambda: fwagen.window_attention(q, k, v, bias)),
        "launch_us": per_call(lambda: launch_forward(variant, q, k, v, out, lse, bias, None, 0.17)),
        "dispatch_us": per_call(lambda: dispatch.choose_for(problem, 16, arch)),
    }


# --- reports -------------------------------------------------------------------------------------------


def gpu_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _cell(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _note(row: dict) -> str:
    if row.get("error"):
        first_line = next((line for line in row["error"].splitlines() if line.strip()), "")
        return first_line[:100].replace("|", "\\|")
    return "WRONG" if row.get("ok") is False else ""


def markdown_table(rows: Sequence[dict]) -> str:
    train = any("peak_mb" in r or "grads_mb" in r for r in rows)
    lines = [
        "| shape | dtype | mask | impl | ms | " + ("graph ms | " if train else "") + "floor ms | x floor | spread | err | "
        + ("peak MB | grads MB | " if train else "") + "note |",
        "|---|---|---|---|---:|" + ("---:|" if train else "") + "---:|---:|---:|---:|" + ("---:|---:|" if train else "")
        + "---|",
    ]
    for r in rows:
        cells = (
            r["shape"],
            r["dtype"],
            "yes" if r["mask"] else "no",
            r["impl"],
            _cell(r.get("ms"), ".3f"),
            *((_cell(r.get("graph_ms"), ".3f"),) if train else ()),
            _cell(r.get("floor_ms"), ".3f"),
            _cell(r.get("x_floor"), ".1f"),
            _cell(r.get("spread"), ".0%"),
            _cell(r.get("err"), ".1e"),
            *((_cell(r.get("peak_mb"), ".0f"), _cell(r.get("grads_mb"), ".0f")) if train else ()),
            _note(r),
        )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def environment() -> dict:
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return {
        "device": props.name,
        "capability": f"{props.major}.{props.minor}",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _json_safe(value):
    """JSON has no NaN or infinity: write them as strings rather than emit invalid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def write_reports(rows: list[dict], env: dict, ceilings: dict, out_dir: str | Path,
                  kind: str = "forward") -> tuple[Path, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{gpu_slug(env['device'])}-{kind}"
    report = {**env, "ceilings": ceilings, "rows": rows}
    json_path = stem.with_suffix(".json")
    json_path.write_text(json.dumps(_json_safe(report), indent=1) + "\n")
    rates = ", ".join(f"{dtype} {tf:.0f} TFLOP/s" for dtype, tf in ceilings["matmul_tflops"].items())
    header = (
        f"# Window attention ({kind}) on {env['device']}\n\n"
        f"torch {env['torch']}, CUDA {env['cuda']}, {env['date']}. "
        f"Copy bandwidth {ceilings['copy_gbs']:.0f} GB/s (read + written); matmul {rates}.\n"
        + (f"Host time per call: {env['host_overhead_us']['op_us']:.1f} us for fwagen.window_attention, "
           f"{env['host_overhead_us']['launch_us']:.1f} us for the bare launch inside it, "
           f"{env['host_overhead_us']['dispatch_us']:.2f} us for the dispatch lookup.\n"
           if "host_overhead_us" in env else "")
        + "ms: median; spread: (p80 - p20) / median; err: max abs error against float64 (train: of the\n"
        "gradients of q, k, v and bias, relative to the largest element); peak MB: memory one forward plus\n"
        "backward allocates above its inputs; grads MB: the size of the q, k, v and bias gradients; graph ms:\n"
        "median of CUDA graph replays of the same forward plus backward (GPU time without host gaps), the\n"
        "time x floor uses where the implementation could be captured.\n\n"
    )
    md_path = stem.with_suffix(".md")
    md_path.write_text(header + markdown_table(rows))
    return json_path, md_path


# --- entry points --------------------------------------------------------------------------------------


def run_bench(
    shapes: Sequence[Shape] | None = None,
    dtypes: Sequence[str] = DEFAULT_DTYPES,
    out_dir: str | Path = "bench/results",
    quick: bool = False,
    train: bool = False,
) -> list[dict]:
    """Benchmark every case; with quick and no shapes given, only Swin-T stage 1 (a smoke run)."""
    require_cuda()
    if shapes is None:
        shapes = SHAPES[:1] if quick else SHAPES
    ceilings = measure_ceilings(dtypes)
    env = environment()
    env["host_overhead_us"] = host_overhead_us()
    print("host time per call (us): " + ", ".join(f"{k} {v:.1f}" for k, v in env["host_overhead_us"].items()),
          file=sys.stderr)
    rows: list[dict] = []
    json_path = md_path = None
    for case in cases(shapes, dtypes):
        case_rows = bench_case(case, ceilings, train=train)
        rows.extend(case_rows)
        summary = ", ".join(f"{r['impl']} {_cell(r['ms'], '.3f')}" for r in case_rows)
        print(f"{case.name}: {summary} ms", file=sys.stderr, flush=True)
        # Rewritten after every case: a run cut short still leaves the cases it finished.
        json_path, md_path = write_reports(rows, env, ceilings, out_dir, "train" if train else "forward")
    print(markdown_table(rows))
    print(f"wrote {json_path} and {md_path}", file=sys.stderr)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench", description="Window-attention benchmark.")
    parser.add_argument("--quick", action="store_true", help="Swin-T stage 1 only: a smoke run")
    parser.add_argument("--train", action="store_true", help="time forward plus backward, with peak memory")
    parser.add_argument("--out", default="bench/results", help="folder for the .json and .md reports")
    parser.add_argument("--dtype", action="append", choices=BENCH_DTYPES,
                        help="repeat for several; default float16 and bfloat16")
    parser.add_argument(
        "--shape", action="append", choices=[s.name for s in SHAPES], help="repeat for several; default all"
    )
    args = parser.parse_args(argv)
    shapes = [s for s in SHAPES if s.name in args.shape] if args.shape else None
    run_bench(shapes=shapes, dtypes=tuple(args.dtype or DEFAULT_DTYPES), out_dir=args.out, quick=args.quick,
              train=args.train)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
