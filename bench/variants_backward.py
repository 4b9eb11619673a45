"""Time tiled backward variants at their own grid rule, with and without the shift mask, as CUDA-graph replays
interleaved in one run: the A/B tool for a template change (run it in both checkouts on one warm GPU).
Usage: python3 bench/variants_backward.py [--shape NAME ...] [--dtype bfloat16] [--variant o64_n32_w4_b1 ...]"""
from __future__ import annotations


from backward_inputs import backward_inputs, chosen_shapes, script_arguments, tile_knobs

from fwagen.compiler import compile_variant, device_arch
from fwagen.launch import launch_backward
from fwagen.problem import Problem
from fwagen.space import static_violation
from fwagen.timing import interleaved
from fwagen.variant import BackwardTileVariant

DEFAULT_VARIANTS = ["o64_n32_w4_b1", "o32_n32_w2_b2", "o32_n32_w2_b3", "o64_n32_w2_b2"]


def main(argv=None):
    parser = script_arguments()
    parser.add_argument("--variant", action="append")
    args = parser.parse_args(argv)
    knobs = [tile_knobs(text) for text in args.variant or DEFAULT_VARIANTS]
    print("| shape | mask | variant | registers | spill bytes | backward ms |\n|---|---|---|---:|---:|---:|")
    for shape in chosen_shapes(args.shape, ["w12-n144", "w16-n256", "w24-n576"]):
        x = backward_inputs(shape, args.dtype)
        for mask in (None, x.mask):
            problem = Problem(shape.n, shape.d, args.dtype, True, mask is not None, "bwd")
            variants = [v for v in (BackwardTileVariant(problem, *k) for k in knobs) if not static_violation(v)]
            backward_args = (x.q, x.k, x.v, x.out, x.dout, x.lse, x.bias, mask, x.scale)
            timings = interleaved({v.key(): (lambda v=v: launch_backward(v, *backward_args)) for v in variants},
                                  use_graph=True)
            for v in variants:
                resources = compile_variant(v, device_arch()).resources
                print(f"| {shape.name} {args.dtype} | {'yes' if mask is not None else 'no'} | "
                      f"o{v.own_rows}_n{v.tile_rows}_w{v.windows_per_block}_b{v.min_blocks} | {resources.registers} | "
                      f"{resources.spill_bytes} | {timings[v.key()].median_ms:.3f} |", flush=True)


if __name__ == "__main__":
    main()
