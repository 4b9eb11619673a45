"""How much of a launch is a fixed cost per call and how much grows with the windows: the default forward and one
backward variant (bf16, bias, with and without the shift mask) at a bench shape's window count halved, as is and
doubled, as CUDA-graph replays interleaved in one run. The grid keeps its blocks (or its waves) while each block walks
more windows, so the slope is the steady state and the intercept what a call pays whatever its size: the fill of the
bias and mask term, the first loads nothing overlaps, the dbias reduction and the launch.
Usage: python3 bench/fixed_cost.py [--shape w12-n144] [--dtype bfloat16] [--variant s1_b1]"""
from __future__ import annotations

from dataclasses import replace

from backward_inputs import backward_inputs, backward_variant, chosen_shapes, script_arguments

from fwagen.launch import launch_backward, launch_forward
from fwagen.problem import Problem
from fwagen.space import default_variant
from fwagen.timing import interleaved


def main(argv=None):
    parser = script_arguments()
    parser.add_argument("--variant", default="s1_b1", help="the backward variant's short name (see backward_inputs)")
    args = parser.parse_args(argv)
    print("| shape | windows | mask | forward ms | backward ms |\n|---|---:|---|---:|---:|")
    for base in chosen_shapes(args.shape, ["w12-n144"]):
        for windows in (base.windows // 2, base.windows, base.windows * 2):
            shape = replace(base, windows=windows)
            x = backward_inputs(shape, args.dtype)
            for mask in (None, x.mask):
                masked = mask is not None
                forward = default_variant(Problem(shape.n, shape.d, args.dtype, True, masked))
                backward = backward_variant(Problem(shape.n, shape.d, args.dtype, True, masked, "bwd"), args.variant)
                calls = {
                    "forward": lambda: launch_forward(forward, x.q, x.k, x.v, x.out, x.lse, x.bias, mask, x.scale),
                    "backward": lambda: launch_backward(backward, x.q, x.k, x.v, x.out, x.dout, x.lse, x.bias, mask,
                                                        x.scale),
                }
                t = interleaved(calls, use_graph=True)
                print(f"| {base.name} {args.dtype} | {windows} | {'yes' if masked else 'no'} | "
                      f"{t['forward'].median_ms:.4f} | {t['backward'].median_ms:.4f} |", flush=True)


if __name__ == "__main__":
    main()
