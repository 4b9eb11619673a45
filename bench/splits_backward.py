"""Time tiled backward variants at forced split counts (dQ blocks per (head, row chunk)), to choose the grid rule.
Usage: python3 bench/splits_backward.py [--shape NAME ...] [--dtype bfloat16] [--variant o64_n32_w4_b1 ...]"""
from __future__ import annotations


from backward_inputs import backward_inputs, backward_variant, chosen_shapes, script_arguments

from fwagen import launch
from fwagen.compiler import load_kernel
from fwagen.launch import launch_backward
from fwagen.problem import Problem
from fwagen.timing import time_cuda
from fwagen.variant import BackwardTileVariant


def main(argv=None):
    parser = script_arguments()
    parser.add_argument("--variant", action="append")
    args = parser.parse_args(argv)
    for shape in chosen_shapes(args.shape, ["w24-n576"]):
        x = backward_inputs(shape, args.dtype)
        images = shape.windows // shape.nw
        print(f"\n## {shape.name} {args.dtype} mask, {images} images")
        for text in args.variant or ["o64_n32_w4_b1", "o32_n32_w2_b2", "o32_n32_w4_b1"]:
            variant = backward_variant(Problem(shape.n, shape.d, args.dtype, True, True, "bwd"), text)
            if not isinstance(variant, BackwardTileVariant):
                parser.error(f"--variant {text}: splits are timed for tiled variants only")
            wpb = variant.windows_per_block
            loaded = load_kernel(variant, x.q.device.index)
            owners = shape.heads * variant.chunks_per_item
            natural = variant.grid(shape.windows, shape.heads, shape.nw, loaded.resident_blocks)[1]
            row = []
            for splits in [s for s in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32) if s <= images]:
                groups = -(-images // wpb)
                slot = (variant.key(), x.q.device.index, shape.windows, shape.heads, shape.nw)
                launch._plans[slot] = (loaded, owners * splits + owners * shape.nw * groups, splits)
                t = time_cuda(lambda: launch_backward(variant, *x.backward_args()), reps=30)
                row.append(f"s{splits}{'*' if splits == natural else ''} {t.median_ms:.3f}")
                launch._plans.pop(slot)
            print(f"{text} (resident {loaded.resident_blocks}, {owners} owners): " + "  ".join(row))


if __name__ == "__main__":
    main()
