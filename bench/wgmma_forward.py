"""Forward kernels with their products by wgmma against the tuned mma.sync picks, on the bench's large-window shapes.

Usage: python3 bench/wgmma_forward.py [--shape w24-n576 ...] [--dtype bfloat16 ...] [--top 5]   (an H100 or H200)

For each shape, dtype and mask setting: the variant fwagen dispatches today (`fwagen.dispatch`) and every legal wgmma
variant (`fwagen.space.candidates`) that compiles within the resource limits. Each is checked against the float64
reference on the shape's first mask period of windows (poisoned output) before anything is timed; then all are timed
interleaved (`fwagen.timing.interleaved`). Prints the dispatched variant and the fastest wgmma ones, ms median.
"""
from __future__ import annotations

import argparse
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from fwagen.bench import SHAPES
from fwagen.compiler import compile_variant, device_arch
from fwagen.dispatch import choose_for
from fwagen.launch import empty_lse, launch_forward
from fwagen.problem import Problem
from fwagen.space import candidates, resource_violation
from fwagen.timing import interleaved

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from helpers import allowed_error, make_inputs, reference64  # noqa: E402

LARGE = ("w12-n144", "w16-n256", "w24-n576")


def checked_call(variant, q, k, v, b, m, periods: int):
    """A timed call of `variant` after its output on the first `periods` windows passed the float64 check."""
    out = torch.full_like(q, float("nan"))
    lse = empty_lse(q)
    launch_forward(variant, q, k, v, out, lse, b, m, q.shape[-1] ** -0.5)
    torch.cuda.synchronize()
    part = (q[:periods], k[:periods], v[:periods], b, m)
    expected = reference64(*part)
    error = (out[:periods].double() - expected).abs().max().item()
    allowed = allowed_error(*part, expected)
    if not error <= allowed:
        raise SystemExit(f"{variant.key()}: error {error:.3g} > allowed {allowed:.3g}")
    return lambda: launch_forward(variant, q, k, v, out, lse, b, m, q.shape[-1] ** -0.5)


def compare(shape, dtype: str, mask: bool, top: int) -> None:
    problem = Problem(shape.n, shape.d, dtype, True, mask)
    arch = device_arch()
    picked = choose_for(problem, shape.windows * shape.heads, arch).variant
    legal = [var for var in candidates(problem, arch)[0] if var.wgmma]
    with ThreadPoolExecutor(8) as pool:
        compiled = list(pool.map(lambda var: compile_variant(var, arch), legal))
    wgmma = [var for var, c in zip(legal, compiled) if resource_violation(var, c.resources) is None]
    q, k, v, b, m = make_inputs(shape.windows, shape.heads, shape.n, shape.d, getattr(torch, dtype),
                                mask_windows=shape.nw if mask else 0, qkv_strided=True)
    periods = shape.nw if mask else 4
    calls = {var.key(): checked_call(var, q, k, v, b, m, periods) for var in [picked, *wgmma]}
    timings = interleaved(calls, rounds=20, warmup=3)
    base = timings[picked.key()].median_ms
    ranked = sorted(wgmma, key=lambda var: timings[var.key()].median_ms)[:top]
    label = f"| {shape.name} | {dtype} | {'yes' if mask else 'no'}"
    print(f"{label} | dispatched {picked.key()} | {base:.4f} | 1.00 |", flush=True)
    for var in ranked:
        ms = timings[var.key()].median_ms
        print(f"{label} | {var.key()} | {ms:.4f} | {ms / base:.2f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", action="append", choices=LARGE)
    parser.add_argument("--dtype", action="append", choices=("float16", "bfloat16"))
    parser.add_argument("--top", type=int, default=5)
    args = parser.parse_args()
    shapes = {s.name: s for s in SHAPES}
    print(torch.cuda.get_device_name())
    print("| shape | dtype | mask | variant | ms | / dispatched |\n|---|---|---|---|---:|---:|")
    for name in args.shape or LARGE:
        for dtype in args.dtype or ("bfloat16",):
            for mask in (False, True):
                compare(shapes[name], dtype, mask, args.top)


if __name__ == "__main__":
    main()
