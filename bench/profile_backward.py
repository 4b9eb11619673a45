"""Where a training step's time goes, per shape: the forward kernel, the backward kernel (and, for a split kernel,
its dQ blocks alone), and the op's forward plus backward around them, as graph replays in one run.
Usage: python3 bench/profile_backward.py [--shape NAME ...] [--dtype bfloat16] [--ncu [--dq-blocks-only]]
(--ncu: only launch the default backward a few times, for `ncu` to profile the last launch; with --dq-blocks-only,
a split kernel's launches run its dQ blocks alone.)"""
from __future__ import annotations


import torch
from backward_inputs import backward_inputs, chosen_shapes, script_arguments

import fwagen
from fwagen import launch
from fwagen.launch import launch_backward
from fwagen.problem import Problem
from fwagen.space import default_backward
from fwagen.timing import interleaved


def dq_blocks_only(variant, q, mask):
    """Re-plan the split kernel's launch to its dQ blocks alone (they come first in the grid)."""
    windows, heads = q.shape[:2]
    mask_windows = 0 if mask is None else mask.shape[0]
    slot = (variant.key(), q.device.index, windows, heads, mask_windows)
    launch._plans.pop(slot, None)
    loaded, _, splits = launch._plan(variant, q.device.index, windows, heads, mask_windows)
    launch._plans[slot] = (loaded, heads * variant.chunks_per_item * splits, splits)


def main(argv=None):
    parser = script_arguments()
    parser.add_argument("--ncu", action="store_true")
    parser.add_argument("--dq-blocks-only", action="store_true")
    args = parser.parse_args(argv)
    if args.dq_blocks_only and not args.ncu:
        parser.error("--dq-blocks-only goes with --ncu (the timed run reports the dQ blocks alone anyway)")
    print(torch.cuda.get_device_name())
    for shape in chosen_shapes(args.shape, ["w24-n576"]):
        x = backward_inputs(shape, args.dtype)
        backward = default_backward(Problem(shape.n, shape.d, args.dtype, True, True, "bwd"))
        if args.ncu:
            if args.dq_blocks_only:
                if backward.kind == "bwd_mma":
                    parser.error(f"--dq-blocks-only: {shape.name}'s default backward ({backward.key()}) is not split "
                                 "into dQ and dK/dV blocks")
                dq_blocks_only(backward, x.q, x.mask)
            for _ in range(3):
                launch_backward(backward, *x.backward_args())
            torch.cuda.synchronize()
            print(backward.key())
            continue
        leaves = [t.detach().clone().requires_grad_() for t in (x.q, x.k, x.v, x.bias)]

        def train():
            o = fwagen.window_attention(*leaves[:3], bias=leaves[3], mask=x.mask)
            return torch.autograd.grad(o, leaves, x.dout)

        fns = {"forward kernel": x.launch_forward,
               "backward kernel": lambda: launch_backward(backward, *x.backward_args()),
               "op forward+backward": train}
        timings = interleaved(fns, use_graph=True)
        if backward.kind != "bwd_mma":
            dq_blocks_only(backward, x.q, x.mask)
            timings["backward, dQ blocks alone"] = interleaved(
                {"dq": lambda: launch_backward(backward, *x.backward_args())}, use_graph=True)["dq"]
        print(f"\n## {shape.name} {args.dtype} mask: {x.forward.key()} / {backward.key()}")
        for name, t in timings.items():
            print(f"{t.median_ms:8.4f} ms (spread {t.spread:.0%})  {name}")


if __name__ == "__main__":
    main()
