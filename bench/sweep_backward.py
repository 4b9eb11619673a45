"""Time every legal backward variant of a few Swin problems on this GPU (fastest first), and the forward default
beside it. Usage: python3 bench/sweep_backward.py [--shape NAME ...] [--dtype float16] [--pruned]"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from fwagen.bench import SHAPES
from fwagen.launch import empty_lse, launch_backward, launch_forward
from fwagen.problem import Problem
from fwagen.space import backward_candidates, default_variant
from fwagen.timing import time_cuda

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from helpers import make_inputs  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", action="append")
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--pruned", action="store_true", help="also list the variants pruned, and why")
    args = parser.parse_args(argv)
    for shape in [s for s in SHAPES if s.name in (args.shape or ["swin-t-s1-w7", "w8-n64"])]:
        problem = Problem(shape.n, shape.d, args.dtype, True, True)
        q, k, v, b, m = make_inputs(shape.windows, shape.heads, shape.n, shape.d, getattr(torch, args.dtype),
                                    mask_windows=shape.nw, qkv_strided=True)
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
        lse = empty_lse(q)
        scale = shape.d ** -0.5
        forward = default_variant(problem)
        fwd = time_cuda(lambda: launch_forward(forward, q, k, v, out, lse, b, m, scale))
        print(f"\n## {shape.name} {args.dtype}: forward {forward.key()} {fwd.median_ms:.4f} ms")
        dout = torch.randn_like(out)
        legal, pruned = backward_candidates(Problem(shape.n, shape.d, args.dtype, True, True, "bwd"))
        timed = [(time_cuda(lambda: launch_backward(variant, q, k, v, out, dout, lse, b, m, scale)), variant)
                 for variant in legal]
        for t, variant in sorted(timed, key=lambda pair: pair[0].median_ms):  # fastest first
            print(f"{t.median_ms:8.4f} ms (spread {t.spread:.0%})  {variant.key()}")
        if args.pruned:
            for key, reason in pruned.items():
                print(f"  pruned {key}: {reason}")


if __name__ == "__main__":
    main()
