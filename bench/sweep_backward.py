"""Time every legal backward variant of a few Swin problems on this GPU (fastest first), and the forward default
beside it. Usage: python3 bench/sweep_backward.py [--shape NAME ...] [--dtype float16] [--pruned]"""
from __future__ import annotations

import argparse

from backward_inputs import backward_inputs

from fwagen.bench import SHAPES
from fwagen.launch import launch_backward
from fwagen.problem import Problem
from fwagen.space import backward_candidates
from fwagen.timing import time_cuda


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", action="append")
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--pruned", action="store_true", help="also list the variants pruned, and why")
    args = parser.parse_args(argv)
    for shape in [s for s in SHAPES if s.name in (args.shape or ["swin-t-s1-w7", "w8-n64"])]:
        x = backward_inputs(shape, args.dtype)
        fwd = time_cuda(x.launch_forward)
        print(f"\n## {shape.name} {args.dtype}: forward {x.forward.key()} {fwd.median_ms:.4f} ms")
        legal, pruned = backward_candidates(Problem(shape.n, shape.d, args.dtype, True, True, "bwd"))
        timed = [(time_cuda(lambda: launch_backward(variant, *x.backward_args())), variant)
                 for variant in legal]
        for t, variant in sorted(timed, key=lambda pair: pair[0].median_ms):  # fastest first
            print(f"{t.median_ms:8.4f} ms (spread {t.spread:.0%})  {variant.key()}")
        if args.pruned:
            for key, reason in pruned.items():
                print(f"  pruned {key}: {reason}")


if __name__ == "__main__":
    main()
