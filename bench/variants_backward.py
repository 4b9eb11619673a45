"""Time backward variants (tiled, or 's1_b1' for the whole-window kernel) at their own grid rule, with and without the
shift mask, as CUDA-graph replays interleaved in one run: the A/B tool for a template change (run it in both checkouts
on one warm GPU).
Usage: python3 bench/variants_backward.py [--shape NAME ...] [--dtype bfloat16] [--variant o64_n32_w4_b1 ...]
       [--variant s1_b1 ...]"""
from __future__ import annotations


from backward_inputs import backward_inputs, backward_variant, chosen_shapes, script_arguments, short_name

from fwagen.compiler import compile_variant, device_arch
from fwagen.launch import launch_backward
from fwagen.problem import Problem
from fwagen.space import static_violation
from fwagen.timing import interleaved

DEFAULT_VARIANTS = ["o64_n32_w4_b1", "o32_n32_w2_b2", "o32_n32_w2_b3", "o64_n32_w2_b2"]


def main(argv=None):
    parser = script_arguments()
    parser.add_argument("--variant", action="append")
    args = parser.parse_args(argv)
    names = args.variant or DEFAULT_VARIANTS
    print("| shape | mask | variant | registers | spill bytes | backward ms |\n|---|---|---|---:|---:|---:|")
    for shape in chosen_shapes(args.shape, ["w12-n144", "w16-n256", "w24-n576"]):
        x = backward_inputs(shape, args.dtype)
        for mask in (None, x.mask):
            problem = Problem(shape.n, shape.d, args.dtype, True, mask is not None, "bwd")
            variants = [v for v in (backward_variant(problem, text) for text in names) if not static_violation(v)]
            backward_args = (x.q, x.k, x.v, x.out, x.dout, x.lse, x.bias, mask, x.scale)
            timings = interleaved({v.key(): (lambda v=v: launch_backward(v, *backward_args)) for v in variants},
                                  use_graph=True)
            for v in variants:
                resources = compile_variant(v, device_arch()).resources
                print(f"| {shape.name} {args.dtype} | {'yes' if mask is not None else 'no'} | "
                      f"{short_name(v)} | {resources.registers} | "
                      f"{resources.spill_bytes} | {timings[v.key()].median_ms:.3f} |", flush=True)


if __name__ == "__main__":
    main()
