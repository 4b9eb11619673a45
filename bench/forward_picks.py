"""Time the forward kernel that dispatch picks on this GPU for each bench shape, dtype and mask, as CUDA-graph
replays interleaved in one run: run it in two checkouts alternately on one warm GPU to A/B a template change at the
tuned picks of every kind (bench/ab_forward.py covers the mma.sync kinds at named knobs).
Usage: python3 bench/forward_picks.py [--shape NAME ...]"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from fwagen.bench import SHAPES
from fwagen.compiler import device_arch
from fwagen.dispatch import choose
from fwagen.launch import empty_lse, launch_forward
from fwagen.problem import Problem, work_bucket
from fwagen.timing import interleaved

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from helpers import make_inputs  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", action="append", choices=[s.name for s in SHAPES])
    args = parser.parse_args(argv)
    calls = {}
    for shape in [s for s in SHAPES if s.name in (args.shape or ["w16-n256", "w24-n576"])]:
        for dtype in ("float16", "bfloat16"):
            for masked in (False, True):
                q, k, v, b, m = make_inputs(shape.windows, shape.heads, shape.n, shape.d, getattr(torch, dtype),
                                            mask_windows=shape.nw if masked else 0, qkv_strided=True)
                out = torch.empty_like(q, memory_format=torch.contiguous_format)
                problem = Problem(shape.n, shape.d, dtype, True, masked)
                variant = choose(problem, work_bucket(shape.windows * shape.heads), device_arch(),
                                 torch.cuda.get_device_name()).variant
                label = f"| {shape.name} | {dtype} | {'yes' if masked else 'no'} | {variant.key()} |"
                calls[label] = (lambda variant=variant, a=(q, k, v, out, empty_lse(q), b, m, shape.d ** -0.5):
                                launch_forward(variant, *a))
    timings = interleaved(calls, use_graph=True)
    print(torch.cuda.get_device_name())
    print("| shape | dtype | mask | pick | forward ms |\n|---|---|---|---|---:|")
    for label in calls:
        print(f"{label} {timings[label].median_ms:.4f} |")


if __name__ == "__main__":
    main()
